"""The unpruned model: evaluate it (``--pretrained --evaluate``) or train a baseline."""
from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from torch import nn

from .checkpoint import BEST
from .complexity import count_macs_params, format_macs_params
from .data import Loaders
from .distributed import DistContext
from .experiment import timestamp
from .training import Run
from .workflow import Workflow, data_and_starting_model, run_workflow

log = logging.getLogger("gsparsity")


class Original(Workflow):
    """The torchvision model as it is, trained with SGD."""

    script = "main_original.py"

    def prepare(self) -> tuple[Loaders, nn.Module]:
        return data_and_starting_model(self.args, self.ctx)

    def folder_name(self) -> str:
        return f"original_{self.args.arch}_{timestamp()}"

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        args = self.args
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)

    def check(self, model: nn.Module) -> None:
        self.macs, self.params = count_macs_params(model, 224)
        log.info(f"{self.args.arch}: {format_macs_params(self.macs, self.params)} at 224x224")

    def run_info(self, run: Run) -> dict[str, Any]:
        return {"macs": self.macs, "params": self.params}

    def finished(self, run: Run) -> None:
        log.info(f"training done: best top1 {run.best_acc1:.3f}; use it with --pretrained={run.folder / BEST}")


def original(args: argparse.Namespace, ctx: DistContext) -> None:
    run_workflow(Original(args, ctx))

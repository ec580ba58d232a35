"""Retrain a compressed model: rebuild it from its mask, load the inherited weights,
show what compression cost, then train it with SGD."""
from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .complexity import count_macs_params, format_macs_params
from .data import DataSettings, Loaders, build_loaders
from .distill import DistillationLoss, distill_record, load_teacher, searchs_starting_weights, teacher_file
from .distributed import DistContext
from .errors import UserError
from .filter_norms import rescale_branch_filters
from .compression import compress_model, compressed_model_fields, load_compressed_model
from .masks import mask_from_record
from .models import build_model, load_pretrained
from .experiment import read_run_info, timestamp
from .registry import registry_file, resolve, saved_small_models, small_model_file
from .training import Run, evaluate_only
from .workflow import Workflow, run_workflow

log = logging.getLogger("gsparsity")


def load_small_model(path: Path, scope: str, num_classes: int) -> tuple[nn.Module, dict]:
    """The compressed model saved by a search, and the mask record travelling with it."""
    model, info = load_compressed_model(path)
    if info["scope"] != scope:
        raise UserError(f"{path} was compressed with scope {info['scope']!r}; "
                        f"retrain it with main_reduce_retrain_{info['scope']}.py")
    if info["num_classes"] != num_classes:
        raise UserError(f"{path} classifies {info['num_classes']} classes but the data has {num_classes}")
    return model.train(), info["mask"]


def cut_to_mask(weights: Path, mask_record: dict, scope: str, num_classes: int) -> nn.Module:
    """The full model with ``weights``, compressed to the mask of ``mask_record``: the filters the
    search kept, with the values they had before it shrank them."""
    arch = mask_record["arch"]
    full = build_model(arch, num_classes)
    load_pretrained(full, str(weights), arch)
    mask = mask_from_record(mask_record, arch=arch, scope=scope, source=str(weights))
    return compress_model(full.eval(), mask, scope, arch=arch).train()


def small_model_path(args: argparse.Namespace, scope: str) -> Path:
    registry = registry_file(args.registry)
    entry = resolve(args.baseline_model, registry)
    if entry.scope != scope:
        raise UserError(f"--baseline_model {args.baseline_model} was searched with scope "
                        f"{entry.scope}; use main_reduce_retrain_{entry.scope}.py")
    if args.pruning_threshold is None:
        return entry.small_model
    # As the original's retrain scripts: the file of that threshold in the search's folder.
    path = entry.experiment_dir / small_model_file(scope, args.pruning_threshold)
    if not path.is_file():
        saved = [file.name for file in saved_small_models(entry.experiment_dir)]
        raise UserError(f"--pruning_threshold {args.pruning_threshold:g}: the search behind "
                        f"{args.baseline_model} has no {path.name} in {entry.experiment_dir} "
                        f"(it has {', '.join(saved) or 'none'})")
    return path


def retrain_folder_name(args: argparse.Namespace, scope: str, arch: str) -> str:
    """As the original's two retrain scripts name their folders (each its own way)."""
    if scope == "all_conv":
        return (f"retrain_{args.baseline_model}_lr_{args.lr}_momentum_{args.momentum}"
                f"_wd_{args.weight_decay}_{timestamp()}")
    return f"retrain_{arch}_{args.baseline_model}_{timestamp()}"


class Retrain(Workflow):
    """The compressed model a search saved, trained with SGD (and, with --distill, a teacher)."""

    def __init__(self, args: argparse.Namespace, ctx: DistContext, scope: str) -> None:
        super().__init__(args, ctx)
        self.scope = scope
        self.script = f"main_reduce_retrain_{scope}.py"

    def prepare(self) -> tuple[Loaders, nn.Module]:
        args, scope = self.args, self.scope
        # Resolve before making a folder, so a wrong name leaves nothing behind.
        resumed = read_run_info(args.resume, self.script) if args.resume else None
        self.source = Path(resumed["small_model"]) if resumed else small_model_path(args, scope)
        self.teacher_path = (None if args.evaluate else
                             teacher_file(args.distill, resumed, args.baseline_model, args.registry))
        starting_weights = (searchs_starting_weights(args.baseline_model, args.registry, "--inherit start",
                                                     "retrain the search's own weights")
                            if args.inherit == "start" and not args.resume else None)
        loaders = build_loaders(DataSettings.from_args(args), self.ctx)
        model, self.mask_record = load_small_model(self.source, scope, loaders.num_classes)
        self.arch = self.mask_record["arch"]  # the searched model's, whatever -a says
        self.num_classes = loaders.num_classes
        if starting_weights is not None:
            model = cut_to_mask(starting_weights, self.mask_record, scope, loaders.num_classes)
            log.info(f"--inherit start: the search's mask on the weights it started from, {starting_weights}")
        if args.rescale_filters and not args.resume:  # a resumed run's checkpoint has rescaled weights
            factors = rescale_branch_filters(model)
            log.info(f"--rescale-filters: branch filters scaled to a fresh conv's norm, by a median factor of "
                     f"{statistics.median(factors.values()):.3g} (from {min(factors.values()):.3g} to "
                     f"{max(factors.values()):.3g} per conv)")
        self.teacher = (None if self.teacher_path is None else
                        load_teacher(self.teacher_path, self.arch, loaders.num_classes, self.ctx.device,
                                     args.channels_last))
        return loaders, model

    def folder_name(self) -> str:
        return retrain_folder_name(self.args, self.scope, self.arch)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        args = self.args
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)

    def extra_checkpoint(self, model: nn.Module) -> dict[str, Any]:
        return compressed_model_fields(self.arch, self.scope, self.num_classes, self.mask_record)

    def started(self, run: Run) -> None:
        args = self.args
        if self.teacher is not None:
            run.criterion = DistillationLoss(self.teacher, args.distill_temperature, args.distill_weight,
                                             args.label_smoothing)
            run.criterion.watch(run.model)
            log.info(f"distilling from the unpruned {self.arch} in {self.teacher_path} (temperature "
                     f"{args.distill_temperature:g}, weight {args.distill_weight:g})")
        self.macs, self.params = count_macs_params(run.plain_model, 224)
        log.info(f"compressed {self.arch} ({self.scope}) from {self.source}: "
                 f"{format_macs_params(self.macs, self.params)} at 224x224")
        if not args.resume:  # what compression cost, before any retraining
            evaluate_only(run, "inherited weights, before retraining")

    def evaluate(self, run: Run) -> None:
        if self.args.resume:  # the retrained weights (a fresh run's inherited ones are evaluated already)
            step = f" and {run.start_step} step(s)" if run.start_step else ""
            evaluate_only(run, f"retrained weights, after {run.start_epoch} epoch(s){step}")

    def run_info(self, run: Run) -> dict[str, Any]:
        distill = ({} if self.teacher_path is None else
                   {"distill": distill_record(self.teacher_path, self.arch, self.args.distill_temperature,
                                              self.args.distill_weight)})
        return {"scope": self.scope, "arch": self.arch, "small_model": str(self.source.resolve()),
                "macs": self.macs, "params": self.params, **distill}

    def before_fit(self, run: Run) -> None:
        if run.ctx.is_main and not self.args.resume:
            run.scalars.add("complexity/gmacs", self.macs / 1e9, 0)
            run.scalars.add("complexity/mparams", self.params / 1e6, 0)

    def finished(self, run: Run) -> None:
        log.info(f"retraining done: best top1 {run.best_acc1:.3f}; checkpoints in {run.folder}")


def retrain(args: argparse.Namespace, ctx: DistContext, scope: str) -> None:
    run_workflow(Retrain(args, ctx, scope))

"""The sequence every workflow shares, and the steps in it where they differ.

:func:`run_workflow` runs one :class:`Workflow` (search, retrain, original):

1. seed, console logging;
2. ``prepare``: the data and the model, and every check that can refuse the input, so that
   a refusal leaves nothing on disk;
3. the model onto its device; ``check``: the checks that need it there;
4. the experiment folder (the resumed one, a new one, or none for ``--evaluate``);
5. ``optimizer`` and ``extra_checkpoint``; the :class:`~gsparsity.training.Run`, resumed
   from the folder's checkpoint on ``--resume``; ``started``;
6. with ``--evaluate``: ``evaluate``, and stop;
7. ``run_info.json`` (a fresh run), ``before_fit``, the epochs (``training.fit``, with the
   workflow's ``epoch_end`` hook), ``finished``.

The epoch loop is ``training.fit``; the step loop is ``engine.train_one_epoch``.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from .data import DataSettings, Loaders, build_loaders
from .distributed import DistContext
from .experiment import FolderSettings, open_experiment, start_logging, write_run_info
from .models import build_model, load_pretrained
from .training import EpochHook, Run, RunSettings, evaluate_only, fit, place_model, seed_everything, start_run


class Workflow:
    """One workflow's steps in :func:`run_workflow`; the defaults do nothing of their own."""

    script = ""  # the main_*.py that runs it: named in run_info.json, checked on --resume

    def __init__(self, args: argparse.Namespace, ctx: DistContext) -> None:
        self.args, self.ctx = args, ctx
        self.settings = RunSettings.from_args(args)

    def prepare(self) -> tuple[Loaders, nn.Module]:
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Checks of the model on its device, before the experiment folder is made."""

    def folder_name(self) -> str:
        raise NotImplementedError

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def extra_checkpoint(self, model: nn.Module) -> dict[str, Any]:
        """The workflow's own records in every checkpoint (restored on --resume)."""
        return {}

    def started(self, run: Run) -> None:
        """After the Run is built (and resumed), with --evaluate too."""

    def evaluate(self, run: Run) -> None:
        evaluate_only(run)

    def run_info(self, run: Run) -> dict[str, Any]:
        """What run_info.json records beside the flags (a fresh run's rank 0 writes it)."""
        return {}

    def before_fit(self, run: Run) -> None:
        pass

    def epoch_end(self, run: Run) -> EpochHook | None:
        return None

    def finished(self, run: Run) -> None:
        pass


def run_workflow(workflow: Workflow) -> None:
    settings, ctx = workflow.settings, workflow.ctx
    folders = FolderSettings.from_args(workflow.args)
    if settings.seed is not None:
        seed_everything(settings.seed)
    start_logging(ctx)
    loaders, model = workflow.prepare()
    model = place_model(model, ctx, settings.loop.channels_last)
    workflow.check(model)
    folder = open_experiment(folders, ctx, workflow.folder_name(), workflow.script)
    run = start_run(settings, ctx, folder, model, workflow.optimizer(model), loaders,
                    extra_checkpoint=workflow.extra_checkpoint(model))
    workflow.started(run)
    if folders.evaluate:
        workflow.evaluate(run)
        return
    if ctx.is_main and not settings.resume:
        write_run_info(folder, workflow.args, workflow.script, workflow.run_info(run))
    workflow.before_fit(run)
    fit(run, workflow.epoch_end(run))
    workflow.finished(run)


def data_and_starting_model(args: argparse.Namespace, ctx: DistContext) -> tuple[Loaders, nn.Module]:
    """The data loaders and the unpruned model with its ``--pretrained`` weights (not on
    ``--resume``: the checkpoint has them): what the search and main_original.py prepare."""
    loaders = build_loaders(DataSettings.from_args(args), ctx)
    model = build_model(args.arch, loaders.num_classes)
    if args.pretrained and not args.resume:
        load_pretrained(model, args.pretrained, args.arch)
    return loaders, model

"""The epoch loop every workflow shares: train, validate, checkpoint, resume.

A workflow (search, retrain, original) builds its model and optimizer, wraps them
in a :class:`Run`, and calls :func:`fit` with a hook for its own end-of-epoch work
(the search computes the mask and the compressed model there).
"""
from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_save, capture_rng_state, load_checkpoint, restore_rng_state
from .data import Loaders, start_epoch
from .distributed import DistContext
from .engine import EpochMetrics, train_one_epoch, validate
from .errors import UserError
from .experiment import Scalars

log = logging.getLogger("gsparsity")
CHECKPOINT = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"

EpochHook = Callable[[int, EpochMetrics], None]


@dataclass
class Run:
    args: argparse.Namespace
    ctx: DistContext
    folder: Path
    model: nn.Module  # as trained: maybe DDP-wrapped
    plain_model: nn.Module  # the torchvision-style model inside
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loaders: Loaders
    scalars: Scalars
    scaler: torch.amp.GradScaler | None = None
    criterion: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    start_epoch: int = 0
    best_acc1: float = 0.0
    extra_checkpoint: dict[str, Any] = field(default_factory=dict)  # e.g. the mask of a small model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(run: "Run", epoch: int) -> None:
    """An epoch's shuffling, augmentation and any other draw depend on (seed, epoch) only,
    so a resumed run draws exactly what an uninterrupted one would."""
    if run.args.seed is not None:
        seed_everything(run.args.seed * 1_000 + epoch)
    start_epoch(run.loaders.train, epoch, run.args.seed)


def place_model(model: nn.Module, args: argparse.Namespace, ctx: DistContext) -> nn.Module:
    """Move to the device (channels_last if asked); the caller wraps it with :func:`wrap_ddp`
    after building the optimizer."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return model.to(ctx.device, memory_format=memory_format)


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace):
    if args.lr_scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=0.1)


def make_scaler(args: argparse.Namespace, ctx: DistContext) -> torch.amp.GradScaler | None:
    """fp16 autocast on CUDA needs loss scaling; bf16 on CPU does not."""
    if args.amp and ctx.device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def checkpoint_state(run: Run, next_epoch: int) -> dict[str, Any]:
    return {
        "epoch": next_epoch,
        "arch": run.args.arch,
        "state_dict": run.plain_model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "best_acc1": run.best_acc1,
        "rng": capture_rng_state(),
        **run.extra_checkpoint,
    }


def save_checkpoint(run: Run, next_epoch: int, is_best: bool) -> None:
    if not run.ctx.is_main:
        return
    state = checkpoint_state(run, next_epoch)
    atomic_save(state, run.folder / CHECKPOINT)
    if is_best:
        atomic_save(state, run.folder / BEST)


def load_resume_checkpoint(folder: Path) -> dict[str, Any]:
    """The latest checkpoint of an experiment, falling back to model_best if it is broken."""
    latest, best = Path(folder) / CHECKPOINT, Path(folder) / BEST
    try:
        return load_checkpoint(latest)
    except UserError as problem:
        if not best.is_file():
            raise UserError(f"--resume {folder}: {problem}") from None
        log.warning(f"--resume: {problem}; falling back to {best.name}")
        return load_checkpoint(best)


def restore(run: Run, checkpoint: dict[str, Any]) -> None:
    """Continue where a checkpoint stopped: weights, optimizer, schedule, scaler, RNG."""
    run.plain_model.load_state_dict(checkpoint["state_dict"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if run.scaler is not None and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    run.start_epoch = int(checkpoint["epoch"])
    run.best_acc1 = float(checkpoint["best_acc1"])
    if checkpoint.get("rng"):
        restore_rng_state(checkpoint["rng"])
    log.info(f"resumed from {run.folder} at epoch {run.start_epoch} (best top-1 {run.best_acc1:.2f})")


def skip_to_start_epoch(run: Run) -> None:
    """--start-epoch on a fresh run: the schedule starts where that epoch would be."""
    for _ in range(run.start_epoch):
        run.scheduler.step()


def report_validation(metrics: EpochMetrics, what: str) -> None:
    log.info(f"{what}: top1 {metrics.top1:.3f} top5 {metrics.top5:.3f} loss {metrics.loss:.4f} "
             f"({metrics.images} images)")


def fit(run: Run, on_epoch_end: EpochHook | None = None) -> None:
    """Train from ``run.start_epoch`` to ``args.epochs``, validating and checkpointing each epoch."""
    args = run.args
    for epoch in range(run.start_epoch, args.epochs):
        seed_epoch(run, epoch)
        train = train_one_epoch(run.model, run.loaders.train, run.criterion, run.optimizer,
                                run.scaler, run.ctx, epoch, args)
        lr = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        val = validate(run.model, run.loaders.val, run.criterion, run.ctx, args)
        is_best = val.top1 > run.best_acc1
        run.best_acc1 = max(run.best_acc1, val.top1)
        log.info(f"epoch {epoch} done: train loss {train.loss:.4f} top1 {train.top1:.2f} | "
                 f"val loss {val.loss:.4f} top1 {val.top1:.3f} top5 {val.top5:.3f} | "
                 f"best top1 {run.best_acc1:.3f} | {train.images_per_second:.1f} img/s | "
                 f"data wait {100 * train.data_seconds / max(train.seconds, 1e-9):.0f}%")
        for tag, value in (("train/loss", train.loss), ("train/top1", train.top1),
                           ("val/loss", val.loss), ("val/top1", val.top1), ("val/top5", val.top5),
                           ("lr", lr), ("train/images_per_second", train.images_per_second)):
            run.scalars.add(tag, value, epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch, val)
        save_checkpoint(run, epoch + 1, is_best)
    run.scalars.close()


def start_run(args: argparse.Namespace, ctx: DistContext, folder: Path | None, model: nn.Module,
              optimizer: torch.optim.Optimizer, loaders: Loaders, **extra: Any) -> Run:
    """Wrap the pieces in a Run, resumed from the folder's checkpoint on --resume."""
    run = Run(args=args, ctx=ctx, folder=folder, model=wrap_ddp(model, ctx), plain_model=model,
              optimizer=optimizer, scheduler=make_scheduler(optimizer, args), loaders=loaders,
              scalars=Scalars(folder, ctx), scaler=make_scaler(args, ctx),
              start_epoch=args.start_epoch, **extra)
    if args.resume:
        restore(run, load_resume_checkpoint(folder))
    else:
        skip_to_start_epoch(run)
    return run


def evaluate_only(run: Run, what: str = "validation") -> EpochMetrics:
    metrics = validate(run.model, run.loaders.val, run.criterion, run.ctx, run.args)
    report_validation(metrics, what)
    return metrics

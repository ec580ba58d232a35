"""The epoch loop every workflow shares: train, validate, checkpoint, resume.

A workflow (search, retrain, original; the sequence they share is ``workflow.py``)
builds its model and optimizer, wraps them in a :class:`Run` with :func:`start_run`,
and calls :func:`fit` with a hook for its own end-of-epoch work (the search computes
the mask and the compressed model there). The step loop is ``engine.train_one_epoch``.

A checkpoint records the epoch and the steps done in it (``"step"``: 0 at an epoch's
end; more with ``--checkpoint-every`` or after a stop signal), so ``--resume`` goes on
from that exact step, with the random state the checkpoint captured.
"""
from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np
import torch
from torch import nn

from .checkpoint import (BEST, CHECKPOINT, atomic_save, capture_rng_state, load_checkpoint,
                         remove_stale_temp_files, restore_rng_state)
from .data import Loaders, start_epoch
from .distributed import DistContext, all_reduce_max, barrier, broadcast_module_states
from .engine import EpochMetrics, LoopSettings, make_scaler, train_one_epoch, validate
from .errors import UserError
from .experiment import Scalars
from .stopping import Preempted, StepGuard, StopRequested

log = logging.getLogger("gsparsity")

EpochHook = Callable[[int, EpochMetrics], None]


@dataclass
class Run:
    settings: "RunSettings"
    ctx: DistContext
    folder: Path | None  # None: --evaluate without --resume (nothing is written)
    model: nn.Module  # as trained: maybe DDP-wrapped
    plain_model: nn.Module  # the torchvision-style model inside
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loaders: Loaders
    scalars: Scalars
    scaler: torch.amp.GradScaler | None = None
    criterion: nn.Module = field(default_factory=nn.CrossEntropyLoss)  # the training loss
    val_criterion: nn.Module = field(default_factory=nn.CrossEntropyLoss)  # always plain cross-entropy
    start_epoch: int = 0
    start_step: int = 0  # steps of start_epoch already done (a mid-epoch checkpoint)
    resume_rng: dict[str, Any] | None = None  # random state of a mid-epoch checkpoint
    best_acc1: float = 0.0
    extra_checkpoint: dict[str, Any] = field(default_factory=dict)  # e.g. the mask of a small model

    @property
    def loop(self) -> LoopSettings:
        return self.settings.loop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(run: "Run", epoch: int, first_step: int = 0) -> None:
    """An epoch's shuffling, augmentation and any other draw depend on (seed, epoch) only,
    so a resumed run draws exactly what an uninterrupted one would. Resumed part-way
    (``first_step`` > 0), the random state is the one the checkpoint captured."""
    seed = run.settings.seed
    if seed is not None:
        seed_everything(seed * 1_000 + epoch)
    start_epoch(run.loaders.train, epoch, seed, first_step)
    if first_step and run.resume_rng:
        restore_rng_state(run.resume_rng)


def place_model(model: nn.Module, ctx: DistContext, channels_last: bool = False) -> nn.Module:
    """Move to the device (in the channels_last memory format if asked) and give every process
    rank 0's weights; :func:`start_run` wraps it with :func:`wrap_ddp` after the optimizer is built."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(ctx.device, memory_format=memory_format)
    broadcast_module_states(model)
    return model


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def compile_if_asked(model: nn.Module, compile_model: bool) -> nn.Module:
    """``torch.compile(model)`` with --compile. It shares the plain model's parameters, which
    the optimizer, the masks and the checkpoints keep using. Static shapes: the last, smaller
    batch of an epoch compiles its own graph once rather than making every graph dynamic."""
    if not compile_model:
        return model
    log.info("the model goes through torch.compile (--compile): each new batch shape compiles once")
    return torch.compile(model, dynamic=False)


@dataclass(frozen=True)
class Schedule:
    """The lr over a run, stepped once per epoch (``--lr``, ``--epochs``, ``--lr-scheduler``,
    ``--lr-step``, ``--warmup-epochs``)."""

    lr: float
    epochs: int
    kind: str = "step"  # "step": x0.1 every lr_step epochs; "cosine"
    lr_step: int = 30
    warmup_epochs: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Schedule":
        return cls(lr=args.lr, epochs=args.epochs, kind=args.lr_scheduler, lr_step=args.lr_step,
                   warmup_epochs=args.warmup_epochs)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LRScheduler:
    """The lr scheduler of ``schedule``. With warmup N: lr * (e + 1) / N in epoch e < N,
    then the chosen schedule over the remaining epochs, from lr."""
    warmup = schedule.warmup_epochs
    if schedule.kind == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=schedule.epochs - warmup)
    else:
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=schedule.lr_step, gamma=0.1)
    if not warmup:
        return main
    # total_iters N - 1: the last warmup epoch is at lr already (1 for N = 1, where it stays at lr).
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0,
                                             total_iters=max(warmup - 1, 1))
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def step_lrs(schedule: Schedule, steps_per_epoch: int) -> list[float]:
    """The lr of every step of a run on ``schedule``."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=schedule.lr)
    scheduler = make_scheduler(dummy, schedule)
    lrs = []
    for _ in range(schedule.epochs):
        lrs += [dummy.param_groups[0]["lr"]] * steps_per_epoch
        dummy.step()
        scheduler.step()
    return lrs


@dataclass(frozen=True)
class RunSettings:
    """What the epoch loop reads of the flags (:func:`start_run`, :func:`fit`)."""

    arch: str  # recorded in every checkpoint
    epochs: int
    schedule: Schedule
    loop: LoopSettings = field(default_factory=LoopSettings)
    seed: int | None = None  # --seed: each epoch's draws depend on (seed, epoch) only
    start_epoch: int = 0  # --start-epoch of a fresh run
    resume: bool = False  # go on from the experiment folder's checkpoint
    compile: bool = False
    label_smoothing: float = 0.0  # of the training loss (retrain and original have the flag)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunSettings":
        return cls(arch=args.arch, epochs=args.epochs, schedule=Schedule.from_args(args),
                   loop=LoopSettings.from_args(args), seed=args.seed, start_epoch=args.start_epoch,
                   resume=bool(args.resume), compile=args.compile,
                   label_smoothing=getattr(args, "label_smoothing", 0.0))  # the search has no such flag


def checkpoint_state(run: Run, epoch: int, step: int) -> dict[str, Any]:
    """Everything needed to go on at step ``step`` of epoch ``epoch``."""
    return {
        "epoch": epoch,
        "step": step,
        "world_size": run.ctx.world_size,
        "arch": run.settings.arch,
        "state_dict": run.plain_model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "best_acc1": run.best_acc1,
        "rng": capture_rng_state(),
        **run.extra_checkpoint,
    }


def check_weights_finite(run: Run, epoch: int, step: int) -> None:
    """Refuse to go on (and to save) with nan/inf weights or BatchNorm statistics.

    A finite loss at step s only vouches for the weights before update s, so this is
    checked before every save. The processes agree on the verdict: their weights are the
    same, but each keeps its own BatchNorm statistics, and all must stop together."""
    state = run.plain_model.state_dict()
    floating = {name: tensor for name, tensor in state.items() if tensor.is_floating_point()}
    finite = torch.stack([torch.isfinite(tensor).all() for tensor in floating.values()]).all()
    if not all_reduce_max((~finite).to(torch.int64).reshape(1)).item():
        return  # one host sync for the whole model
    first = next((name for name, tensor in floating.items() if not torch.isfinite(tensor).all()),
                 "on another process")
    raise UserError(f"the weights became nan or inf in epoch {epoch} by step {step} (e.g. {first}): "
                    f"lower --lr; nothing was saved, the last checkpoint is untouched")


def save_checkpoint(run: Run, epoch: int, step: int = 0, is_best: bool = False) -> None:
    """Rank 0 writes checkpoint.pth.tar (and model_best.pth.tar), each atomically: a crash
    or a full disk part-way leaves the previous file as it was."""
    check_weights_finite(run, epoch, step)
    if not run.ctx.is_main:
        return
    state = checkpoint_state(run, epoch, step)
    atomic_save(state, run.folder / CHECKPOINT)
    if is_best:
        atomic_save(state, run.folder / BEST)


def load_resume_checkpoint(folder: Path) -> dict[str, Any]:
    """The latest checkpoint of an experiment, falling back to model_best if it is broken."""
    latest, best = Path(folder) / CHECKPOINT, Path(folder) / BEST
    if not latest.exists() and not best.exists():
        raise UserError(f"--resume {folder}: it holds no {CHECKPOINT} or {BEST} (the run stopped "
                        f"before its first checkpoint); start it again without --resume")
    try:
        return load_checkpoint(latest)
    except UserError as latest_problem:
        if not best.exists():
            raise UserError(f"--resume {folder}: {latest_problem}; and there is no {BEST} "
                            f"to fall back to") from None
        try:
            loaded = load_checkpoint(best)
        except UserError as best_problem:
            raise UserError(f"--resume {folder}: neither checkpoint can be used: {latest_problem}; "
                            f"{best_problem}") from None
        log.warning(f"--resume: {latest_problem}; falling back to {best.name} (epoch {loaded.get('epoch')})")
        return loaded


def restore(run: Run, checkpoint: dict[str, Any]) -> None:
    """Continue where a checkpoint stopped: weights, optimizer, schedule, scaler, RNG."""
    run.plain_model.load_state_dict(checkpoint["state_dict"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if run.scaler is not None and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    elif checkpoint.get("scaler"):
        log.info("the checkpoint's GradScaler state is not used: --amp on this device computes in bf16, "
                 "which needs no loss scaling")
    run.start_epoch = int(checkpoint["epoch"])
    run.start_step = int(checkpoint.get("step", 0))  # older checkpoints: epoch ends only
    run.best_acc1 = float(checkpoint["best_acc1"])
    for key in run.extra_checkpoint:  # the workflow's own records, as the run saved them
        if key in checkpoint:
            run.extra_checkpoint[key] = checkpoint[key]
    if checkpoint.get("rng"):
        restore_rng_state(checkpoint["rng"])
        run.resume_rng = checkpoint["rng"] if run.start_step else None
    saved_world = checkpoint.get("world_size", run.ctx.world_size)
    if run.start_step and saved_world != run.ctx.world_size:
        log.warning(f"--resume: the checkpoint was saved by {saved_world} process(es), this run has "
                    f"{run.ctx.world_size}: the rest of epoch {run.start_epoch} goes through the "
                    f"images in another order than the first part did")
    within = f", after step {run.start_step}" if run.start_step else ""
    log.info(f"resumed from {run.folder} at epoch {run.start_epoch}{within} (best top-1 {run.best_acc1:.2f})")


def skip_to_start_epoch(run: Run) -> None:
    """--start-epoch on a fresh run: the schedule starts where that epoch would be."""
    for _ in range(run.start_epoch):
        run.scheduler.step()


def report_validation(metrics: EpochMetrics, what: str) -> None:
    log.info(f"{what}: top1 {metrics.top1:.3f} top5 {metrics.top5:.3f} loss {metrics.loss:.4f} "
             f"({metrics.images} images)")


def stop_for_signal(run: Run, epoch: int, steps_done: int, signal_name: str,
                    already_saved: bool = False) -> NoReturn:
    """Save where the run is, wait until it is on disk, and raise :class:`Preempted`."""
    if not already_saved:
        save_checkpoint(run, epoch, steps_done)
    barrier()  # no process may exit (and have a launcher kill rank 0) before the file is written
    message = (f"stopped by {signal_name} in epoch {epoch} after step {steps_done}; checkpoint saved; "
               f"continue with --resume {run.folder}")
    if run.ctx.is_main:
        log.warning(message)
    raise Preempted(message, report=run.ctx.is_main)


def train_epoch(run: Run, epoch: int, guard: StepGuard) -> EpochMetrics:
    """One epoch of training (the rest of it, if resumed part-way)."""
    first_step = run.start_step if epoch == run.start_epoch else 0
    seed_epoch(run, epoch, first_step)
    try:
        return train_one_epoch(run.model, run.loaders.train, run.criterion, run.optimizer, run.scaler,
                               run.ctx, epoch, run.loop, guard=guard, first_step=first_step,
                               save_progress=lambda steps_done: save_checkpoint(run, epoch, steps_done))
    except StopRequested as stop:
        stop_for_signal(run, epoch, stop.steps_done, stop.signal_name)


def fit(run: Run, on_epoch_end: EpochHook | None = None) -> None:
    """Train from ``run.start_epoch`` to the last epoch, validating and checkpointing each one."""
    guard = StepGuard(run.ctx, StepGuard.check_interval(run.ctx, run.loop.print_freq), run.loop.skip_nonfinite)
    try:
        for epoch in range(run.start_epoch, run.settings.epochs):
            run_epoch(run, epoch, guard, on_epoch_end)
    except UserError as error:  # so that _log.txt, too, says why the run ended
        if run.ctx.is_main:
            log.error(f"the run stopped: {error}")
        raise
    finally:
        run.scalars.close()


def run_epoch(run: Run, epoch: int, guard: StepGuard, on_epoch_end: EpochHook | None) -> None:
    """Train, validate, run the workflow's hook, checkpoint; stop here if a signal came."""
    train = train_epoch(run, epoch, guard)
    check_weights_finite(run, epoch, guard.total_steps)  # before validation and the epoch hook
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    val = validate(run.model, run.loaders.val, run.val_criterion, run.ctx, run.loop)
    is_best = val.top1 > run.best_acc1
    run.best_acc1 = max(run.best_acc1, val.top1)
    report_epoch(run, epoch, train, val, lr)
    if on_epoch_end is not None:
        on_epoch_end(epoch, val)
    run.scalars.write_epoch(epoch)
    save_checkpoint(run, epoch + 1, 0, is_best)
    signal_name = guard.agreed_signal()  # received during validation or the epoch's end
    if signal_name is not None and epoch + 1 < run.settings.epochs:
        stop_for_signal(run, epoch + 1, 0, signal_name, already_saved=True)


def report_epoch(run: Run, epoch: int, train: EpochMetrics, val: EpochMetrics, lr: float) -> None:
    log.info(f"epoch {epoch} done: train loss {train.loss:.4f} top1 {train.top1:.2f} | "
             f"val loss {val.loss:.4f} top1 {val.top1:.3f} top5 {val.top5:.3f} | "
             f"best top1 {run.best_acc1:.3f} | {train.images_per_second:.1f} img/s | "
             f"data wait {100 * train.data_seconds / max(train.seconds, 1e-9):.0f}%")
    if train.scaler_skips:
        log.info(f"epoch {epoch}: the GradScaler skipped {train.scaler_skips} step(s) for inf/nan "
                 f"gradients (lowering its scale)")
    for tag, value in (("train/loss", train.loss), ("train/top1", train.top1),
                       ("val/loss", val.loss), ("val/top1", val.top1), ("val/top5", val.top5),
                       ("val/best_top1", run.best_acc1), ("lr", lr),
                       ("train/images_per_second", train.images_per_second),
                       ("train/data_wait_share", train.data_seconds / max(train.seconds, 1e-9))):
        run.scalars.add(tag, value, epoch)


def start_run(settings: RunSettings, ctx: DistContext, folder: Path | None, model: nn.Module,
              optimizer: torch.optim.Optimizer, loaders: Loaders, **extra: Any) -> Run:
    """Wrap the pieces in a Run, resumed from the folder's checkpoint with ``settings.resume``."""
    # Load first: a broken checkpoint must stop the run before anything is written.
    checkpoint = load_resume_checkpoint(folder) if settings.resume else None
    run = Run(settings=settings, ctx=ctx, folder=folder, model=compile_if_asked(wrap_ddp(model, ctx), settings.compile),
              plain_model=model, optimizer=optimizer, scheduler=make_scheduler(optimizer, settings.schedule),
              loaders=loaders, scalars=Scalars(folder, ctx), scaler=make_scaler(settings.loop.amp, ctx.device),
              criterion=nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing),
              start_epoch=settings.start_epoch, **extra)
    if checkpoint is not None:
        restore(run, checkpoint)
        if ctx.is_main:
            for leftover in remove_stale_temp_files(folder):
                log.info(f"removed {leftover.name}, left by a process killed while writing")
    else:
        skip_to_start_epoch(run)
    return run


def evaluate_only(run: Run, what: str = "validation") -> EpochMetrics:
    metrics = validate(run.model, run.loaders.val, run.val_criterion, run.ctx, run.loop)
    report_validation(metrics, what)
    return metrics

"""One training epoch and one validation pass, shared by every workflow.

Metrics are summed on the device and only read back (a host sync) at print
frequency and at the end; the end-of-epoch figures are all-reduced so every
process reports the same numbers. A :class:`~gsparsity.stopping.StepGuard` watches
each step (non-finite loss, unreadable images, stop signals) and decides with the
other processes when to stop; mid-epoch checkpoints are saved through a callback.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import image_folder_of
from .distributed import DistContext, all_reduce_max, all_reduce_sum
from .errors import UserError
from .stopping import StepGuard, StopRequested

log = logging.getLogger("gsparsity")


@dataclass(frozen=True)
class LoopSettings:
    """The flags the step loops read (:func:`train_one_epoch`, :func:`validate`)."""

    amp: bool = False
    channels_last: bool = False
    print_freq: int = 10  # steps between progress lines (and between stop-signal checks)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: at epoch ends only
    skip_nonfinite: int = 0  # steps with a non-finite loss to skip before stopping
    clip_grad_norm: float = 0.0  # largest total gradient norm a step takes; 0: no clipping

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LoopSettings":
        return cls(amp=args.amp, channels_last=args.channels_last, print_freq=args.print_freq,
                   checkpoint_every=args.checkpoint_every, skip_nonfinite=args.skip_nonfinite,
                   clip_grad_norm=args.clip_grad_norm)


@dataclass
class EpochMetrics:
    loss: float
    top1: float
    top5: float
    images: int
    seconds: float
    data_seconds: float = 0.0
    scaler_skips: int = 0  # steps the GradScaler skipped for inf/nan gradients

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


class MetricSums:
    """Loss and correct-prediction sums kept on the device (no per-step sync)."""

    def __init__(self, device: torch.device) -> None:
        # loss sum, top-1 correct, top-5 correct, images
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, output: torch.Tensor, target: torch.Tensor) -> None:
        k = min(5, output.shape[1])
        top_k = output.topk(k, dim=1).indices
        hits = top_k.eq(target.unsqueeze(1))
        batch = target.shape[0]
        update = torch.stack([
            loss.detach().double() * batch,
            hits[:, :1].sum().double(),
            hits.sum().double(),
            # torch.full, not torch.tensor: a fill on the device, not a copy from the host,
            # which on CUDA waits for the GPU at every step.
            torch.full((), batch, dtype=torch.float64, device=target.device),
        ])
        self.sums += update

    def averages(self) -> tuple[float, float, float, int]:
        loss_sum, top1, top5, count = self.sums.tolist()
        count = max(count, 1.0)
        return loss_sum / count, 100.0 * top1 / count, 100.0 * top5 / count, int(count)

    def reduced(self) -> "MetricSums":
        total = MetricSums(self.sums.device)
        total.sums = all_reduce_sum(self.sums.clone())
        return total


def amp_dtype(device: torch.device) -> torch.dtype:
    """What ``--amp`` computes in: bf16 where the device has it natively (CPUs, NVIDIA GPUs
    from Ampere on), else fp16. bf16 keeps fp32's exponent range, so it needs no loss
    scaling, and so no GradScaler, whose ``step`` reads a flag back from the GPU (a host
    sync) at every step."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):  # before Ampere
        return torch.float16
    return torch.bfloat16


def make_scaler(amp: bool, device: torch.device) -> torch.amp.GradScaler | None:
    """The GradScaler ``--amp`` needs on ``device``: one for fp16, whose range is narrow; none
    for bf16 (see :func:`amp_dtype`) or without --amp."""
    if amp and amp_dtype(device) == torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def autocast(device: torch.device, enabled: bool) -> ContextManager[object]:
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))


def progress(iterable: Iterable, ctx: DistContext, description: str, total: int) -> Iterable:
    """A tqdm bar on rank 0 when stderr is a terminal; the plain iterable otherwise."""
    enabled = ctx.is_main and sys.stderr.isatty()
    return tqdm(iterable, desc=description, total=total, disable=not enabled, leave=False)


def to_device(images: torch.Tensor, target: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return images, target.to(device, non_blocking=True)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None,
                      before_step: Callable[[], None] | None = None,
                      clip_grad_norm: float = 0.0) -> torch.Tensor | None:
    """One update. With a GradScaler: a device flag, 1 if it skipped the step (inf/nan
    gradients), read from its scale, which drops exactly then (no host sync).
    ``before_step`` runs between the backward pass and the step (e.g. to average gradients);
    then, with ``clip_grad_norm`` > 0, the gradients are scaled down to at most that total norm."""
    (loss if scaler is None else scaler.scale(loss)).backward()
    if before_step is not None:
        before_step()
    if clip_grad_norm > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        clip_gradients(optimizer, clip_grad_norm)
    if scaler is None:
        optimizer.step()
        return None
    scaler.step(optimizer)
    # _get_scale_async: the scale as a device tensor; get_scale() would sync every step.
    scale_before = scaler._get_scale_async().clone()
    scaler.update()
    return (scaler._get_scale_async() < scale_before).to(torch.int64)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Scale every gradient the optimizer will use by one factor, so that their total L2
    norm is at most ``max_norm``; returns the norm before (a device tensor: no host sync).
    Under DDP the gradients are already averaged, so every process scales alike."""
    with_gradients = [parameter for group in optimizer.param_groups for parameter in group["params"]
                      if parameter.grad is not None]
    return torch.nn.utils.clip_grad_norm_(with_gradients, max_norm)


def log_progress(bar: Iterable, sums: MetricSums, ctx: DistContext, started: float, data_seconds: float,
                 where: str, lr: float) -> None:
    loss_avg, top1, top5, count = sums.averages()  # a host sync
    elapsed = max(time.perf_counter() - started, 1e-9)
    if hasattr(bar, "set_postfix_str"):
        bar.set_postfix_str(f"loss {loss_avg:.3f} top1 {top1:.1f} img/s {count / elapsed:.0f}")
    if ctx.is_main:
        log.info(f"{where} loss {loss_avg:.4f} top1 {top1:.2f} top5 {top5:.2f} "
                 f"img/s {count * ctx.world_size / elapsed:.1f} data {100.0 * data_seconds / elapsed:.0f}% "
                 f"lr {lr:.3g}")


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, ctx: DistContext, epoch: int, settings: LoopSettings,
                    guard: StepGuard | None = None, first_step: int = 0,
                    save_progress: Callable[[int], None] | None = None) -> EpochMetrics:
    """Train one epoch, from ``first_step`` on if it was partly done before.

    ``save_progress(steps_done)`` saves a mid-epoch checkpoint every ``settings.checkpoint_every``
    steps. Raises :class:`StopRequested` after the step at which every process agreed to
    stop for a signal (the caller saves the checkpoint), and UserError for a non-finite
    loss or an unreadable image (``--bad-images stop``), before any further checkpoint."""
    guard = guard or StepGuard(ctx, StepGuard.check_interval(ctx, settings.print_freq), settings.skip_nonfinite)
    total_steps = first_step + len(loader)
    guard.start_epoch(epoch, total_steps, image_folder_of(loader))
    checkpoint_every = settings.checkpoint_every if save_progress is not None else 0
    model.train()
    sums = MetricSums(ctx.device)
    scaler_skips = torch.zeros((), dtype=torch.int64, device=ctx.device)
    started = time.perf_counter()
    data_seconds = 0.0
    bar = progress(loader, ctx, f"epoch {epoch} train", len(loader))
    fetch_started = time.perf_counter()
    for step, (images, target) in enumerate(bar, start=first_step):
        data_seconds += time.perf_counter() - fetch_started
        images, target = to_device(images, target, ctx.device, settings.channels_last)
        with autocast(ctx.device, settings.amp):
            output = model(images)
            loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        if guard.loss_usable(loss, step):
            skipped_by_scaler = backward_and_step(loss, optimizer, scaler, clip_grad_norm=settings.clip_grad_norm)
            if skipped_by_scaler is not None:
                scaler_skips += skipped_by_scaler
            sums.add(loss, output, target)
            guard.watch(loss, step)
        steps_done = step + 1
        if steps_done % settings.print_freq == 0 or steps_done == total_steps:
            log_progress(bar, sums, ctx, started, data_seconds, f"epoch {epoch} [{steps_done}/{total_steps}]",
                         optimizer.param_groups[0]["lr"])
        checkpoint_due = checkpoint_every > 0 and steps_done % checkpoint_every == 0
        if guard.is_check_step(steps_done, must_check=checkpoint_due):
            signal_name = guard.check()
            if signal_name is not None:
                raise StopRequested(steps_done, signal_name)
            if checkpoint_due and steps_done < total_steps:  # the epoch's end saves its own
                save_progress(steps_done)
        fetch_started = time.perf_counter()
    settle_unreadable_images(loader, ctx, f"epoch {epoch} train")
    loss_avg, top1, top5, count = sums.reduced().averages()
    # DDP gives every process the same gradients, so all skip the same steps: max, not sum.
    skipped = int(all_reduce_max(scaler_skips.reshape(1)).item())
    return EpochMetrics(loss_avg, top1, top5, count, time.perf_counter() - started, data_seconds, skipped)


def settle_unreadable_images(loader: DataLoader, ctx: DistContext, what: str) -> None:
    """After a pass over an ImageFolder: with --bad-images stop, stop naming the first
    unreadable file any process met; with skip, warn once with the count."""
    images = image_folder_of(loader)
    if images is None:
        return
    first = images.failures.first_index()
    found = torch.tensor([images.failures.unreported_count(), -1 if first is None else first],
                         dtype=torch.int64, device=ctx.device)
    count = int(all_reduce_sum(found[:1].clone()).item())
    first = int(all_reduce_max(found[1:].clone()).item())
    if count == 0 and first < 0:
        return
    if images.bad_images == "stop":
        raise UserError(images.unreadable_message(first))
    if count and ctx.is_main:
        log.warning(f"{what}: {count} unreadable image file(s) skipped, each replaced by the next "
                    f"readable image (e.g. {images.samples[first][0]})")


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, criterion: nn.Module, ctx: DistContext, settings: LoopSettings,
             description: str = "val") -> EpochMetrics:
    model.eval()
    sums = MetricSums(ctx.device)
    started = time.perf_counter()
    for images, target in progress(loader, ctx, description, len(loader)):
        images, target = to_device(images, target, ctx.device, settings.channels_last)
        with autocast(ctx.device, settings.amp):
            output = model(images)
            loss = criterion(output, target)
        sums.add(loss.float(), output.float(), target)
    settle_unreadable_images(loader, ctx, description)
    loss_avg, top1, top5, count = sums.reduced().averages()
    return EpochMetrics(loss_avg, top1, top5, count, time.perf_counter() - started)

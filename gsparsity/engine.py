"""One training epoch and one validation pass, shared by every workflow.

Metrics are summed on the device and only read back (a host sync) at print
frequency and at the end; the end-of-epoch figures are all-reduced so every
process reports the same numbers.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from .distributed import DistContext, all_reduce_sum
from .errors import UserError

log = logging.getLogger("gsparsity")


@dataclass
class EpochMetrics:
    loss: float
    top1: float
    top5: float
    images: int
    seconds: float
    data_seconds: float = 0.0

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
            torch.tensor(float(batch), dtype=torch.float64, device=target.device),
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


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def progress(iterable: Iterable, ctx: DistContext, description: str, total: int) -> Iterable:
    """A tqdm bar on rank 0 when stderr is a terminal; the plain iterable otherwise."""
    enabled = ctx.is_main and sys.stderr.isatty()
    return tqdm(iterable, desc=description, total=total, disable=not enabled, leave=False)


def to_device(images: torch.Tensor, target: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return images, target.to(device, non_blocking=True)


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, ctx: DistContext, epoch: int, args) -> EpochMetrics:
    model.train()
    sums = MetricSums(ctx.device)
    started = time.perf_counter()
    data_seconds = 0.0
    bar = progress(loader, ctx, f"epoch {epoch} train", len(loader))
    fetch_started = time.perf_counter()
    for step, (images, target) in enumerate(bar):
        data_seconds += time.perf_counter() - fetch_started
        images, target = to_device(images, target, ctx.device, args.channels_last)
        with autocast(ctx.device, args.amp):
            output = model(images)
            loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        sums.add(loss, output, target)
        if (step + 1) % args.print_freq == 0 or step + 1 == len(loader):
            loss_avg, top1, top5, count = sums.averages()  # the only host sync of the loop
            if not math.isfinite(loss_avg):
                raise UserError(f"the loss became {loss_avg} in epoch {epoch}, step {step + 1}: "
                                f"lower --lr or check the data; the last checkpoint is untouched")
            now = time.perf_counter()
            elapsed = now - started
            line = (f"epoch {epoch} [{step + 1}/{len(loader)}] loss {loss_avg:.4f} "
                    f"top1 {top1:.2f} top5 {top5:.2f} img/s {count * ctx.world_size / elapsed:.1f} "
                    f"data {100.0 * data_seconds / elapsed:.0f}% lr {optimizer.param_groups[0]['lr']:.3g}")
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"loss {loss_avg:.3f} top1 {top1:.1f} img/s {count / elapsed:.0f}")
            if ctx.is_main:
                log.info(line)
        fetch_started = time.perf_counter()
    total = sums.reduced()
    loss_avg, top1, top5, count = total.averages()
    return EpochMetrics(loss_avg, top1, top5, count, time.perf_counter() - started, data_seconds)


@torch.no_grad()
def validate(model: nn.Module, loader, criterion: nn.Module, ctx: DistContext, args,
             description: str = "val") -> EpochMetrics:
    model.eval()
    sums = MetricSums(ctx.device)
    started = time.perf_counter()
    for images, target in progress(loader, ctx, description, len(loader)):
        images, target = to_device(images, target, ctx.device, args.channels_last)
        with autocast(ctx.device, args.amp):
            output = model(images)
            loss = criterion(output, target)
        sums.add(loss.float(), output.float(), target)
    loss_avg, top1, top5, count = sums.reduced().averages()
    return EpochMetrics(loss_avg, top1, top5, count, time.perf_counter() - started)

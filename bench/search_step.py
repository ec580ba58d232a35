"""Time one search training step with ProxSGD against the same step with plain SGD.

    python bench/search_step.py [--batch-size 32] [--image-size 64] [--device cpu] [--repeats 30]
                                [--amp] [--channels-last]

A step is what the search's train loop does per batch: forward, loss, zero_grad,
backward, optimizer step, on a ResNet-50 in train mode. ProxSGD is set up as the
search sets it up (conv12 groups, layer-adaptive mu 0.05, adaptive_lr, normalization
div); SGD is ``torch.optim.SGD(momentum=0.9, foreach=True)``. Each optimizer has its
own model copy (same initial weights) and both see the same batch; their steps are
timed interleaved and the medians reported, with the optimizer.step() part alone.

Target on CPU: ProxSGD step / SGD step <= 1.05.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from typing import Callable

import torch
import torchvision
from torch import nn


from _timing import (
    add_memory_flag, check_step_args, command_line, environment_line, interleaved_medians, prepare, synchronize,
    timed,
)
from gsparsity.engine import autocast, make_scaler  # (the training scripts' mixed precision)
from proxsgd import ProxSGD, group_model_parameters

TARGET_RATIO = 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision as the scripts' --amp: bf16 where the device has it, else fp16")
    parser.add_argument("--channels-last", action="store_true", help="model and batch in channels_last")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_memory_flag(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_step_args(parser, args)
    return args


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    target: torch.Tensor,
    amp: bool = False,
    optimizer_seconds: list[float | tuple[torch.cuda.Event, torch.cuda.Event]] | None = None,
) -> Callable[[], None]:
    """One training step on a fixed batch, as the train loop runs it (GradScaler for fp16 AMP).

    When ``optimizer_seconds`` is given, the time of each ``optimizer.step()`` is appended to
    it: seconds on CPU; on CUDA a (start, end) pair of events, read by :func:`event_seconds`
    after the run, since a synchronize around the step would keep the CPU from queueing the
    optimizer's kernels while the backward pass still runs, as it does in training.
    """
    criterion = nn.CrossEntropyLoss()
    device = images.device
    scaler = make_scaler(amp, device)

    def optimizer_step() -> None:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    def step() -> None:
        with autocast(device, amp):
            loss = criterion(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if optimizer_seconds is None:
            optimizer_step()
        elif device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            optimizer_step()
            end.record()
            optimizer_seconds.append((start, end))
        else:
            optimizer_seconds.append(timed(optimizer_step, device)[1])

    return step


def event_seconds(times: list[float | tuple[torch.cuda.Event, torch.cuda.Event]]) -> list[float]:
    """Seconds from what :func:`training_step` recorded (call after the device is synchronized)."""
    return [entry if isinstance(entry, float) else entry[0].elapsed_time(entry[1]) / 1e3 for entry in times]


def search_optimizer(model: nn.Module) -> ProxSGD:
    """ProxSGD with the search's defaults (see gsparsity/cli.py)."""
    groups = group_model_parameters(model, mu=0.05, scope="conv12", layer_adaptive=True)
    return ProxSGD(groups, lr=1e-3, momentum=0.9, adaptive_lr=True, normalization="div")


def synthetic_batch(batch_size: int, image_size: int, device: torch.device,
                    num_classes: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    return images, torch.randint(num_classes, (batch_size,), device=device)


def report(medians: dict[str, float], optimizer_medians: dict[str, float], args: argparse.Namespace) -> str:
    ratio = medians["ProxSGD"] / medians["SGD"]
    lines = [
        f"command: {command_line()}",
        environment_line(args),
        f"resnet50, batch {args.batch_size}, {args.image_size}x{args.image_size}, amp {args.amp}, "
        f"channels_last {args.channels_last}; median of {args.repeats} interleaved steps after "
        f"{args.warmup} warm-up",
        f"{'optimizer':<9} {'ms/step':>9} {'img/s':>8} {'of which optimizer.step ms':>27}",
    ]
    for name, seconds in medians.items():
        lines.append(f"{name:<9} {seconds * 1e3:>9.1f} {args.batch_size / seconds:>8.1f} "
                     f"{optimizer_medians[name] * 1e3:>27.1f}")
    verdict = "met" if ratio <= TARGET_RATIO else "NOT MET"
    lines.append(f"ProxSGD step / SGD step {ratio:.3f} (target <= {TARGET_RATIO}: {verdict})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = prepare(args)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = torchvision.models.resnet50(weights=None).to(device, memory_format=memory_format).train()
    images, target = synthetic_batch(args.batch_size, args.image_size, device)
    images = images.contiguous(memory_format=memory_format)
    proxsgd_model, sgd_model = model, copy.deepcopy(model)
    optimizer_seconds: dict[str, list] = {"ProxSGD": [], "SGD": []}  # see training_step
    steps = {
        "ProxSGD": training_step(proxsgd_model, search_optimizer(proxsgd_model), images, target, args.amp,
                                 optimizer_seconds=optimizer_seconds["ProxSGD"]),
        "SGD": training_step(sgd_model, torch.optim.SGD(sgd_model.parameters(), lr=1e-3, momentum=0.9,
                                                        foreach=True),
                             images, target, args.amp, optimizer_seconds=optimizer_seconds["SGD"]),
    }
    medians = interleaved_medians(steps, args.repeats, args.warmup, device)
    # Only the timed steps' optimizer times: drop the warm-up ones.
    synchronize(device)
    optimizer_medians = {name: statistics.median(event_seconds(times)[args.warmup:])
                         for name, times in optimizer_seconds.items()}
    print(report(medians, optimizer_medians, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput (img/s) of the search step and the retrain step, on synthetic data.

    python bench/train_throughput.py --dummy [--device cpu] [--amp] [--channels-last]
                                     [--batch-size 16] [--image-size 64] [--compile]
                                     [--threads N] [--no-keep-freed-memory] [--scope all_conv]

search:  the full ResNet-50 with ProxSGD as the search sets it up (bench/search_step.py)
retrain: a compressed ResNet-50 (random mask of ``--scope``, conv12 by default, at about half
         the MACs, as in bench/latency.py) with SGD(momentum 0.9, weight decay 1e-4), as the
         retrain runs it
With ``--compile`` each also runs as ``torch.compile(model)`` (the optimizer step stays
eager): the first compiled step, which compiles forward and backward, is reported on
its own, then eager and compiled steps are timed interleaved, so the steady-state
img/s with and without compile come from the same run.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Callable

import torch
import torchvision
from torch import nn


from _timing import (
    add_memory_flag, check_step_args, command_line, environment_line, interleaved_medians, prepare, timed,
)
from latency import THRESHOLD, keep_ratio_for_macs, with_random_pruned_filters
from search_step import search_optimizer, synthetic_batch, training_step
from gsparsity.compression import compress_model
from gsparsity.masks import compute_mask
from gsparsity.structure import SCOPES

RETRAIN_MACS_SHARE = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dummy", action="store_true",
                        help="synthetic data (required: the bench times the steps, not the data loading)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision as the scripts' --amp: bf16 where the device has it, else fp16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    parser.add_argument("--scope", choices=SCOPES, default="conv12", help="the retrained model's mask")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per candidate")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_memory_flag(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.dummy:
        parser.error("only synthetic data is supported: pass --dummy")
    check_step_args(parser, args)
    return args


def retrain_model(full: nn.Module, image_size: int, seed: int, scope: str = "conv12") -> nn.Module:
    """A compressed copy of ``full`` with a random ``scope`` mask at about half its MACs."""
    ratio = keep_ratio_for_macs(full, RETRAIN_MACS_SHARE, image_size, seed, scope)
    sparse = with_random_pruned_filters(full, ratio, scope, seed)
    return compress_model(sparse, compute_mask(sparse, THRESHOLD, scope), scope, arch="resnet50")


def retrain_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)


def build_steps(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], None]]:
    """{name: one training step} for search and retrain, eager, and compiled with --compile."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    full = torchvision.models.resnet50(weights=None)
    models = {"search": full, "retrain": retrain_model(full, args.image_size, args.seed, args.scope)}
    optimizers = {"search": search_optimizer, "retrain": retrain_optimizer}
    images, target = synthetic_batch(args.batch_size, args.image_size, device)
    images = images.contiguous(memory_format=memory_format)
    steps = {}
    for name, model in models.items():
        variants = {"eager": copy.deepcopy(model)}
        if args.compile:
            variants["compiled"] = copy.deepcopy(model)
        for variant, copied in variants.items():
            copied = copied.to(device, memory_format=memory_format).train()
            optimizer = optimizers[name](copied)  # built on the plain model: compile wraps, not copies
            runnable = torch.compile(copied) if variant == "compiled" else copied
            steps[f"{name} {variant}"] = training_step(runnable, optimizer, images, target, args.amp)
    return steps


def report(medians: dict[str, float], compile_seconds: dict[str, float], args: argparse.Namespace) -> str:
    lines = [
        f"command: {command_line()}",
        environment_line(args),
        f"batch {args.batch_size}, {args.image_size}x{args.image_size}, amp {args.amp}, "
        f"channels_last {args.channels_last}, retrain mask {args.scope}; median of {args.repeats} interleaved steps "
        f"after {args.warmup} warm-up",
        f"{'step':<18} {'ms/step':>9} {'img/s':>8}",
    ]
    for name, seconds in medians.items():
        lines.append(f"{name:<18} {seconds * 1e3:>9.1f} {args.batch_size / seconds:>8.1f}")
    for name, seconds in compile_seconds.items():
        speedup = medians[f"{name} eager"] / medians[f"{name} compiled"]
        lines.append(f"{name}: first compiled step (compiles forward and backward) {seconds:.1f} s; "
                     f"steady state compiled / eager img/s {speedup:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = prepare(args)
    steps = build_steps(args, device)
    compile_seconds = {name.rpartition(" ")[0]: timed(step, device)[1]
                       for name, step in steps.items() if name.endswith(" compiled")}
    medians = interleaved_medians(steps, args.repeats, args.warmup, device)
    print(report(medians, compile_seconds, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

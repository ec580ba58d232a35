"""Retrain step of an all_conv model: torch's index_add against add_at_channels for the residual add.

    python bench/residual_add.py [--channels-last] [--batch-size 16] [--image-size 64] [--threads N]

An all_conv block adds its narrow branch into the full-width residual at the kept
channels. torch's ``identity.index_add(1, channels, branch)`` returns that sum
contiguous, and its gradient for ``branch`` too, whatever the inputs' layout;
``pruned_resnet.add_at_channels`` keeps both in their inputs' layout. Both forms train
a copy of the same compressed ResNet-50 (random all_conv mask at about half the MACs,
SGD as the retrain runs it), their steps interleaved in one run.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Callable

import torch
import torchvision


from _timing import (
    add_memory_flag, check_step_args, command_line, environment_line, interleaved_medians, prepare,
)
from search_step import synthetic_batch, training_step
from train_throughput import retrain_model, retrain_optimizer
from gsparsity import pruned_resnet


def torch_index_add(identity: torch.Tensor, channels: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    return identity.index_add(1, channels, branch)


FORMS = {"torch index_add": torch_index_add, "add_at_channels": pruned_resnet.add_at_channels}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per form")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per form first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    add_memory_flag(parser)
    args = parser.parse_args(argv)
    check_step_args(parser, args)
    return args


def build_steps(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], None]]:
    """{form: one retrain step with the blocks adding their branch that way}."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    small = retrain_model(torchvision.models.resnet50(weights=None), args.image_size, args.seed, "all_conv")
    images, target = synthetic_batch(args.batch_size, args.image_size, device)
    images = images.contiguous(memory_format=memory_format)
    steps = {}
    for name, form in FORMS.items():
        model = copy.deepcopy(small).to(device, memory_format=memory_format).train()
        step = training_step(model, retrain_optimizer(model), images, target)

        def with_form(step: Callable[[], None] = step, form: Callable = form) -> None:
            pruned_resnet.add_at_channels = form  # what PrunedResidualBlock.forward calls
            step()

        steps[name] = with_form
    return steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = prepare(args)
    medians = interleaved_medians(build_steps(args, device), args.repeats, args.warmup, device)
    print(f"command: {command_line()}")
    print(environment_line(args))
    print(f"resnet50 all_conv, random mask at about half the MACs; batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}, channels_last {args.channels_last}; "
          f"median of {args.repeats} interleaved steps after {args.warmup} warm-up")
    print(f"{'residual add':<18} {'ms/step':>9} {'img/s':>8}")
    for name, seconds in medians.items():
        print(f"{name:<18} {seconds * 1e3:>9.1f} {args.batch_size / seconds:>8.1f}")
    ratio = medians["torch index_add"] / medians["add_at_channels"]
    print(f"torch index_add step / add_at_channels step {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

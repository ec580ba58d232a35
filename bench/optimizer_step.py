"""Time one optimizer step of ProxSGD against Adam and SGD on a torchvision ResNet-50.

Every parameter gets a random gradient once; then the three optimizers' ``.step()``
calls are timed interleaved (ProxSGD, Adam, SGD, ProxSGD, ...) so that drifts in
machine load hit all of them alike, and the median of the repeats is reported.

    python bench/optimizer_step.py --device cpu --repeats 20 [--channels-last]
"""
from __future__ import annotations

import argparse
import sys

import torch
from torchvision.models import resnet50


from _timing import add_memory_flag, command_line, environment_line, interleaved_medians, prepare
from proxsgd import ProxSGD, group_model_parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--channels-last", action="store_true",
                        help="conv weights (so gradients and optimizer state) in channels_last")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    add_memory_flag(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    return args


def model_with_random_grads(device: torch.device, channels_last: bool) -> torch.nn.Module:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = resnet50(weights=None).to(device, memory_format=memory_format)
    for param in model.parameters():
        param.grad = torch.randn_like(param)  # in the param's layout
    return model


def build_optimizers(device: torch.device, channels_last: bool = False) -> dict[str, torch.optim.Optimizer]:
    """Each optimizer on its own model copy, so that one's updates never feed another."""
    proxsgd_model = model_with_random_grads(device, channels_last)
    return {
        "ProxSGD": ProxSGD(
            group_model_parameters(proxsgd_model, mu=0.05, scope="conv12"),
            lr=0.01,
            adaptive_lr=True,
            normalization="div",
        ),
        "Adam": torch.optim.Adam(model_with_random_grads(device, channels_last).parameters(), lr=1e-3,
                                 foreach=True),
        "SGD": torch.optim.SGD(
            model_with_random_grads(device, channels_last).parameters(), lr=0.01, momentum=0.9, foreach=True
        ),
    }


def median_step_ms(optimizers: dict[str, torch.optim.Optimizer], repeats: int, warmup: int,
                   device: torch.device) -> dict[str, float]:
    steps = {name: optimizer.step for name, optimizer in optimizers.items()}
    medians = interleaved_medians(steps, repeats, warmup, device)
    return {name: seconds * 1e3 for name, seconds in medians.items()}


def report(medians: dict[str, float], args: argparse.Namespace) -> str:
    lines = [
        "command: " + command_line(),
        environment_line(args),
        f"repeats {args.repeats}, warmup {args.warmup}, channels_last {args.channels_last}",
        f"{'optimizer':<10} {'median ms/step':>15}",
    ]
    lines += [f"{name:<10} {ms:>15.2f}" for name, ms in medians.items()]
    lines.append(f"ProxSGD/Adam {medians['ProxSGD'] / medians['Adam']:.2f}")
    lines.append(f"ProxSGD/SGD  {medians['ProxSGD'] / medians['SGD']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = prepare(args)
    optimizers = build_optimizers(device, args.channels_last)
    print(report(median_step_ms(optimizers, args.repeats, args.warmup, device), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

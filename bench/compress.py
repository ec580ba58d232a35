"""Time mask + build + transfer of a ResNet-50 with about half its filters pruned.

    python bench/compress.py [--repeats 7] [--arch resnet50] [--threads N] [--no-keep-freed-memory]

Target: under 0.5 s on a CPU for each scope. Prints the median over the repeats of
compute_mask, build_pruned_resnet and transfer_model_parameters (and their total),
for a random conv12 mask and a random all_conv mask, each at ~50% filters kept.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torchvision


from _timing import add_memory_flag, command_line, environment_line, prepare, timed
from gsparsity.compression import transfer_model_parameters
from gsparsity.masks import compute_mask
from gsparsity.pruned_resnet import build_pruned_resnet
from gsparsity.structure import prunable_convs

TARGET_SECONDS = 0.5


def sparse_model(arch: str, scope: str) -> torch.nn.Module:
    """A full model in which a random half of the prunable filters are zero."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    with torch.no_grad():
        for prunable in prunable_convs(model, scope):
            pruned = torch.rand(prunable.conv.out_channels) < 0.5
            prunable.conv.weight[pruned] = 0
    return model


def time_once(model: torch.nn.Module, arch: str, scope: str) -> dict[str, float]:
    timings = {}
    mask, timings["mask"] = timed(lambda: compute_mask(model, scope=scope))
    small, timings["build"] = timed(lambda: build_pruned_resnet(arch, mask, scope))
    _, timings["transfer"] = timed(lambda: transfer_model_parameters(model, small, mask, scope))
    timings["total"] = sum(timings.values())
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    add_memory_flag(parser)
    parser.set_defaults(device="cpu", seed=0)  # what prepare() reads; sparse_model seeds itself
    args = parser.parse_args()
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be >= 1")
    prepare(args)
    print("command: " + command_line())
    print(environment_line(args) + f", median of {args.repeats} repeats")
    for scope in ("conv12", "all_conv"):
        model = sparse_model(args.arch, scope)
        runs = [time_once(model, args.arch, scope) for _ in range(args.repeats)]
        medians = {step: statistics.median(run[step] for run in runs) for step in runs[0]}
        verdict = "ok" if medians["total"] < TARGET_SECONDS else "OVER TARGET"
        steps = ", ".join(f"{step} {seconds:.3f} s" for step, seconds in medians.items() if step != "total")
        total = medians["total"]
        print(f"{args.arch} {scope}: {total:.3f} s ({steps}); target < {TARGET_SECONDS} s: {verdict}")


if __name__ == "__main__":
    main()

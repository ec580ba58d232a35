"""Eval latency of the full and the compressed ResNet, next to their MACs ratio.

    python bench/latency.py [--device cpu] [--batch-sizes 1 32] [--image-size 224] [--repeats 5]
                            [--mask FILE] [--round-to 8] [--floor] [--compile] [--jit] [--amp]
                            [--profile] [--threads N] [--no-keep-freed-memory]

Compressed models: always a random conv12 mask at about half the MACs (the keep
ratio is found by trying a few with count_macs_params); with ``--round-to N`` also
that mask rounded by ``compute_mask(round_to=N)``; with ``--mask FILE`` the mask a
search saved (``mask_<scope>_<threshold>.json``); with ``--floor`` the narrowest model any
conv12 mask can give, one filter per prunable conv: what conv12 cannot narrow (stem,
downsample convs, conv3's full-width output, residual adds, pooling) runs alone there, so its
latency bounds the speedup of every conv12 mask. The full model is ``--mask``'s
architecture, or ResNet-50; weights are random (latency does not depend on them).

Every model runs under ``torch.inference_mode`` in these forms:
  plain      the eval-mode model as ``compress_model`` returns it, contiguous input
  fused      ``gsparsity.inference.inference_form``: BatchNorm folded into the convs,
             contiguous; ``fused-cl`` the same in channels_last
  compiled   (``--compile``) fused-cl through ``torch.compile`` with inductor's
             ``freezing`` (weights constant-folded and prepacked, conv+ReLU and
             add+ReLU fused); compiled once per batch size, compile time reported
  jit        (``--jit``) fused, traced, frozen and ``optimize_for_inference``
  amp-cl     (``--amp``) fused-cl with weights and input in the scripts' ``--amp`` dtype
             (bf16 on CPUs and GPUs from Ampere on, else fp16); with ``--compile`` also
             ``amp-compiled``, that form compiled as above
"inference" is the fastest of the fused forms. All models and forms of one batch
size are timed interleaved in one run; medians of ``--repeats`` rounds.

Target (CPU, batch 32): inference-form latency speedup >= 0.8 x the MACs reduction
factor (full MACs / compressed MACs). On a CPU that other processes share, ``--threads 1``
gives steady figures (see BENCHMARKS.md). On the CPU, freed memory is kept for reuse as
the scripts keep it (``gsparsity/cpu_memory.py``); ``--no-keep-freed-memory`` measures with
malloc's default instead.
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn


from _timing import (
    add_memory_flag, command_line, environment_line, interleaved_medians, prepare, synchronize, timed,
)
from gsparsity.complexity import count_macs_params
from gsparsity.engine import amp_dtype
from gsparsity.inference import fuse_bn, inference_form
from gsparsity.compression import compress_model
from gsparsity.masks import Mask, compute_mask, load_mask
from gsparsity.structure import prunable_convs

TARGET_EFFICIENCY = 0.8  # latency speedup / MACs reduction factor, at batch 32 on CPU
TARGET_BATCH = 32
THRESHOLD = 1e-6  # compute_mask's default: the random pruned filters sit below it
FLOOR_LABEL = "conv12 floor, 1 filter per prunable conv"
FUSED_FORMS = ("fused", "fused-cl", "compiled", "jit", "amp-cl", "amp-compiled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--mask", default=None, metavar="FILE", help="a mask_*.json saved by a search")
    parser.add_argument("--macs-share", type=float, default=0.5,
                        help="MACs of the random-mask model, as a share of the full model's")
    parser.add_argument("--round-to", type=int, default=1, metavar="N",
                        help="also time the random mask rounded to multiples of N filters")
    parser.add_argument("--floor", action="store_true",
                        help="also time the conv12 floor: every prunable conv keeps one filter")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile (inductor, freezing) of the inference form")
    parser.add_argument("--amp", action="store_true",
                        help="also time the fused-cl form in bf16 (fp16 on GPUs before Ampere)")
    parser.add_argument("--jit", action="store_true", help="also time torch.jit freeze + optimize_for_inference")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top ops of the compressed model's inference form")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_memory_flag(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.warmup < 0 or args.round_to < 1:
        parser.error("--batch-sizes, --repeats and --round-to must be >= 1, --warmup >= 0")
    if not 0 < args.macs_share < 1:
        parser.error("--macs-share must be in (0, 1)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    return args


# ------------------------------------------------------------------ the models


def with_random_pruned_filters(full: nn.Module, keep_ratio: float, scope: str, seed: int) -> nn.Module:
    """A copy of ``full`` in which every prunable conv keeps ``keep_ratio`` of its filters.

    The others get a tiny random norm under the mask threshold, as a search leaves
    them, so that ``compute_mask(round_to=N)`` has norms to choose the extra ones by.
    """
    generator = torch.Generator().manual_seed(seed)
    sparse = copy.deepcopy(full)
    with torch.no_grad():
        for prunable in prunable_convs(sparse, scope):
            width = prunable.conv.out_channels
            kept = torch.randperm(width, generator=generator)[: max(1, round(keep_ratio * width))]
            scales = torch.rand(width, generator=generator) * 1e-8
            scales[kept] = 1.0
            prunable.conv.weight.mul_(scales.view(-1, 1, 1, 1).to(prunable.conv.weight))
    return sparse


def macs_share(full: nn.Module, sparse: nn.Module, mask: Mask, scope: str, image_size: int) -> float:
    small = compress_model(sparse, mask, scope)
    return count_macs_params(small, image_size)[0] / count_macs_params(full, image_size)[0]


def keep_ratio_for_macs(full: nn.Module, share: float, image_size: int, seed: int, scope: str = "conv12") -> float:
    """The keep ratio whose random ``scope`` mask comes closest to ``share`` of the MACs (bisection)."""
    low, high = 0.05, 1.0
    for _ in range(6):  # the MACs grow monotonically with the ratio; 6 halvings: +-0.015
        middle = (low + high) / 2
        sparse = with_random_pruned_filters(full, middle, scope, seed)
        if macs_share(full, sparse, compute_mask(sparse, THRESHOLD, scope), scope, image_size) < share:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def compressed_models(full: nn.Module, args: argparse.Namespace) -> dict[str, nn.Module]:
    """{label: compressed model} for every mask this run compares."""
    ratio = keep_ratio_for_macs(full, args.macs_share, args.image_size, args.seed)
    sparse = with_random_pruned_filters(full, ratio, "conv12", args.seed)
    label = f"random conv12, keep {ratio:.2f}"
    models = {label: compress_model(sparse, compute_mask(sparse, THRESHOLD, "conv12"), "conv12")}
    if args.round_to > 1:
        rounded = compute_mask(sparse, THRESHOLD, "conv12", round_to=args.round_to)
        models[f"{label}, round-to {args.round_to}"] = compress_model(sparse, rounded, "conv12")
    if args.floor:
        narrowest = with_random_pruned_filters(full, 0.0, "conv12", args.seed)  # keeps max(1, 0) filters
        models[FLOOR_LABEL] = compress_model(
            narrowest, compute_mask(narrowest, THRESHOLD, "conv12"), "conv12")
    if args.mask:
        mask, info = load_mask(args.mask)
        models[f"mask {Path(args.mask).name} ({info['scope']})"] = compress_model(full, mask, info["scope"])
    return {name: model.eval() for name, model in models.items()}


# ------------------------------------------------------------------ the forms


def jit_form(model: nn.Module, images: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fused, traced, frozen and optimized for inference (oneDNN layouts on CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; it is measured, not relied on
        traced = torch.jit.trace(fuse_bn(model), images)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def compiled_form(form: nn.Module, images: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """(an inference form compiled by inductor with freezing, seconds the compile took)."""
    from torch._inductor import config as inductor_config  # imported here: only --compile needs it

    compiled = torch.compile(form, dynamic=False)
    # freezing treats the weights as constants: folded, prepacked for oneDNN, fused with what follows.
    with inductor_config.patch(freezing=True):
        _, seconds = timed(lambda: compiled(images), images.device)  # the first call compiles
    return compiled, seconds


def candidates_for(
    models: dict[str, nn.Module], images: torch.Tensor, args: argparse.Namespace
) -> tuple[dict[tuple[str, str], Callable[[], object]], dict[str, float]]:
    """({(model label, form): call running one batch}, {model label: compile seconds})."""
    channels_last_images = images.contiguous(memory_format=torch.channels_last)
    amp_images = channels_last_images.to(amp_dtype(images.device))
    candidates, compile_seconds = {}, {}
    for label, model in models.items():
        fused = inference_form(model, channels_last=False)
        fused_cl = inference_form(model, channels_last=True)
        candidates[(label, "plain")] = lambda model=model: model(images)
        candidates[(label, "fused")] = lambda model=fused: model(images)
        candidates[(label, "fused-cl")] = lambda model=fused_cl: model(channels_last_images)
        if args.compile:
            compiled, compile_seconds[label] = compiled_form(fused_cl, channels_last_images)
            candidates[(label, "compiled")] = lambda model=compiled: model(channels_last_images)
        if args.amp:
            amp_cl = inference_form(model, channels_last=True).to(amp_images.dtype)
            candidates[(label, "amp-cl")] = lambda model=amp_cl: model(amp_images)
        if args.amp and args.compile:
            compiled, compile_seconds[f"{label}, amp"] = compiled_form(amp_cl, amp_images)
            candidates[(label, "amp-compiled")] = lambda model=compiled: model(amp_images)
        if args.jit:
            frozen = jit_form(model, images)
            candidates[(label, "jit")] = lambda model=frozen: model(images)
    return candidates, compile_seconds


# ------------------------------------------------------------------ the report


def column_width(form: str) -> int:
    return max(11, len(form) + 3)


def report_batch(
    batch: int, medians: dict[tuple[str, str], float], macs: dict[str, int], args: argparse.Namespace
) -> list[str]:
    """One table per batch size; the target verdict at batch 32."""
    labels = list(macs)
    full_label = labels[0]
    forms = [form for form in ("plain", *FUSED_FORMS) if (full_label, form) in medians]
    best = {label: min((medians[(label, form)], form) for form in forms if form != "plain") for label in labels}
    lines = [
        f"batch {batch} at {args.image_size}x{args.image_size}: median ms per batch, "
        f"{args.repeats} interleaved rounds",
        f"{'model':<44} {'GMac':>5} {'MACs x':>6} "
        + " ".join(f"{form + ' ms':>{column_width(form)}}" for form in forms)
        + f" {'plain spd':>9} {'infer spd':>9} {'infer form':>12} {'spd/MACs x':>10}",
    ]
    for label in labels:
        reduction = macs[full_label] / macs[label]
        plain_speedup = medians[(full_label, "plain")] / medians[(label, "plain")]
        inference_speedup = best[full_label][0] / best[label][0]
        times = " ".join(f"{medians[(label, form)] * 1e3:>{column_width(form)}.1f}" for form in forms)
        lines.append(
            f"{label:<44} {macs[label] / 1e9:>5.2f} {reduction:>6.2f} {times} {plain_speedup:>9.2f} "
            f"{inference_speedup:>9.2f} {best[label][1]:>12} {inference_speedup / reduction:>10.2f}"
        )
    speedup = {label: best[full_label][0] / best[label][0] for label in labels}
    masks = [label for label in labels[1:] if label != FLOOR_LABEL]
    if batch == TARGET_BATCH:
        for label in masks:
            efficiency = speedup[label] / (macs[full_label] / macs[label])
            verdict = "met" if efficiency >= TARGET_EFFICIENCY else "NOT MET"
            lines.append(f"target at batch {batch}, {label}: inference speedup / MACs reduction "
                         f"{efficiency:.3f} >= {TARGET_EFFICIENCY}: {verdict}")
    if FLOOR_LABEL in speedup:
        for label in masks:
            needed = TARGET_EFFICIENCY * macs[full_label] / macs[label]
            lines.append(f"floor: the narrowest conv12 model is {speedup[FLOOR_LABEL]:.2f}x faster here; "
                         f"{label} is {speedup[label]:.2f}x, the target asks {needed:.2f}x")
    return lines


def profile_tables(model: nn.Module, images: torch.Tensor, channels_last: bool, rows: int = 12) -> str:
    """torch.profiler's ops by self time over two batches of ``model``'s inference form,
    then the same split by input shapes (which convolutions the time goes to)."""
    form = inference_form(model, channels_last=channels_last)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    form(images)  # warm up outside the profile
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if images.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort_by = "self_device_time_total"
    with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
        for _ in range(2):
            form(images)
        synchronize(images.device)
    by_op = profiler.key_averages().table(sort_by=sort_by, row_limit=rows)
    by_shape = profiler.key_averages(group_by_input_shape=True).table(
        sort_by=sort_by, row_limit=rows, max_name_column_width=28, max_shapes_column_width=60
    )
    return f"{by_op}\n{by_shape}"


def fastest_layout_is_channels_last(medians: dict[tuple[str, str], float], label: str) -> bool:
    return medians[(label, "fused-cl")] < medians[(label, "fused")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = prepare(args)
    arch = load_mask(args.mask)[1]["arch"] if args.mask else "resnet50"
    full = torchvision.models.get_model(arch, weights=None).to(device).eval()
    print(f"command: {command_line()}")
    print(environment_line(args))
    models = {f"full {arch}": full, **compressed_models(full, args)}
    macs = {label: count_macs_params(model, args.image_size)[0] for label, model in models.items()}
    with torch.inference_mode():
        for batch in args.batch_sizes:
            images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
            candidates, compile_seconds = candidates_for(models, images, args)
            medians = interleaved_medians(candidates, args.repeats, args.warmup, device)
            print("\n".join(report_batch(batch, medians, macs, args)))
            if compile_seconds:
                print("compile seconds: " + ", ".join(f"{label} {seconds:.0f}"
                                                      for label, seconds in compile_seconds.items()))
        if args.profile:  # the last batch size's medians pick the layout
            label = list(models)[1]
            channels_last = fastest_layout_is_channels_last(medians, label)
            print(f"profile: {label}, inference form ({'channels_last' if channels_last else 'contiguous'}), "
                  f"batch {batch}, two batches")
            print(profile_tables(models[label], images, channels_last))
    return 0


if __name__ == "__main__":
    sys.exit(main())

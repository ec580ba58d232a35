"""Timing helpers shared by the benches: interleaved repeats, medians, a header line.

The load of a shared machine drifts (other processes, clock frequency), so a bench
compares its candidates within ONE run: every repeat calls each candidate once, in
turn, and each candidate's median is reported. Ratios of those medians are the
figures worth quoting; absolute times from different runs are not comparable.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

from gsparsity.cpu_memory import keep_freed_memory

Result = TypeVar("Result")


def synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Result], device: torch.device | None = None) -> tuple[Result, float]:
    """(what ``call()`` returns, seconds it took), the device's queue drained on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = call()
    synchronize(device)
    return result, time.perf_counter() - start


def interleaved_samples(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | None = None,
) -> dict[str, list[float]]:
    """{name: seconds of each timed call}: ``warmup`` untimed rounds, then ``repeats`` timed ones.

    A round calls every candidate once, in the order given, so that drifts in machine
    load hit all of them alike.
    """
    for _ in range(warmup):
        for call in candidates.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, call in candidates.items():
            samples[name].append(timed(call, device)[1])
    return samples


def interleaved_medians(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | None = None,
) -> dict[str, float]:
    """{name: median seconds per call} of ``interleaved_samples``."""
    samples = interleaved_samples(candidates, repeats, warmup, device)
    return {name: statistics.median(seconds) for name, seconds in samples.items()}


def command_line() -> str:
    """The command that started this bench, as the user would type it."""
    return " ".join([Path(sys.executable).name] + sys.argv)


def environment_line(args: argparse.Namespace) -> str:
    """Date, torch version, device, CPU threads and malloc's setting (after ``prepare(args)``):
    what a figure needs next to it."""
    today = datetime.date.today().isoformat()
    device = args.device
    memory = "freed memory kept" if args.freed_memory_kept else "malloc's default"
    return f"{today}, torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, {memory}"


def add_memory_flag(parser: argparse.ArgumentParser) -> None:
    """--keep-freed-memory / --no-keep-freed-memory: whether the CPU runs as the scripts run it."""
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="keep freed CPU memory for reuse, as the scripts do on the CPU (glibc malloc; "
                             "gsparsity/cpu_memory.py); --no-keep-freed-memory measures malloc's default")


def check_step_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, as argparse does (one usage line, exit 2), sizes below 1 and a CUDA device
    that is not there: the checks of the benches that time training steps."""
    if min(args.batch_size, args.image_size, args.repeats) < 1 or args.warmup < 0:
        parser.error("--batch-size, --image-size and --repeats must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")


def prepare(args: argparse.Namespace) -> torch.device:
    """Apply a bench's --threads, --seed and --keep-freed-memory (whether it took effect goes
    to ``args.freed_memory_kept``); the device it runs on (from --device)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # as the scripts do on the CPU; the setting holds for the whole process
    wanted = args.device == "cpu" and getattr(args, "keep_freed_memory", False)
    args.freed_memory_kept = wanted and keep_freed_memory()
    torch.manual_seed(args.seed)  # the weights and batches only: cuDNN may pick its fastest algorithms
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # as the training scripts without --seed
    return torch.device(args.device)

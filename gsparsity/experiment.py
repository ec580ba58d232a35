"""The experiment folder: its name, run_info.json, _log.txt and TensorBoard events.

Only rank 0 writes; the folder name is decided on rank 0 and broadcast.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text
from .distributed import DistContext, broadcast_object
from .errors import UserError

RUN_INFO = "run_info.json"
LOG_FILE = "_log.txt"
log = logging.getLogger("gsparsity")


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class FolderSettings:
    """Where a run's files go: ``--path_to_save``, ``--run_id``, ``--resume``, ``--evaluate``."""

    path_to_save: str = "experiments"
    run_id: str | None = None  # suffix of a new folder's name
    resume: str | None = None  # the folder of the run to go on with
    evaluate: bool = False  # a fresh --evaluate writes nothing

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "FolderSettings":
        return cls(path_to_save=args.path_to_save, run_id=args.run_id, resume=args.resume, evaluate=args.evaluate)


def create_experiment_dir(settings: FolderSettings, name: str, ctx: DistContext) -> Path:
    """Make ``<path_to_save>/<name>[_<run_id>]``; never reuse an existing folder."""
    folder = None
    if ctx.is_main:
        if settings.run_id:
            name = f"{name}_{settings.run_id}"
        folder = Path(settings.path_to_save) / name
        in_the_way = next((path for path in (folder.parent, *folder.parent.parents) if path.is_file()), None)
        try:
            if in_the_way is not None:
                folder = f"error: --path_to_save {settings.path_to_save}: {in_the_way} is a file, not a folder"
            else:
                folder.parent.mkdir(parents=True, exist_ok=True)
                folder.mkdir()
        except FileExistsError:
            folder = f"error: experiment folder {folder} already exists; it is never overwritten " \
                     f"(use --resume {folder} to continue it, or another --run_id)"
        except OSError as error:
            folder = f"error: cannot create experiment folder {folder}: {error.strerror}"
    folder = broadcast_object(str(folder))
    if folder.startswith("error: "):
        raise UserError(folder[len("error: "):])
    return Path(folder)


def write_run_info(folder: Path, args: argparse.Namespace, script: str, extra: dict[str, Any]) -> None:
    info = {"script": script, "argv": sys.argv[1:], "args": vars(args), **extra}
    atomic_write_text(folder / RUN_INFO, json.dumps(info, indent=2, default=str) + "\n")


def read_run_info(folder: Path, script: str | None = None) -> dict[str, Any]:
    """``folder``'s run_info.json; with ``script``, refused unless that script made the run
    (another script's checkpoint would not fit its model or optimizer, or would be replaced)."""
    path = Path(folder) / RUN_INFO
    if not Path(folder).is_dir():
        raise UserError(f"--resume {folder}: no such experiment folder")
    if not path.is_file():
        raise UserError(f"--resume {folder}: no {RUN_INFO} in it, so it is not an experiment folder")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"--resume {folder}: {RUN_INFO} is unreadable ({error})") from None
    if not isinstance(info, dict) or not isinstance(info.get("args"), dict):
        raise UserError(f"--resume {folder}: {RUN_INFO} has no 'args' record")
    if script is not None and info.get("script", script) != script:
        raise UserError(f"--resume {folder}: this is a run of {info['script']}; continue it with that script")
    return info


class EarlyRecords(logging.Handler):
    """Keeps what a workflow logs before its experiment folder exists (the folder is made
    only once the inputs have been checked), for _log.txt to start with."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def start_logging(ctx: DistContext) -> None:
    """Log to stdout at once; _log.txt gets these lines too when ``open_experiment`` makes it."""
    setup_logging(None, ctx)
    log.addHandler(EarlyRecords())


def setup_logging(folder: Path | None, ctx: DistContext) -> None:
    """Rank 0 logs INFO to stdout and _log.txt; other ranks only warnings."""
    early = [handler for handler in log.handlers if isinstance(handler, EarlyRecords)]
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if ctx.is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if folder is not None and ctx.is_main:
        to_file = logging.FileHandler(folder / LOG_FILE)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        for record in (record for handler in early for record in handler.records):
            to_file.handle(record)
        log.addHandler(to_file)


METRICS_FILE = "metrics.jsonl"


class Scalars:
    """An epoch's figures, on rank 0 (nothing elsewhere): TensorBoard scalars as they come, and one
    line of ``metrics.jsonl`` per epoch, ``{"epoch": N, tag: value, ...}``, when the epoch ends
    (a resumed run appends; a reader keeps the last record of an epoch)."""

    def __init__(self, folder: Path | None, ctx: DistContext) -> None:
        self.writer = None
        self.metrics_file = None
        self.pending: dict[int, dict[str, float]] = {}
        if ctx.is_main and folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder))
            self.metrics_file = folder / METRICS_FILE

    def add(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)
            self.pending.setdefault(step, {})[tag] = float(value)

    def add_group(self, tag: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalars(tag, values, step)
            self.pending.setdefault(step, {}).update({f"{tag}/{key}": float(value) for key, value in values.items()})

    def write_epoch(self, epoch: int) -> None:
        """Append the epoch's record (with anything added at earlier steps and not yet written)."""
        if self.metrics_file is None:
            return
        record = {"epoch": epoch}
        for step in sorted(step for step in self.pending if step <= epoch):
            record.update(self.pending.pop(step))
        with open(self.metrics_file, "a") as file:
            file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def open_experiment(settings: FolderSettings, ctx: DistContext, name: str, script: str) -> Path | None:
    """The folder of this run (made by ``script``): the resumed one, a new one, or none for --evaluate."""
    if settings.resume:
        folder = Path(settings.resume)
        read_run_info(folder, script)
    elif settings.evaluate:
        folder = None
    else:
        folder = create_experiment_dir(settings, name, ctx)
    setup_logging(folder, ctx)
    return folder

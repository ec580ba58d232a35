"""Entry point of every top-level script: flags, processes, and clean errors.

``main(kind, workflow)`` parses and checks the flags (reading them back from
``run_info.json`` on ``--resume``), starts one process per GPU when needed, and
turns a :class:`UserError` into one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

import torch.multiprocessing as mp

from . import distributed
from .cli import build_parser, explicit_flags, validate_args
from .distributed import DistContext
from .errors import UserError
from .experiment import read_run_info

Workflow = Callable[[argparse.Namespace, DistContext], None]
EXIT_USER_ERROR = 2
# Flags a resumed run may change; everything else comes back from run_info.json.
RESUME_OVERRIDES = {
    "resume", "epochs", "workers", "print_freq", "device", "gpu", "dist_url", "dist_backend",
    "world_size", "rank", "dist_timeout", "register", "registry", "evaluate",
}


def parse_args(kind: str, argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser(kind)
    args = parser.parse_args(argv)
    if args.resume is not None:
        stored = read_run_info(args.resume)["args"]
        typed = explicit_flags(parser, argv)
        ignored = sorted(typed - RESUME_OVERRIDES)
        if ignored:
            raise UserError(f"--resume continues a run with its own settings; these flags cannot "
                            f"change: --{', --'.join(ignored)}")
        for key, value in stored.items():
            if key not in typed and hasattr(args, key):
                setattr(args, key, value)
    return args


def run_worker(local_index: int | None, workflow: Workflow, args: argparse.Namespace) -> None:
    ctx = distributed.setup(args, local_index)
    try:
        workflow(args, ctx)
    finally:
        distributed.cleanup()


def spawned_worker(local_index: int, workflow: Workflow, args: argparse.Namespace) -> None:
    try:
        run_worker(local_index, workflow, args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def main(kind: str, workflow: Workflow, argv: Sequence[str] | None = None) -> None:
    prog = os.path.basename(sys.argv[0])
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(kind, argv)
        validate_args(args, kind)
        processes = distributed.processes_to_spawn(args)
        if processes > 1:
            distributed.prepare_spawn(args, processes)
            try:
                mp.spawn(spawned_worker, args=(workflow, args), nprocs=processes)
            except mp.ProcessExitedException as failure:
                sys.exit(failure.exit_code if failure.exit_code > 0 else 1)
        else:
            run_worker(None, workflow, args)
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)

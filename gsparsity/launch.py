"""Entry point of every top-level script: flags, processes, and clean errors.

``main(kind, workflow)`` parses and checks the flags (reading them back from
``run_info.json`` on ``--resume``), starts one process per GPU when needed, and
turns a :class:`UserError` into one line on stderr and exit status 2.

Exit statuses: 0 done; 2 bad input (one line on stderr, nothing overwritten);
75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (continue with ``--resume``);
1 a process group failure (e.g. another process died); 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from types import FrameType
from typing import Callable, Iterator, Sequence

import torch.multiprocessing as mp

from . import distributed
from .cli import build_parser, explicit_flags, validate_args
from .distributed import DistContext, ProcessGroupFailure, is_transport_failure
from .errors import UserError
from .experiment import read_run_info
from .stopping import EXIT_PREEMPTED, STOP_SIGNALS, Preempted, catching_stop_signals

WorkflowFunction = Callable[[argparse.Namespace, DistContext], None]  # e.g. search.search
EXIT_USER_ERROR = 2
EXIT_PROCESS_GROUP = 1
# Flags a resumed run may change; everything else comes back from run_info.json.
RESUME_OVERRIDES = {
    "resume", "epochs", "workers", "print_freq", "device", "gpu", "dist_url", "dist_backend",
    "world_size", "rank", "dist_timeout", "register", "registry", "evaluate",
    "checkpoint_every", "skip_nonfinite", "bad_images", "compile",
}
# Defaults that changed: a run whose run_info.json predates the change (has no such key)
# resumes with the default it started under.
FORMER_DEFAULTS = {"budget_ranking": "global"}
# Settings renamed since: {workflow: {name in older run_info.json files: name now}}.
FORMER_NAMES = {"search": {"weight_decay": "mu"}}
# Where a run executes comes from the command that resumes it, never from run_info.json:
# a stored --gpu could not be cleared again, and the --rank and --world-size of the node
# that wrote the file would make the other nodes, or fewer of them, wait for peers forever.
LAUNCH_FLAGS = {"device", "gpu", "dist_url", "dist_backend", "world_size", "rank"}


def parse_args(kind: str, argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser(kind)
    args = parser.parse_args(argv)
    if args.resume is not None:
        stored = renamed(read_run_info(args.resume)["args"], FORMER_NAMES.get(kind, {}))
        typed = explicit_flags(parser, argv)
        ignored = sorted(typed - RESUME_OVERRIDES)
        if ignored:
            raise UserError(f"--resume continues a run with its own settings; these flags cannot "
                            f"change: --{', --'.join(ignored)}")
        for key, value in {**FORMER_DEFAULTS, **stored}.items():
            if key not in typed and key not in LAUNCH_FLAGS and hasattr(args, key):
                setattr(args, key, value)
        moved = [f"--{key.replace('_', '-')} {stored[key]} (now {getattr(args, key)})"
                 for key in sorted(LAUNCH_FLAGS) if key in stored and stored[key] != getattr(args, key)]
        if moved:
            print(f"note: --resume runs where this command says; the run started with "
                  f"{', '.join(moved)}", file=sys.stderr)
    return args


def renamed(stored: dict, former_names: dict[str, str]) -> dict:
    """``stored`` with the keys of an older run_info.json under their names now."""
    current = dict(stored)
    for old, new in former_names.items():
        if old in current and new not in current:
            current[new] = current.pop(old)
    return current


def run_worker(local_index: int | None, workflow: WorkflowFunction, args: argparse.Namespace,
               launch: distributed.LaunchSettings, plan: distributed.SpawnPlan | None = None) -> None:
    with catching_stop_signals():
        ctx = distributed.setup(launch, local_index, plan)
        try:
            workflow(args, ctx)
        except RuntimeError as error:
            if ctx.distributed and is_transport_failure(error):
                raise ProcessGroupFailure(first_line(error)) from error
            raise
        finally:
            distributed.cleanup()


@contextlib.contextmanager
def exit_cleanly(prefix: str) -> Iterator[None]:
    """Turn the expected ways a run ends early into one line on stderr and their exit status."""
    try:
        yield
    except UserError as error:
        print(f"{prefix}error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Preempted as stop:
        if stop.report:
            print(f"{prefix}{stop}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except ProcessGroupFailure as failure:  # e.g. another process died: its connections closed
        print(f"{prefix}{process_group_message(failure)}", file=sys.stderr)
        sys.exit(EXIT_PROCESS_GROUP)


def spawned_worker(local_index: int, workflow: WorkflowFunction, args: argparse.Namespace,
                   launch: distributed.LaunchSettings, plan: distributed.SpawnPlan) -> None:
    with exit_cleanly(prefix=f"[process {local_index}] "):
        run_worker(local_index, workflow, args, launch, plan)


def spawn_workers(workflow: WorkflowFunction, args: argparse.Namespace, launch: distributed.LaunchSettings,
                  processes: int, plan: distributed.SpawnPlan) -> None:
    """One process per GPU; a stop signal sent to this parent is passed on to them."""
    context = mp.start_processes(spawned_worker, args=(workflow, args, launch, plan), nprocs=processes,
                                 join=False, start_method="spawn")

    def forward(signum: int, frame: FrameType | None) -> None:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {number: signal.signal(number, forward) for number in STOP_SIGNALS}
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as failure:
        sys.exit(failure.exit_code if failure.exit_code > 0 else 1)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def process_group_message(failure: ProcessGroupFailure) -> str:
    return (f"error: lost contact with another process ({failure}); this one stops too; continue "
            f"from the last checkpoint with --resume")


def main(kind: str, workflow: WorkflowFunction, argv: Sequence[str] | None = None) -> None:
    prog = os.path.basename(sys.argv[0])
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with exit_cleanly(prefix=f"{prog}: "):
            args = parse_args(kind, argv)
            validate_args(args, kind)
            launch = distributed.LaunchSettings.from_args(args)
            processes = distributed.processes_to_spawn(launch)
            if processes:
                plan = distributed.prepare_spawn(launch, processes)
                spawn_workers(workflow, args, launch, processes, plan)
            else:
                run_worker(None, workflow, args, launch)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)

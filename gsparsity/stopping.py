"""When a training run must stop part-way, decided by all processes together.

Three things stop a run in the middle of an epoch:

- a stop signal: SIGTERM (``scancel``, a cluster's preemption, ``kill``) or SIGUSR1 (what
  SLURM sends ahead of the time limit with ``--signal=USR1@SECONDS``). The process
  finishes its current step, saves a checkpoint and exits with :data:`EXIT_PREEMPTED`;
- a loss that is nan or inf (unless ``--skip-nonfinite`` allows skipping that step);
- an unreadable image file with ``--bad-images stop``.

Each process notices its own trouble, but a process that stopped alone would leave the
others waiting in their next collective. So a :class:`StepGuard` combines what every
process saw with one all-reduce of three integers, at *check steps*: every step on the
CPU (a gloo all-reduce of three integers: about 0.5 ms on 2 cores), every ``--print-freq``
steps on CUDA but at least every :data:`CUDA_CHECK_EVERY_MAX` steps (there each check is
a host sync, which done every step would stall the GPU queue). A checkpoint step and an
epoch's last step are always checked, so a checkpoint never holds weights from after a
non-finite loss. Between checks a CUDA run records the first non-finite step on the
device, so the message still names the exact step.
"""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Protocol

import torch

from .distributed import DistContext, all_reduce_max
from .errors import UserError

log = logging.getLogger("gsparsity")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: "try again later", i.e. with --resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
NO_STEP = 2**62  # "no non-finite step yet"; larger than any step number
CUDA_CHECK_EVERY_MAX = 20  # a stop signal waits at most this many steps on CUDA


class ImageFiles(Protocol):
    """What the guard asks of the epoch's image files (``data.CheckedImageFolder``)."""

    def unreadable_to_stop_for(self) -> int | None: ...

    def unreadable_message(self, index: int) -> str: ...


class StopRequested(Exception):
    """Every process agreed to stop for a signal after ``steps_done`` steps of the epoch."""

    def __init__(self, steps_done: int, signal_name: str) -> None:
        super().__init__(f"{signal_name} after step {steps_done}")
        self.steps_done = steps_done
        self.signal_name = signal_name


class Preempted(Exception):
    """The run stopped for a signal and saved its checkpoint; the launcher exits with 75.

    ``report`` is true on the process that should print the message (rank 0)."""

    def __init__(self, message: str, report: bool = True) -> None:
        super().__init__(message)
        self.report = report


# --- signals ------------------------------------------------------------------------

_received: list[str] = []  # names of the stop signals this process received, in order


def _remember_signal(signum: int, frame) -> None:
    _received.append(signal.Signals(signum).name)


@contextmanager
def catching_stop_signals() -> Iterator[None]:
    """While inside, SIGTERM and SIGUSR1 only set a flag (see :func:`stop_signal_received`).

    Signal handlers can only be installed from the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _remember_signal) for number in STOP_SIGNALS}
    _received.clear()
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _received.clear()


def stop_signal_received() -> str | None:
    """The name of the first stop signal received (e.g. ``"SIGTERM"``), or None."""
    return _received[0] if _received else None


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """``worker_init_fn`` of data loader workers: a signal sent to the whole process group
    must not kill them (SIGUSR1's default action is to terminate); the main process
    decides when to stop and shuts its workers down itself."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


# --- the per-step guard -------------------------------------------------------------------

class StepGuard:
    """Watches every training step; at check steps, all processes decide together whether to stop."""

    def __init__(self, ctx: DistContext, check_every: int, skip_nonfinite: int = 0) -> None:
        self.ctx = ctx
        self.check_every = check_every
        self.skip_nonfinite = skip_nonfinite
        self.skipped_nonfinite = 0  # over the whole run, against the --skip-nonfinite budget
        self.epoch = 0
        self.total_steps = 0
        self.first_nonfinite = torch.full((), NO_STEP, dtype=torch.int64, device=ctx.device)
        self.images: ImageFiles | None = None  # the epoch's image files, if an ImageFolder

    @staticmethod
    def check_interval(ctx: DistContext, print_freq: int) -> int:
        """Every step on the CPU, every ``print_freq`` steps (at most 20) on CUDA (see the
        module docstring)."""
        return 1 if ctx.device.type == "cpu" else min(max(print_freq, 1), CUDA_CHECK_EVERY_MAX)

    def start_epoch(self, epoch: int, total_steps: int, images: ImageFiles | None = None) -> None:
        self.epoch, self.total_steps, self.images = epoch, total_steps, images
        self.first_nonfinite.fill_(NO_STEP)

    def loss_usable(self, loss: torch.Tensor, step: int) -> bool:
        """With --skip-nonfinite: whether every process's loss is finite (a host sync per
        step); if not, the step is skipped on all of them, up to the budget. Without: True."""
        if self.skip_nonfinite == 0:
            return True
        nonfinite = (~torch.isfinite(loss.detach())).to(torch.int64).reshape(1)
        if not all_reduce_max(nonfinite).item():
            return True
        self.skipped_nonfinite += 1
        where = f"epoch {self.epoch}, step {step + 1}/{self.total_steps}"
        if self.skipped_nonfinite > self.skip_nonfinite:
            raise UserError(f"the loss became nan or inf in {where}, after {self.skip_nonfinite} such "
                            f"steps were skipped (--skip-nonfinite {self.skip_nonfinite}): lower --lr "
                            f"or check the data; the last checkpoint is untouched")
        log.warning(f"{where}: the loss is nan or inf; step skipped "
                    f"({self.skipped_nonfinite} of at most {self.skip_nonfinite})")
        return False

    def watch(self, loss: torch.Tensor, step: int) -> None:
        """Remember the first step whose loss is not finite, on the device (no host sync)."""
        nonfinite = ~torch.isfinite(loss.detach())
        candidate = torch.where(nonfinite, step, NO_STEP)
        torch.minimum(self.first_nonfinite, candidate, out=self.first_nonfinite)

    def is_check_step(self, steps_done: int, must_check: bool = False) -> bool:
        return must_check or steps_done == self.total_steps or steps_done % self.check_every == 0

    def check(self) -> str | None:
        """The agreed verdict of all processes: raise for a non-finite loss or an unreadable
        image; return the name of a stop signal if any process received one, else None."""
        image = self.images.unreadable_to_stop_for() if self.images is not None else None
        signal_name = stop_signal_received()
        local = torch.tensor([1 if signal_name else 0, 0, -1 if image is None else image],
                             dtype=torch.int64, device=self.ctx.device)
        local[1] = NO_STEP - self.first_nonfinite  # max over processes = the earliest bad step
        wants_stop, nonfinite_key, image = all_reduce_max(local).tolist()
        if nonfinite_key > 0:
            step = NO_STEP - nonfinite_key
            raise UserError(f"the loss became nan or inf in epoch {self.epoch}, step {step + 1}/"
                            f"{self.total_steps}: lower --lr or check the data (or let up to N such "
                            f"steps be skipped with --skip-nonfinite N); the last checkpoint is untouched")
        if image >= 0:
            raise UserError(self.images.unreadable_message(image))
        if wants_stop:
            return signal_name or "a stop signal (received by another process)"
        return None

    def agreed_signal(self) -> str | None:
        """Between epochs: the stop signal any process received, agreed by all."""
        signal_name = stop_signal_received()
        flag = torch.tensor([1 if signal_name else 0], dtype=torch.int64, device=self.ctx.device)
        if all_reduce_max(flag).item():
            return signal_name or "a stop signal (received by another process)"
        return None

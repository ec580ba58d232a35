"""Running the top-level scripts as a user would, for the end-to-end tests."""
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from gsparsity import launch

REPO = Path(__file__).resolve().parent.parent
# Smallest settings that still exercise everything: the demo digits at 16x16, 32 images.
TINY = ["--data", "demo", "--image-size", "16", "--subset", "32", "-b", "16", "-j", "0",
        "--epochs", "1", "-p", "1", "--seed", "0"]
SEARCH_EPOCHS = 2  # of the search_and_retrain fixture in conftest.py


def run_script(script: str, *flags: str, expect: int = 0, launcher: tuple[str, ...] = (),
               default_weights: bool = False, **env_extra: str) -> subprocess.CompletedProcess:
    """Run ``python [launcher] script flags`` in the repository; check its exit status.

    A search starts from torchvision's ImageNet weights unless told otherwise, and tests have
    no such file: a search given no ``--pretrained`` flag starts from random weights
    (``--no-pretrained``), unless ``default_weights``."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", **env_extra}
    if script.startswith("main_search") and not default_weights:
        flags = random_start_unless_given(flags)
    command = [sys.executable, *launcher, str(REPO / script), *flags]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def random_start_unless_given(flags: Sequence[str]) -> list[str]:
    """A search's flags, with ``--no-pretrained`` added unless they choose the weights (or resume,
    which keeps the run's own)."""
    chosen = any(flag.startswith(("--pretrained", "--no-pretrained", "--resume")) for flag in flags)
    return list(flags) if chosen else [*flags, "--no-pretrained"]


def main_in_process(kind: str, workflow: Callable, argv: Sequence[str]) -> None:
    """``launch.main`` as a script calls it; a search starts from random weights unless told."""
    launch.main(kind, workflow, random_start_unless_given(argv) if kind == "search" else list(argv))


def only_folder(parent: Path, pattern: str) -> Path:
    found = sorted(parent.glob(pattern))
    assert len(found) == 1, f"{pattern} in {parent}: {found}"
    return found[0]


@contextmanager
def scratch_folder(factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A folder for a module- or session-wide fixture, removed when the fixture ends (pytest.ini
    removes each passing test's own tmp_path; these would otherwise stay until the suite ends)."""
    folder = factory.mktemp(name)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)

"""Running the top-level scripts as a user would, for the end-to-end tests."""
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Smallest settings that still exercise everything: the demo digits at 16x16, 32 images.
TINY = ["--data", "demo", "--image-size", "16", "--subset", "32", "-b", "16", "-j", "0",
        "--epochs", "1", "-p", "1", "--seed", "0"]
SEARCH_EPOCHS = 2  # of the search_and_retrain fixture in conftest.py


def run_script(script: str, *flags: str, expect: int = 0, launcher: tuple[str, ...] = (),
               **env_extra: str) -> subprocess.CompletedProcess:
    """Run ``python [launcher] script flags`` in the repository; check its exit status."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", **env_extra}
    command = [sys.executable, *launcher, str(REPO / script), *flags]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


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

"""Shared fixtures: a private cache for the demo digits, and a scratch registry."""
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """The demo digits are written once per test session, never into the user's cache."""
    monkeypatch.setenv("GSPARSITY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def registry(tmp_path) -> Path:
    """A copy of the repository's list_of_models.py that a test may register into."""
    path = tmp_path / "list_of_models.py"
    shutil.copy(REPO / "list_of_models.py", path)
    return path


@pytest.fixture(scope="session")
def baseline(tmp_path_factory) -> Path:
    """A 10-class ResNet-50 trained for one tiny epoch by main_original.py (its model_best)."""
    from scripts import TINY, only_folder, run_script

    save = tmp_path_factory.mktemp("baseline")
    run_script("main_original.py", *TINY, "--lr", "0.05", "--path_to_save", str(save),
               GSPARSITY_CACHE=str(tmp_path_factory.getbasetemp() / "cache"))
    return only_folder(save, "original_resnet50_*") / "model_best.pth.tar"

"""Shared fixtures: a private cache for the demo digits, a scratch registry, the tool's log lines."""
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from captured_log import CapturedLog

REPO = Path(__file__).resolve().parent.parent
# Fixtures that train, search, export or install before their test starts: a test that uses one
# is slow whatever its own body does (pytest -m "not slow" would otherwise build them).
SLOW_FIXTURES = {"baseline", "search_and_retrain", "distilled", "small_model_files", "small_model_file", "exported",
                 "tiny_runs", "runs_without_events", "installed", "originals", "copied", "reference",
                 "compressed_resnet50"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture
def captured_log():
    logger = logging.getLogger("gsparsity")
    handler, level = CapturedLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="session")
def baseline(tmp_path_factory) -> Iterator[Path]:
    """A 10-class ResNet-50 trained for one tiny epoch by main_original.py (its model_best)."""
    from scripts import TINY, only_folder, run_script, scratch_folder

    with scratch_folder(tmp_path_factory, "baseline") as save:
        run_script("main_original.py", *TINY, "--lr", "0.05", "--path_to_save", str(save),
                   GSPARSITY_CACHE=str(tmp_path_factory.getbasetemp() / "cache"))
        yield only_folder(save, "original_resnet50_*") / "model_best.pth.tar"


@pytest.fixture(scope="session")
def search_and_retrain(tmp_path_factory, baseline) -> Iterator[tuple[Path, Path]]:
    """(search folder, retrain folder): a 2-epoch conv12 search that prunes some filters
    (lr 1 takes the full proximal step) and a 1-epoch retrain of its compressed model."""
    from scripts import SEARCH_EPOCHS, TINY, only_folder, run_script, scratch_folder

    with scratch_folder(tmp_path_factory, "search_and_retrain") as parent:
        registry = parent / "list_of_models.py"
        shutil.copy(REPO / "list_of_models.py", registry)
        run_script("main_search_conv12.py", *TINY, "--epochs", str(SEARCH_EPOCHS), "--pretrained", str(baseline),
                   "--lr", "1", "--weight_decay", "3", "--path_to_save", str(parent),
                   "--register", "tiny", "--registry", str(registry))
        run_script("main_reduce_retrain_conv12.py", *TINY, "--lr", "0.01", "--baseline_model", "tiny",
                   "--registry", str(registry), "--path_to_save", str(parent))
        yield only_folder(parent, "conv12_*"), only_folder(parent, "retrain_*")


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many small forward passes: on a shared 2-core CPU extra threads only
    add overhead and erratic delays (a module opts in with ``usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

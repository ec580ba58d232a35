"""gsparsity.retrain: which compressed model a retrain starts from, and what it reports."""
import shutil
from pathlib import Path

import pytest
import torch
from scripts import run_script

from gsparsity import launch
from gsparsity.errors import UserError
from gsparsity.registry import register
from gsparsity.retrain import small_model_path


def registered_search(registry: Path, folder: Path, thresholds: tuple[str, ...] = ("1e-06",)) -> None:
    """A finished conv12 search folder with a compressed model per threshold, registered as "run"."""
    folder.mkdir(parents=True)
    for threshold in thresholds:
        torch.save({"scope": "conv12", "arch": "resnet50", "state_dict": {}},
                   folder / f"small_model_conv12_{threshold}.pth.tar")
        (folder / f"mask_conv12_{threshold}.json").write_text("{}")
    register("run", folder, f"small_model_conv12_{thresholds[0]}.pth.tar", f"mask_conv12_{thresholds[0]}.json",
             "conv12", "resnet50", path=registry)


def retrain_args(registry: Path, *flags: str):
    return launch.parse_args("retrain", ["--dummy", "--baseline_model", "run", "--registry", str(registry), *flags])


def test_retrain_starts_from_the_registered_compressed_model(registry, tmp_path):
    registered_search(registry, tmp_path / "conv12_run")
    assert small_model_path(retrain_args(registry), "conv12") == tmp_path / "conv12_run" / "small_model_conv12_1e-06.pth.tar"


def test_pruning_threshold_picks_that_thresholds_file_in_the_search_folder_as_the_original_did(registry, tmp_path):
    registered_search(registry, tmp_path / "conv12_run", thresholds=("1e-06", "0.001"))
    chosen = small_model_path(retrain_args(registry, "--pruning_threshold", "1e-3"), "conv12")
    assert chosen == tmp_path / "conv12_run" / "small_model_conv12_0.001.pth.tar"


def test_a_threshold_the_search_did_not_save_is_refused_naming_what_it_has(registry, tmp_path):
    registered_search(registry, tmp_path / "conv12_run")
    with pytest.raises(UserError, match=r"--pruning_threshold 0.01: the search behind run has no "
                                        r"small_model_conv12_0.01.pth.tar in .* \(it has small_model_conv12_1e-06.pth.tar\)"):
        small_model_path(retrain_args(registry, "--pruning_threshold", "0.01"), "conv12")


def test_the_originals_spelling_of_the_batch_size_flag_is_accepted():
    args = launch.parse_args("retrain", ["--dummy", "--baseline_model", "run", "--batch_size", "64"])
    assert args.batch_size == 64


@pytest.mark.parametrize("threshold", ["0", "-0.5", "nan"])
def test_a_threshold_that_is_not_positive_is_refused_before_anything_runs(capsys, threshold):
    with pytest.raises(SystemExit) as exit_info:
        launch.main("retrain", lambda args, ctx: pytest.fail("ran"),
                    ["--dummy", "--baseline_model", "run", "--pruning_threshold", threshold])
    assert exit_info.value.code == 2
    assert "--pruning_threshold must be > 0" in capsys.readouterr().err


def test_evaluating_a_resumed_retrain_reports_its_retrained_weights_under_that_name(search_and_retrain, tmp_path):
    folder = tmp_path / "retrain_copy"  # a copy: the shared fixture's log stays as it was
    shutil.copytree(search_and_retrain[1], folder)
    result = run_script("main_reduce_retrain_conv12.py", "--resume", str(folder), "--evaluate")
    assert "retrained weights, after 1 epoch(s): top1" in result.stdout
    assert "inherited weights" not in result.stdout

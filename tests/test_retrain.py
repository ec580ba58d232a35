"""gsparsity.retrain: which compressed model a retrain starts from, and what it reports."""
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from scripts import TINY, only_folder, run_script
from test_cli import ORIGINAL, RETRAIN, fails_with
from torch import nn

from gsparsity import engine, launch
from gsparsity.checkpoint import load_checkpoint
from gsparsity.distributed import DistContext
from gsparsity.engine import train_one_epoch, validate
from gsparsity.errors import UserError
from gsparsity.experiment import setup_logging
from gsparsity.registry import register, saved_small_models, searched_small_model
from gsparsity.retrain import cut_to_mask, small_model_path
from gsparsity.stopping import EXIT_PREEMPTED
from gsparsity.training import RunSettings, Schedule, make_scheduler, start_run, step_lrs

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


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


@pytest.mark.slow
def test_evaluating_a_resumed_retrain_reports_its_retrained_weights_under_that_name(search_and_retrain, tmp_path):
    folder = tmp_path / "retrain_copy"  # a copy: the shared fixture's log stays as it was
    shutil.copytree(search_and_retrain[1], folder)
    result = run_script("main_reduce_retrain_conv12.py", "--resume", str(folder), "--evaluate")
    assert "retrained weights, after 1 epoch(s): top1" in result.stdout
    assert "inherited weights" not in result.stdout


def test_inherit_start_cuts_the_weights_the_search_started_from_to_its_mask(search_and_retrain, baseline, tmp_path):
    """--inherit start: the search chose the widths; the filters keep their values from before it shrank them."""
    search, _ = search_and_retrain
    registry = search.parent / "list_of_models.py"
    result = run_script("main_reduce_retrain_conv12.py", *TINY, "--lr", "1e-12", "--baseline_model", "tiny",
                        "--registry", str(registry), "--inherit", "start", "--path_to_save", str(tmp_path))
    assert f"--inherit start: the search's mask on the weights it started from, {baseline}" in result.stdout
    retrained = load_checkpoint(only_folder(tmp_path, "retrain_*") / "checkpoint.pth.tar")
    expected = cut_to_mask(baseline, retrained["mask"], "conv12", 10).state_dict()
    searched = load_checkpoint(searched_small_model(search, saved_small_models(search)))["state_dict"]
    convs = [key for key in expected if "conv" in key and key.endswith("weight")]
    assert convs and all(retrained["state_dict"][key].shape == searched[key].shape for key in convs)
    for key in convs:  # an lr of 1e-12 moved them by nothing a float32 can see
        torch.testing.assert_close(retrained["state_dict"][key], expected[key], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(expected[key], searched[key]) for key in convs)  # not the search's weights


# --- --label-smoothing, --warmup-epochs -----------------------------------------------------

def flags_of(kind: str, *flags: str) -> list[str]:
    return ["--dummy", *(["--baseline_model", "run"] if kind == "retrain" else []), *flags]


@pytest.mark.parametrize("kind", ["retrain", "original"])
def test_label_smoothing_makes_the_training_loss_torchs_smoothed_cross_entropy_and_leaves_validation_plain(kind):
    args = launch.parse_args(kind, flags_of(kind, "--label-smoothing", "0.2", "-p", "1"))
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    images, target = 4 * torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        log_p = model(images).log_softmax(dim=1)
    # torch's formula: (1 - eps) * CE against the label + eps * CE against the uniform distribution
    smoothed = (0.8 * -log_p[range(5), target] + 0.2 * -log_p.mean(dim=1)).mean().item()
    plain = -log_p[range(5), target].mean().item()
    setup_logging(None, CPU)  # to this test's stdout (an earlier in-process run may have logged to its own)
    run = start_run(RunSettings.from_args(args), CPU, None, model, torch.optim.SGD(model.parameters(), lr=0.1),
                    loaders=None)
    assert validate(model, [(images, target)], run.val_criterion, CPU, run.loop).loss == pytest.approx(plain, rel=1e-6)
    trained = train_one_epoch(run.model, [(images, target)], run.criterion, run.optimizer, None, CPU, 0, run.loop)
    assert trained.loss == pytest.approx(smoothed, rel=1e-6)  # of the batch before the step
    assert abs(smoothed - plain) > 0.01


@pytest.mark.parametrize("kind", ["retrain", "original"])
@pytest.mark.parametrize("value", ["1", "-0.1", "nan"])
def test_label_smoothing_outside_0_to_1_is_refused_in_one_line(capsys, kind, value):
    script = {"retrain": RETRAIN, "original": ORIGINAL}[kind]
    fails_with(capsys, script, flags_of(kind, "--label-smoothing", value), f"--label-smoothing must be in [0, 1), got")


def epoch_lrs(kind: str, *flags: str) -> list[float]:
    """The lr of each epoch under the schedule that the flags ask for (stepped once per epoch)."""
    args = launch.parse_args(kind, flags_of(kind, "--lr", "0.1", *flags))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    scheduler = make_scheduler(optimizer, Schedule.from_args(args))
    lrs = []
    for _ in range(args.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("kind", ["retrain", "original", "search"])
def test_warmup_rises_linearly_to_lr_then_the_chosen_schedule_runs_over_the_remaining_epochs(kind):
    cosine = epoch_lrs(kind, "--epochs", "6", "--warmup-epochs", "3", "--lr-scheduler", "cosine")
    # cosine over 3 epochs from 0.1: 0.1 * (1 + cos(pi * e / 3)) / 2
    assert cosine == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.075, 0.025])
    step = epoch_lrs(kind, "--epochs", "6", "--warmup-epochs", "3", "--lr-step", "2")
    assert step == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.1, 0.01])
    assert epoch_lrs(kind, "--epochs", "3", "--warmup-epochs", "1") == pytest.approx([0.1, 0.1, 0.1])


def test_without_warmup_the_schedules_are_the_originals():
    assert epoch_lrs("retrain", "--epochs", "5", "--lr-step", "2") == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    assert epoch_lrs("retrain", "--epochs", "4", "--lr-scheduler", "cosine") == pytest.approx(
        [0.05 * (1 + math.cos(math.pi * epoch / 4)) for epoch in range(4)])


def test_the_budgets_lr_per_step_follows_the_warmup():
    args = launch.parse_args("search", ["--dummy", "--lr", "0.1", "--epochs", "3", "--warmup-epochs", "2"])
    assert step_lrs(Schedule.from_args(args), steps_per_epoch=2) == pytest.approx([0.05, 0.05, 0.1, 0.1, 0.1, 0.1])


@pytest.mark.parametrize("value", ["-1", "3"])
def test_warmup_of_as_many_epochs_as_the_run_or_negative_is_refused_in_one_line(capsys, value):
    fails_with(capsys, RETRAIN, flags_of("retrain", "--epochs", "3", "--warmup-epochs", value),
               f"--warmup-epochs must be >= 0 and less than --epochs (3), got {value}")


@pytest.mark.slow
def test_a_resumed_retrain_with_warmup_distillation_and_label_smoothing_ends_equal_to_an_uninterrupted_one(
        search_and_retrain, tmp_path, capsys, monkeypatch):
    registry = search_and_retrain[0].parent / "list_of_models.py"
    flags = [*TINY, "--lr", "0.01", "--baseline_model", "tiny", "--registry", str(registry), "--epochs", "3",
             "--warmup-epochs", "2", "--lr-scheduler", "cosine", "--distill", "--label-smoothing", "0.1"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    launch.main(*RETRAIN, [*flags, "--path_to_save", str(straight)])
    log_progress = engine.log_progress

    def stop_in_epoch_1(bar, sums, ctx, started, data_seconds, where, lr):  # a real SIGTERM mid-epoch
        log_progress(bar, sums, ctx, started, data_seconds, where, lr)
        if where == "epoch 1 [1/2]":
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(engine, "log_progress", stop_in_epoch_1)
    with pytest.raises(SystemExit) as exit_info:
        launch.main(*RETRAIN, [*flags, "--path_to_save", str(stopped)])
    assert exit_info.value.code == EXIT_PREEMPTED
    monkeypatch.undo()
    folder = only_folder(stopped, "retrain_*")
    saved = load_checkpoint(folder / "checkpoint.pth.tar")
    assert (saved["epoch"], saved["step"]) == (1, 1)  # mid-epoch, in the warmup
    launch.main(*RETRAIN, ["--resume", str(folder)])
    expected = load_checkpoint(only_folder(straight, "retrain_*") / "checkpoint.pth.tar")
    actual = load_checkpoint(folder / "checkpoint.pth.tar")
    assert actual["epoch"] == expected["epoch"] == 3
    assert actual["scheduler"] == expected["scheduler"]
    for key, value in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][key], value), key
    log = (folder / "_log.txt").read_text()
    assert "epoch 0 [2/2]" in log and "lr 0.005" in log and "epoch 2 [2/2]" in log

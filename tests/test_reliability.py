"""When things go wrong: killed and preempted runs, nan losses, unreadable images, a full
disk, a dead process. Each run resumes exactly, or stops with one clear line and leaves
the last good checkpoint as it was."""
import argparse
import errno
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from captured_log import CapturedLog
from scripts import REPO, main_in_process, only_folder, random_start_unless_given, scratch_folder
from torch import nn
from torchvision import transforms

import main_reduce_retrain_conv12
import main_search_conv12
from gsparsity import engine
from gsparsity.engine import LoopSettings
from gsparsity.checkpoint import atomic_save, load_checkpoint, remove_stale_temp_files
from gsparsity.data import CheckedImageFolder, DataSettings, build_loaders, start_epoch
from gsparsity.distributed import DistContext, free_port
from gsparsity.errors import UserError
from gsparsity.experiment import setup_logging
from gsparsity.registry import register_experiment
from gsparsity.stopping import EXIT_PREEMPTED, StepGuard
from gsparsity.training import (BEST, CHECKPOINT, Run, RunSettings, check_weights_finite, fit,
                                load_resume_checkpoint, save_checkpoint, start_run)

SEARCH = ("search", main_search_conv12.workflow)
RETRAIN = ("retrain", main_reduce_retrain_conv12.workflow)
CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# Two epochs of four steps of a ResNet-18 on the demo digits at 16x16: quick, and the
# run crosses an epoch's end.
QUICK = ["--data", "demo", "--image-size", "16", "--subset", "32", "-b", "8", "-j", "0",
         "--epochs", "2", "-p", "1", "--seed", "0", "-a", "resnet18"]
SCRIPT_TIMEOUT = 300
# One thread everywhere: on a busy 2-core machine two OpenMP threads are about twice as
# slow, and in-process and scripted runs must use the same count to give equal weights.
THREADS = 1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


# --- helpers ---------------------------------------------------------------------------

def fails_with(capsys, script, argv, message) -> str:
    """Run a script in-process; it must exit 2 with ``message`` on a single stderr line."""
    kind, workflow = script
    with pytest.raises(SystemExit) as exit_info:
        main_in_process(kind, workflow, argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2, error
    assert message in error, error
    assert "Traceback" not in error and error.count("\n") == 1, error
    return error


def start_search(*flags: str, log_to: Path, **env_extra: str) -> subprocess.Popen:
    """main_search_conv12.py in the background, its output in ``log_to``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), **env_extra}
    output = open(log_to, "ab")
    try:
        return subprocess.Popen([sys.executable, str(REPO / "main_search_conv12.py"),
                                 *random_start_unless_given(flags)],
                                cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    finally:
        output.close()  # the child holds its own copy


def wait_until(condition, process: subprocess.Popen | None = None, timeout: float = SCRIPT_TIMEOUT) -> bool:
    """Poll ``condition`` until it holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process is not None and process.poll() is not None:
            return condition()
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def log_has(parent: Path, text: str):
    def check() -> bool:
        logs = list(parent.glob("conv12_*/_log.txt"))
        return bool(logs) and text in logs[0].read_text()
    return check


def file_stamp(path: Path):
    return path.stat().st_mtime_ns if path.exists() else None


def same_weights(folder: Path, reference: Path) -> list[str]:
    """Names of the tensors whose final values differ between two runs."""
    actual = load_checkpoint(folder / CHECKPOINT)
    expected = load_checkpoint(reference / CHECKPOINT)
    assert actual["epoch"] == expected["epoch"] == 2 and actual["step"] == 0
    return [key for key, value in expected["state_dict"].items()
            if not torch.equal(actual["state_dict"][key], value)]


def write_image_folder(root: Path, broken: str | None = None) -> Path:
    """train/ and val/ with two classes of four 8x8 PNGs each; ``broken``: one more file
    in train/a that is not an image."""
    for split in ("train", "val"):
        for label, value in (("a", 40), ("b", 200)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(4):
                Image.new("RGB", (8, 8), (value, index * 30, 90)).save(folder / f"{index}.png")
    if broken:
        (root / "train" / "a" / broken).write_bytes(b"these bytes are not a PNG file")
    return root


def tiny_run(folder: Path, **overrides) -> Run:
    """A Run of a tiny conv net on 16 demo digits at 8x8 (4 steps per epoch): the epoch
    loop, checkpoints and resume in a fraction of a second."""
    values = dict(data="demo", dummy=False, image_size=8, subset=16, batch_size=4, workers=0, seed=0,
                  epochs=2, lr=0.05, momentum=0.9, weight_decay=0.0, lr_scheduler="step", lr_step=30,
                  warmup_epochs=0, print_freq=1, channels_last=False, amp=False, compile=False, resume=None,
                  start_epoch=0, arch="tiny", checkpoint_every=1, skip_nonfinite=0, clip_grad_norm=0.0,
                  bad_images="stop", evaluate=False)
    values.update(overrides)
    args = argparse.Namespace(**values)
    folder.mkdir(exist_ok=True)
    captures = [handler for handler in logging.getLogger("gsparsity").handlers
                if isinstance(handler, CapturedLog)]
    setup_logging(folder, CPU)  # drops handlers of earlier runs (their folders may be gone)
    for handler in captures:
        logging.getLogger("gsparsity").addHandler(handler)
    loaders = build_loaders(DataSettings.from_args(args), CPU)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, loaders.num_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    return start_run(RunSettings.from_args(args), CPU, folder, model, optimizer, loaders)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Iterator[Path]:
    """The experiment folder of an uninterrupted seeded QUICK search (run in-process)."""
    with scratch_folder(tmp_path_factory, "reference") as save:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("GSPARSITY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
            main_in_process(*SEARCH, [*QUICK, "--path_to_save", str(save)])
        yield only_folder(save, "conv12_*")


# --- 1. killed at random moments, resumed -----------------------------------------------

@pytest.mark.slow
def test_a_search_killed_at_random_moments_and_resumed_ends_with_the_weights_of_one_that_never_stopped(
        reference, tmp_path):
    # The kill moments are random: GSPARSITY_TEST_SEED=N replays the draws of a failed run
    # (the moments themselves also depend on how fast the machine is).
    seed = int(os.environ.get("GSPARSITY_TEST_SEED", time.time_ns() % 2**32))
    print(f"kill moments drawn with GSPARSITY_TEST_SEED={seed}")
    moments = random.Random(seed)
    flags = [*QUICK, "--checkpoint-every", "1", "--path_to_save", str(tmp_path)]
    process = start_search(*flags, log_to=tmp_path / "output.txt")
    wait_until(lambda: list(tmp_path.glob("conv12_*/run_info.json")), process)
    folder = only_folder(tmp_path, "conv12_*")
    kills = []  # (epoch, step) of the checkpoint each kill left behind
    while len(kills) < 3:
        for _ in range(moments.randint(1, 2)):  # let it save once or twice (of 8 steps)...
            before = file_stamp(folder / CHECKPOINT)
            wait_until(lambda: file_stamp(folder / CHECKPOINT) != before, process)
        time.sleep(moments.uniform(0.0, 0.3))  # ...then kill it in a step, a save or an epoch's end
        if process.poll() is not None:
            break  # it finished first
        process.kill()
        assert process.wait(SCRIPT_TIMEOUT) == -signal.SIGKILL, f"GSPARSITY_TEST_SEED={seed}"
        saved = load_checkpoint(folder / CHECKPOINT)
        kills.append((saved["epoch"], saved["step"]))
        process = start_search("--resume", str(folder), log_to=tmp_path / "output.txt")
    replay = f"GSPARSITY_TEST_SEED={seed}, kills left checkpoints at (epoch, step) {kills}"
    assert process.wait(SCRIPT_TIMEOUT) == 0, f"{replay}\n{(tmp_path / 'output.txt').read_text()}"
    assert len(kills) == 3, f"the run ended before it was killed three times: {replay}"
    assert same_weights(folder, reference) == [], replay


# --- 2. preemption ------------------------------------------------------------------------

def sigterm_at(where: str, monkeypatch) -> None:
    """Send this process a real SIGTERM when the progress line ``where`` is logged."""
    log_progress = engine.log_progress

    def then_signal(bar, sums, ctx, started, data_seconds, line_start, lr):
        log_progress(bar, sums, ctx, started, data_seconds, line_start, lr)
        if line_start == where:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(engine, "log_progress", then_signal)


@pytest.mark.slow
def test_sigterm_saves_a_mid_epoch_checkpoint_and_exits_75_and_the_resumed_run_matches(
        reference, tmp_path, capsys, monkeypatch):
    sigterm_at("epoch 0 [2/4]", monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main_in_process(*SEARCH, [*QUICK, "--path_to_save", str(tmp_path)])
    assert exit_info.value.code == EXIT_PREEMPTED
    assert "stopped by SIGTERM in epoch 0 after step 2" in capsys.readouterr().err
    folder = only_folder(tmp_path, "conv12_*")
    saved = load_checkpoint(folder / CHECKPOINT)
    assert (saved["epoch"], saved["step"]) == (0, 2)  # no --checkpoint-every: the signal made it
    assert "stopped by SIGTERM" in (folder / "_log.txt").read_text()
    monkeypatch.undo()
    main_in_process(*SEARCH, ["--resume", str(folder)])
    assert same_weights(folder, reference) == []


@pytest.mark.slow
def test_two_processes_stop_together_when_only_one_receives_sigterm(tmp_path):
    processes = start_two_processes(tmp_path)
    assert wait_until(log_has(tmp_path, "epoch 0 [2/"), processes[0])
    processes[1].send_signal(signal.SIGTERM)
    codes = [process.wait(SCRIPT_TIMEOUT) for process in processes]
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], (tmp_path / "rank0.txt").read_text()
    saved = load_checkpoint(only_folder(tmp_path, "conv12_*") / CHECKPOINT)
    assert saved["world_size"] == 2 and (saved["epoch"], saved["step"]) >= (0, 2)


# --- 6. a dead process ----------------------------------------------------------------------

def start_two_processes(tmp_path: Path, *flags: str) -> list[subprocess.Popen]:
    """Two gloo processes started by hand (the environment torchrun would set), no launcher."""
    port = str(free_port())
    return [start_search(*QUICK, "--subset", "64", "--device", "cpu", "--path_to_save", str(tmp_path), *flags,
                         log_to=tmp_path / f"rank{rank}.txt", RANK=str(rank), LOCAL_RANK=str(rank),
                         WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            for rank in range(2)]


@pytest.mark.slow
def test_when_one_process_is_killed_the_other_stops_within_a_minute_with_one_clear_line(tmp_path):
    processes = start_two_processes(tmp_path)
    assert wait_until(log_has(tmp_path, "epoch 0 [2/"), processes[0])
    processes[1].kill()
    killed_at = time.monotonic()
    code = processes[0].wait(60)
    assert code not in (0, None) and time.monotonic() - killed_at < 60
    output = (tmp_path / "rank0.txt").read_text()
    assert "lost contact with another process" in output and "Traceback" not in output, output


# --- 3. numerics ----------------------------------------------------------------------------

def nan_at_step(bad_step: int):
    """A criterion whose loss is nan at one training step (counted from 0 over the whole
    run; validation calls do not count) and cross-entropy elsewhere."""
    training_calls = []

    def criterion(output, target):
        loss = nn.functional.cross_entropy(output, target)
        if not torch.is_grad_enabled():
            return loss
        training_calls.append(1)
        return loss * float("nan") if len(training_calls) - 1 == bad_step else loss
    return criterion


def tiny_training(skip_nonfinite: int = 0, steps: int = 3):
    """A linear classifier, its optimizer, ``steps`` batches, flags and a step guard."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(2, 4), torch.tensor([0, 2])) for _ in range(steps)]
    args = LoopSettings(print_freq=1)
    guard = StepGuard(CPU, check_every=1, skip_nonfinite=skip_nonfinite)
    return model, optimizer, batches, args, guard


def test_a_nan_loss_stops_training_naming_the_epoch_and_the_exact_step():
    model, optimizer, batches, args, guard = tiny_training()
    with pytest.raises(UserError, match=r"nan or inf in epoch 4, step 2/3"):
        engine.train_one_epoch(model, batches, nan_at_step(1), optimizer, None, CPU, 4, args, guard=guard)


def test_skip_nonfinite_skips_the_bad_step_without_touching_the_weights():
    model, optimizer, batches, args, guard = tiny_training(skip_nonfinite=1)
    engine.train_one_epoch(model, batches, nan_at_step(1), optimizer, None, CPU, 0, args, guard=guard)
    expected, expected_optimizer, _, _, _ = tiny_training()
    for images, target in (batches[0], batches[2]):  # the same training without the bad batch
        expected_optimizer.zero_grad()
        nn.functional.cross_entropy(expected(images), target).backward()
        expected_optimizer.step()
    assert guard.skipped_nonfinite == 1
    assert torch.equal(model.weight, expected.weight) and torch.equal(model.bias, expected.bias)


def test_skip_nonfinite_stops_once_more_steps_than_allowed_are_bad():
    model, optimizer, batches, args, guard = tiny_training(skip_nonfinite=1)
    always_nan = lambda output, target: nn.functional.cross_entropy(output, target) * float("nan")
    with pytest.raises(UserError, match=r"step 2/3, after 1 such steps were skipped"):
        engine.train_one_epoch(model, batches, always_nan, optimizer, None, CPU, 0, args, guard=guard)


class InfiniteGradientAt(nn.Module):
    """Identity whose gradient is inf on the chosen forward calls: overflowing gradients
    with a finite loss, what a GradScaler must skip."""

    def __init__(self, calls: set[int]) -> None:
        super().__init__()
        self.calls, self.count = calls, 0

    def forward(self, features):
        if self.count in self.calls and features.requires_grad:
            features.register_hook(lambda gradient: gradient * float("inf"))
        self.count += 1
        return features


def test_steps_the_grad_scaler_skips_are_counted():
    _, _, batches, args, guard = tiny_training(steps=5)
    chain = nn.Sequential(nn.Linear(4, 4), InfiniteGradientAt({1, 3}), nn.Linear(4, 3))
    optimizer = torch.optim.SGD(chain.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    metrics = engine.train_one_epoch(chain, batches, nn.CrossEntropyLoss(), optimizer, scaler, CPU, 0,
                                     args, guard=guard)
    assert metrics.scaler_skips == 2
    assert scaler.get_scale() == 2.0  # halved once per skipped step


def test_steps_skipped_by_every_process_alike_are_counted_once(monkeypatch):
    """Under DDP every process sees the same averaged gradients and skips the same steps:
    with 8 GPUs, 2 skipped steps are 2, not 16. Here all-reduces act as over two processes
    that met the same overflows."""
    monkeypatch.setattr(engine, "all_reduce_sum", lambda tensor: tensor.mul_(2))
    monkeypatch.setattr(engine, "all_reduce_max", lambda tensor: tensor)
    _, _, batches, args, guard = tiny_training(steps=5)
    chain = nn.Sequential(nn.Linear(4, 4), InfiniteGradientAt({1, 3}), nn.Linear(4, 3))
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    metrics = engine.train_one_epoch(chain, batches, nn.CrossEntropyLoss(), torch.optim.SGD(chain.parameters(), lr=0.1),
                                     scaler, CPU, 0, args, guard=guard)
    assert metrics.scaler_skips == 2


def test_nonfinite_weights_are_never_saved_and_the_message_names_them(tmp_path):
    run = tiny_run(tmp_path / "run")
    save_checkpoint(run, 0)
    run.plain_model[1].running_var[2] = float("inf")
    with pytest.raises(UserError, match=r"weights became nan or inf in epoch 1 by step 3 \(e.g. 1.running_var\)"):
        save_checkpoint(run, 1, 3)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["epoch"] == 0


def check_weights_in_a_group(rank: int, port: int, results: Path) -> None:
    """One of two gloo processes: only rank 1's BatchNorm statistics are nan."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    if rank == 1:
        model[1].running_mean[0] = float("nan")
    try:
        check_weights_finite(argparse.Namespace(plain_model=model), epoch=0, step=1)
        verdict = "went on"
    except UserError as error:
        verdict = str(error)
    finally:
        torch.distributed.destroy_process_group()
    (results / f"rank{rank}.txt").write_text(verdict)


@pytest.mark.slow
def test_every_process_stops_when_one_has_nonfinite_batchnorm_statistics(tmp_path):
    # BatchNorm statistics are per process under DDP; a process going on alone would wait
    # in its next collective until the timeout.
    torch.multiprocessing.spawn(check_weights_in_a_group, args=(free_port(), tmp_path), nprocs=2)
    assert "(e.g. on another process)" in (tmp_path / "rank0.txt").read_text()
    assert "(e.g. 1.running_mean)" in (tmp_path / "rank1.txt").read_text()


def test_a_nan_loss_stops_the_run_and_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = tiny_run(tmp_path / "run")
    monkeypatch.setattr(run, "criterion", nan_at_step(6))  # step 3 of epoch 1
    with pytest.raises(UserError, match=r"nan or inf in epoch 1, step 3/4.*last checkpoint is untouched"):
        fit(run)
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert (saved["epoch"], saved["step"]) == (1, 2)
    assert "the run stopped: the loss became nan or inf" in (tmp_path / "run" / "_log.txt").read_text()


def test_weights_that_became_nan_are_never_saved(tmp_path):
    # A nan gradient at step 3 (of 4, a checkpoint after each) makes the weights nan through
    # the optimizer's own update, while that step's loss was finite: only the check of the
    # weights before a save can stop the run. (A huge lr instead ends in a nan loss first.)
    run = tiny_run(tmp_path / "run")
    weight, backward_passes = run.plain_model[0].weight, []

    def nan_at_step_3(gradient):
        backward_passes.append(1)
        return gradient * float("nan") if len(backward_passes) == 3 else gradient
    weight.register_hook(nan_at_step_3)
    with pytest.raises(UserError, match=r"the weights became nan or inf in epoch 0 by step 3 \(e.g. 0.weight\): "
                                        r"lower --lr; nothing was saved, the last checkpoint is untouched"):
        fit(run)
    assert len(backward_passes) == 3 and torch.isnan(weight).all()  # they did become nan
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert (saved["epoch"], saved["step"]) == (0, 2)  # the one before, finite
    assert all(torch.isfinite(value).all() for value in saved["state_dict"].values() if value.is_floating_point())
    assert not (tmp_path / "run" / BEST).exists() and not list((tmp_path / "run").glob(".*.tmp"))


# --- 1. the loader behind an exact resume --------------------------------------------------

def data_settings(**overrides) -> DataSettings:
    values = dict(data="demo", image_size=16, subset=32, batch_size=8, seed=5, workers=0)
    values.update(overrides)
    return DataSettings(**values)


def epoch_batches(loader, epoch: int, first_step: int = 0) -> list[torch.Tensor]:
    start_epoch(loader, epoch, seed=5, first_step=first_step)
    return [images for images, _ in loader]


def test_an_epoch_started_part_way_yields_exactly_the_rest_of_the_full_epoch():
    loader = build_loaders(data_settings(), CPU).train
    full = epoch_batches(loader, 1)
    rest = epoch_batches(loader, 1, first_step=2)
    assert len(full) == 4 and len(rest) == 2
    assert all(torch.equal(a, b) for a, b in zip(full[2:], rest))


@pytest.mark.slow
def test_augmentation_does_not_depend_on_the_number_of_loader_workers():
    without_workers = epoch_batches(build_loaders(data_settings(), CPU).train, 3)
    with_workers = epoch_batches(build_loaders(data_settings(workers=2), CPU).train, 3)
    assert all(torch.equal(a, b) for a, b in zip(without_workers, with_workers))
    assert len(with_workers) == 4


# --- 4. bad input -----------------------------------------------------------------------------

@pytest.mark.slow
def test_an_unreadable_image_stops_the_run_naming_the_file(capsys, tmp_path):
    images = write_image_folder(tmp_path / "images", broken="broken.png")
    error = fails_with(capsys, SEARCH, ["--data", str(images), *QUICK[2:], "-b", "3",
                                        "--path_to_save", str(tmp_path / "runs")], "broken.png")
    assert "unreadable image" in error and "--bad-images skip" in error
    assert not list((tmp_path / "runs").glob(f"*/{CHECKPOINT}"))


def test_bad_images_skip_trains_on_and_warns_once_per_epoch_with_a_count(tmp_path, captured_log):
    images = write_image_folder(tmp_path / "images", broken="broken.png")
    fit(tiny_run(tmp_path / "run", data=str(images), batch_size=3, bad_images="skip"))
    warnings = [line for line in captured_log.lines if "unreadable image file(s) skipped" in line]
    assert len(warnings) == 2 and all("1 unreadable" in line for line in warnings)  # one per epoch
    assert "broken.png" in warnings[0]
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["epoch"] == 2


def test_loader_workers_report_unreadable_images_to_the_main_process(tmp_path):
    images = write_image_folder(tmp_path / "images", broken="broken.png")
    dataset = CheckedImageFolder(str(images / "train"), transforms.ToTensor(), "stop", workers=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
    sizes = [len(target) for _, target in loader]
    broken = [index for index, (path, _) in enumerate(dataset.samples) if path.endswith("broken.png")]
    assert sizes == [3, 3, 3]  # the broken file's place is taken by a readable image
    assert dataset.failures.first_index() == broken[0]
    assert dataset.failures.unreported_count() == 1 and dataset.failures.unreported_count() == 0
    assert dataset.unreadable_to_stop_for() == broken[0]


def copy_of(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.slow
def test_resume_falls_back_to_model_best_when_the_checkpoint_is_truncated(reference, tmp_path, captured_log):
    folder = copy_of(reference, tmp_path)
    truncate(folder / CHECKPOINT)
    loaded = load_resume_checkpoint(folder)
    assert loaded["epoch"] == load_checkpoint(reference / BEST)["epoch"]
    assert any("truncated or corrupt" in line and "falling back to model_best.pth.tar" in line
               for line in captured_log.lines)


@pytest.mark.slow
def test_resume_with_both_checkpoints_broken_names_both_and_touches_nothing(capsys, reference, tmp_path):
    folder = copy_of(reference, tmp_path)
    truncate(folder / CHECKPOINT)
    truncate(folder / BEST)
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    error = fails_with(capsys, SEARCH, ["--resume", str(folder)], "neither checkpoint can be used")
    assert CHECKPOINT in error and BEST in error
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == before


def test_resume_of_a_run_that_stopped_before_its_first_checkpoint(reference, tmp_path):
    folder = copy_of(reference, tmp_path)
    (folder / CHECKPOINT).unlink()
    (folder / BEST).unlink()
    with pytest.raises(UserError, match="stopped before its first checkpoint"):
        load_resume_checkpoint(folder)


def registered_copy(reference: Path, tmp_path: Path, registry: Path) -> Path:
    folder = copy_of(reference, tmp_path / "experiments")
    register_experiment("quick", folder, registry)
    return folder


def test_baseline_model_whose_experiment_folder_was_deleted(capsys, reference, registry, tmp_path):
    shutil.rmtree(registered_copy(reference, tmp_path, registry))
    fails_with(capsys, RETRAIN, [*QUICK, "--baseline_model", "quick", "--registry", str(registry),
                                 "--path_to_save", str(tmp_path / "runs")], "is gone")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_small_model_whose_mask_was_tampered_with_is_refused(capsys, reference, registry, tmp_path):
    folder = registered_copy(reference, tmp_path, registry)
    small_model = only_folder(folder, "small_model_*_1e-06.pth.tar")
    saved = load_checkpoint(small_model)
    layers = saved["mask"]["layers"]
    name = next(iter(layers))
    layers[name] = {"filters": layers[name]["filters"] + 1, "kept": layers[name]["kept"]}
    atomic_save(saved, small_model)
    fails_with(capsys, RETRAIN, [*QUICK, "--baseline_model", "quick", "--registry", str(registry),
                                 "--path_to_save", str(tmp_path / "runs")],
               f"{name} has {layers[name]['filters']} filters, resnet18 has {layers[name]['filters'] - 1}")
    assert not (tmp_path / "runs").exists()


# --- 5. a full disk ---------------------------------------------------------------------------

def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(monkeypatch, tmp_path):
    real_save = torch.save
    saves = []

    def disk_fills_up_after_the_first_save(obj, handle, *args, **kwargs):
        saves.append(1)
        if len(saves) == 1:
            return real_save(obj, handle, *args, **kwargs)
        handle.write(b"the first bytes fit")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    run = tiny_run(tmp_path / "run")
    monkeypatch.setattr(torch, "save", disk_fills_up_after_the_first_save)
    with pytest.raises(UserError, match="could not write .*checkpoint.pth.tar: No space left on device; "
                                        "the previous version is intact"):
        fit(run)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["step"] == 1
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_resume_removes_temporary_files_of_killed_writers_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".{CHECKPOINT}.{dead}.0123abcd.tmp"
    live = tmp_path / f".{CHECKPOINT}.{os.getpid()}.89abcdef.tmp"
    other = tmp_path / ".notes.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_resume_removes_what_a_killed_writer_left_beside_a_symlinked_checkpoint(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    elsewhere, run = tmp_path / "scratch", tmp_path / "run"
    elsewhere.mkdir()
    run.mkdir()
    (elsewhere / "run7.pth.tar").write_bytes(b"checkpoint")
    (run / CHECKPOINT).symlink_to(elsewhere / "run7.pth.tar")
    stale = elsewhere / f".run7.pth.tar.{dead}.0123abcd.tmp"  # where a write through the link puts it
    unrelated = elsewhere / f".other.pth.tar.{dead}.0123abcd.tmp"  # not the link's: left alone
    for path in (stale, unrelated):
        path.write_bytes(b"partial")
    assert remove_stale_temp_files(run) == [stale]
    assert not stale.exists() and unrelated.exists()

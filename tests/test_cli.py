"""Bad input: one clear line on stderr, exit status 2, no traceback, nothing overwritten."""
import json

import pytest
import torch
import torchvision

import main_original
import main_reduce_retrain_conv12
import main_search_all_conv
import main_search_conv12
from gsparsity import search as search_module
from gsparsity.models import build_model, load_pretrained
from scripts import TINY, main_in_process

SEARCH = ("search", main_search_conv12.workflow)
SEARCH_ALL_CONV = ("search", main_search_all_conv.workflow)
RETRAIN = ("retrain", main_reduce_retrain_conv12.workflow)
ORIGINAL = ("original", main_original.workflow)


def fails_with(capsys, script, argv, message):
    """Run a script in-process; it must exit 2 with ``message`` on a single stderr line."""
    kind, workflow = script
    with pytest.raises(SystemExit) as exit_info:
        main_in_process(kind, workflow, argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error, error
    assert "Traceback" not in error and error.count("\n") == 1, error


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "-0.1"], "--lr must be > 0"),
    (["--weight_decay", "-0.05"], "--weight_decay must be >= 0"),
    (["--pruning_threshold", "0"], "--pruning_threshold must be > 0"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["-b", "0"], "--batch-size must be > 0"),
    (["--register", "not a name"], "use a Python identifier"),
    (["--register", "class"], "not a Python keyword"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    (["--skip-nonfinite", "-2"], "--skip-nonfinite must be >= 0"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm must be >= 0 (0: off), got -1.0"),
    (["--clip-grad-norm", "nan"], "--clip-grad-norm must be >= 0 (0: off), got nan"),
    (["--target-macs", "150%"], "--target-macs as a share must be between 0% and 100%"),
    (["--budget-steps", "1"], "--budget-steps must be >= 2"),
    (["--budget-probes", "0"], "--budget-probes must be >= 1"),
    (["--budget-tolerance", "-1"], "--budget-tolerance must be >= 0"),
    (["--target-macs", "50%", "--settle-epochs", "1"], "--settle-epochs must be >= 0 and less than --epochs (1), got 1"),
    (["--target-macs", "50%", "--settle-epochs", "-1"], "--settle-epochs must be >= 0 and less than --epochs"),
    (["--epochs", "2", "--settle-epochs", "1"], "--settle-epochs trains without the filters a budget cuts: "
                                                "give --target-macs too"),
])
def test_search_refuses_nonsense_numbers(capsys, tmp_path, flags, message):
    fails_with(capsys, SEARCH, [*TINY, "--path_to_save", str(tmp_path), *flags], message)
    assert not any(tmp_path.iterdir())  # refused before making a folder


def test_data_folder_that_does_not_exist(capsys, tmp_path):
    fails_with(capsys, ORIGINAL, ["--data", str(tmp_path / "imagenet"), "--evaluate"], "no such folder")


@pytest.mark.parametrize("script", [SEARCH, ORIGINAL])
@pytest.mark.parametrize("flags, message", [
    (["--data", "{tmp}/imagenet"], "no such folder"),
    (["--data", "demo", "--pretrained", "{tmp}/missing.pth"], "missing.pth"),
])
def test_missing_data_or_weights_stop_a_run_before_its_folder_is_made(capsys, tmp_path, script, flags, message):
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    experiments = tmp_path / "experiments"
    fails_with(capsys, script, [*flags, "--subset", "8", "-j", "0", "--path_to_save", str(experiments)], message)
    assert not experiments.exists() or not any(experiments.iterdir())


def test_data_folder_without_train(capsys, tmp_path):
    (tmp_path / "val" / "cat").mkdir(parents=True)
    fails_with(capsys, ORIGINAL, ["--data", str(tmp_path), "--evaluate"], "no 'train' folder")


def test_no_data_at_all(capsys):
    fails_with(capsys, ORIGINAL, ["--evaluate"], "--data DIR")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_asked_for_without_a_gpu(capsys):
    fails_with(capsys, ORIGINAL, [*TINY, "--evaluate", "--device", "cuda"], "no CUDA GPU")


def test_pretrained_file_missing(capsys, tmp_path):
    fails_with(capsys, ORIGINAL, [*TINY, "--evaluate", "--pretrained", str(tmp_path / "w.pth")],
               "no such file")


def test_pretrained_weights_of_another_architecture(capsys, tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    fails_with(capsys, ORIGINAL, [*TINY, "--evaluate", "--pretrained", str(path)],
               "not a state_dict of resnet50")


def resnet18_weights_without_batch_counters(seed: int = 0) -> dict[str, torch.Tensor]:
    """A resnet18 state_dict as files saved before BatchNorm had ``num_batches_tracked``."""
    torch.manual_seed(seed)
    state = torchvision.models.resnet18().state_dict()
    return {key: value for key, value in state.items() if not key.endswith(".num_batches_tracked")}


def test_pretrained_weights_without_batchnorm_counters_load_unchanged(tmp_path):
    old_style = resnet18_weights_without_batch_counters()
    path = tmp_path / "resnet18-old.pth"
    torch.save(old_style, path)
    torch.manual_seed(1)  # the model starts from other weights
    model = build_model("resnet18", num_classes=1000)
    load_pretrained(model, str(path), "resnet18")
    loaded = model.state_dict()
    assert len(loaded) - len(old_style) == 20  # one counter per BatchNorm
    assert all(torch.equal(loaded[key], value) for key, value in old_style.items())


def test_pretrained_weights_without_batchnorm_counters_still_need_every_conv(capsys, tmp_path):
    old_style = resnet18_weights_without_batch_counters()
    del old_style["layer1.0.conv1.weight"]
    path = tmp_path / "resnet18-old.pth"
    torch.save(old_style, path)
    fails_with(capsys, ORIGINAL, [*TINY, "-a", "resnet18", "--evaluate", "--pretrained", str(path),
                                  "--path_to_save", str(tmp_path / "experiments")],
               "not a state_dict of resnet18 (1 keys missing, 0 unexpected, e.g. 'layer1.0.conv1.weight')")
    assert not (tmp_path / "experiments").exists() or not any((tmp_path / "experiments").iterdir())


def test_resume_of_a_folder_that_does_not_exist(capsys, tmp_path):
    fails_with(capsys, SEARCH, ["--resume", str(tmp_path / "gone")], "no such experiment folder")


def test_resume_of_a_folder_without_run_info(capsys, tmp_path):
    fails_with(capsys, SEARCH, ["--resume", str(tmp_path)], "no run_info.json")


def test_resume_refuses_to_change_the_recipe(capsys, tmp_path):
    (tmp_path / "run_info.json").write_text(json.dumps({"args": {"lr": 0.001}}))
    fails_with(capsys, SEARCH, ["--resume", str(tmp_path), "--lr", "0.1"], "cannot change: --lr")


@pytest.mark.parametrize("script", [RETRAIN, ORIGINAL, SEARCH_ALL_CONV], ids=["retrain", "original", "all_conv"])
@pytest.mark.slow
def test_resume_with_another_script_is_refused_and_leaves_the_folder_as_it_was(capsys, search_and_retrain, script):
    folder = search_and_retrain[0]  # made by main_search_conv12.py
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    fails_with(capsys, script, ["--resume", str(folder)],
               "this is a run of main_search_conv12.py; continue it with that script")
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == before


@pytest.mark.parametrize("below", ["", "runs"], ids=["the folder itself", "a folder above it"])
@pytest.mark.slow
def test_path_to_save_that_is_a_file_is_named_as_such(capsys, tmp_path, below):
    not_a_folder = tmp_path / "experiments"
    not_a_folder.write_text("notes\n")
    fails_with(capsys, SEARCH, [*TINY, "--path_to_save", str(not_a_folder / below)],
               f"{not_a_folder} is a file, not a folder")
    assert not_a_folder.read_text() == "notes\n"


def test_unknown_baseline_model_lists_the_known_names(capsys, registry):
    fails_with(capsys, RETRAIN, [*TINY, "--baseline_model", "nope", "--registry", str(registry)], "nope")


def test_retrain_needs_a_baseline_model(capsys):
    fails_with(capsys, RETRAIN, TINY, "--baseline_model NAME")


@pytest.mark.slow
def test_an_existing_experiment_folder_is_never_overwritten(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(search_module, "timestamp", lambda: "20260101-000000")
    existing = tmp_path / "conv12_lr_0.001_momentum_0.9_wd_0.05_normalization_div_pretrained_False_20260101-000000"
    existing.mkdir()
    (existing / "_log.txt").write_text("a previous run\n")
    fails_with(capsys, SEARCH, [*TINY, "--path_to_save", str(tmp_path)], "already exists")
    assert (existing / "_log.txt").read_text() == "a previous run\n"
    assert [path.name for path in existing.iterdir()] == ["_log.txt"]


@pytest.mark.parametrize("flags", [["-b", "1"], ["--subset", "1"]], ids=["batch of one", "one training image"])
def test_training_on_single_images_where_the_last_feature_map_is_1x1_is_refused(capsys, tmp_path, flags):
    fails_with(capsys, SEARCH, [*TINY, *flags, "--path_to_save", str(tmp_path)],
               "at --image-size 16 the last feature map is 1x1, where BatchNorm cannot train on one image")
    assert not any(tmp_path.iterdir())


def test_batch_smaller_than_the_number_of_processes_is_refused_before_any_folder(capsys, tmp_path,
                                                                                 monkeypatch):
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)  # as torchrun would start 2 processes
    fails_with(capsys, SEARCH, [*TINY, "-b", "1", "--device", "cpu", "--path_to_save", str(tmp_path)],
               "--batch-size 1 is smaller than the number of processes (2)")
    assert not any(tmp_path.iterdir())


def test_resume_may_change_how_often_checkpoints_are_saved_but_not_the_recipe(capsys, tmp_path):
    (tmp_path / "run_info.json").write_text(json.dumps({"args": {"lr": 0.001}}))
    fails_with(capsys, SEARCH, ["--resume", str(tmp_path), "--checkpoint-every", "5", "--bad-images", "skip",
                                "--momentum", "0.5"], "cannot change: --momentum")


@pytest.mark.parametrize("stored, resumed_as", [({}, "global"), ({"budget_ranking": "layer"}, "layer")],
                         ids=["recorded-before-the-flag", "recorded"])
def test_a_search_resumes_with_the_budget_ranking_it_started_with(tmp_path, stored, resumed_as):
    """A new search ranks by layer; one recorded before --budget-ranking existed ranked globally,
    and a resume must not switch its mask rule half-way."""
    from gsparsity import launch

    assert launch.parse_args("search", ["--dummy"]).budget_ranking == "layer"
    (tmp_path / "run_info.json").write_text(json.dumps({"args": {"lr": 0.001, **stored}}))
    assert launch.parse_args("search", ["--resume", str(tmp_path)]).budget_ranking == resumed_as

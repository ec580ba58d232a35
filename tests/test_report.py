"""Report: a real tiny search and its retrain, read back from TensorBoard events or from
_log.txt, tabulated and drawn; folders that are not searches or retrains are refused."""
import json
import shutil

import pytest
import torch
from PIL import Image
from scripts import SEARCH_EPOCHS, scratch_folder

from gsparsity.checkpoint import atomic_save, load_checkpoint
from gsparsity.errors import UserError
from gsparsity.masks import mask_to_record
from gsparsity.pruned_resnet import build_pruned_resnet
from gsparsity.report import (
    DPI, EVENTS, FIGURE_WIDTH, GMACS, GROUP_HEIGHT, LOG, METRICS, TOP1, TOP5, ZERO_SHARE, compare, main,
    read_experiment, read_layer_widths, table_rows, write_report,
)


@pytest.fixture(scope="module")
def tiny_runs(search_and_retrain):
    return search_and_retrain


@pytest.fixture(scope="module")
def runs_without_events(tiny_runs, tmp_path_factory):
    """Copies of both folders holding no TensorBoard files nor metrics.jsonl: only _log.txt is left to read."""
    tensorboard_files = shutil.ignore_patterns("events.out.tfevents.*", "*_per_stage_*",  # add_scalars folders
                                               "metrics.jsonl")
    with scratch_folder(tmp_path_factory, "without_events") as parent:
        for folder in tiny_runs:
            shutil.copytree(folder, parent / folder.name, ignore=tensorboard_files)
        yield tuple(parent / folder.name for folder in tiny_runs)


@pytest.mark.slow
def test_search_has_one_row_per_epoch_with_the_checkpointed_top1(tiny_runs):
    search, _ = tiny_runs
    experiment = read_experiment(search)
    checkpoint = load_checkpoint(search / "checkpoint.pth.tar")
    (small_model,) = search.glob("small_model_*_1e-06.pth.tar")  # the search's own threshold
    rows = table_rows(experiment)
    assert experiment.source == METRICS
    assert len(rows) == checkpoint["epoch"] == SEARCH_EPOCHS
    top1 = [row[1] for row in rows]
    assert max(top1) == pytest.approx(checkpoint["best_acc1"], abs=1e-4)
    assert top1[-1] == pytest.approx(load_checkpoint(small_model)["val_top1_full"], abs=1e-4)


@pytest.mark.slow
def test_retrain_starts_with_the_inherited_weights_then_one_row_per_epoch(tiny_runs):
    _, retrain = tiny_runs
    experiment = read_experiment(retrain)
    checkpoint = load_checkpoint(retrain / "checkpoint.pth.tar")
    rows = table_rows(experiment)
    assert [row[0] for row in rows] == ["start"] + [str(epoch) for epoch in range(checkpoint["epoch"])]
    log = (retrain / "_log.txt").read_text()
    assert f"inherited weights, before retraining: top1 {rows[0][1]:.3f} top5 {rows[0][2]:.3f}" in log
    assert max(row[1] for row in rows[1:]) == pytest.approx(checkpoint["best_acc1"], abs=1e-4)


@pytest.mark.slow
def test_kept_filters_per_layer_are_those_of_the_compressed_model(tiny_runs):
    search, _ = tiny_runs
    experiment = read_experiment(search)
    (small_model,) = search.glob("small_model_*_1e-06.pth.tar")  # the search's own threshold
    weights = load_checkpoint(small_model)["state_dict"]
    assert {layer.name: (layer.kept, layer.total) for layer in experiment.layers} == {
        name: (weights[f"{name}.weight"].shape[0] if f"{name}.weight" in weights else 0, record["filters"])
        for name, record in load_checkpoint(small_model)["mask"]["layers"].items()}  # 0: a dropped branch
    assert any(layer.surviving < layer.total for layer in experiment.layers)  # the search pruned


def test_the_layers_of_a_dropped_branch_keep_no_channel_whatever_survived(tmp_path):
    mask = {name: torch.ones(width, dtype=torch.bool) for name, width in
            [(f"layer{stage}.{block}.conv1", 64 * 2 ** (stage - 1)) for stage in range(1, 5) for block in range(2)]}
    mask["layer2.1.conv1"][:] = False
    atomic_save({"arch": "resnet18", "scope": "conv12", "num_classes": 10,
                 "mask": mask_to_record(mask, "resnet18", "conv12", 1e-6),
                 "state_dict": build_pruned_resnet("resnet18", mask, "conv12", 10).state_dict()},
                tmp_path / "small_model_conv12_1e-06.pth.tar")
    _, _, layers = read_layer_widths(tmp_path)
    widths = {layer.name: (layer.surviving, layer.kept) for layer in layers}
    assert widths["layer2.1.conv1"] == (0, 0) and widths["layer2.0.conv1"] == (128, 128)


@pytest.mark.slow
def test_retrain_holds_the_zero_filter_share_and_macs_of_the_search_at_its_end(tiny_runs):
    search, retrain = (read_experiment(folder) for folder in tiny_runs)
    last_epoch = search.epochs[-1]
    for name in (ZERO_SHARE, GMACS):
        assert list(retrain.series[name]) == retrain.epochs
        for value in retrain.series[name].values():
            assert value == pytest.approx(search.series[name][last_epoch], rel=1e-6), name


def test_the_retrain_next_to_a_search_is_found(tiny_runs):
    search, retrain = tiny_runs
    (comparison,) = compare([search])
    assert comparison.search.folder == search
    assert [experiment.folder for experiment in comparison.retrains] == [retrain]


def test_the_search_of_a_retrain_is_found(tiny_runs):
    search, retrain = tiny_runs
    (comparison,) = compare([retrain])
    assert comparison.search.folder == search and len(comparison.retrains) == 1


@pytest.mark.slow
def test_every_epoch_writes_one_metrics_record_with_the_figures_of_the_events(tiny_runs, tmp_path):
    for folder in tiny_runs:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [record["epoch"] for record in records] == list(range(len(records))) and records
        assert {"train/loss", "val/top1", "val/top5", "val/best_top1", "lr"} <= set(records[-1])
        copy = tmp_path / folder.name  # the same run without metrics.jsonl reads its events
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("metrics.jsonl"))
        from_metrics, from_events = read_experiment(folder), read_experiment(copy)
        assert from_metrics.source == METRICS and from_events.source == EVENTS
        assert from_metrics.series.keys() == from_events.series.keys()
        for name, values in from_events.series.items():  # events hold float32
            assert from_metrics.series[name] == pytest.approx(values, rel=1e-6), name
    search_records = [json.loads(line) for line in (tiny_runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert {"val/compressed_top1", "sparsity/zero_filter_share", "complexity/compressed_gmacs"} <= set(search_records[-1])


@pytest.mark.slow
def test_the_log_gives_the_series_of_the_events_when_they_are_gone(tiny_runs, runs_without_events):
    for with_events, without in zip(tiny_runs, runs_without_events):
        from_events, from_log = read_experiment(with_events), read_experiment(without)
        assert from_log.source == LOG
        assert from_log.epochs == from_events.epochs
        for name, rounding in ((TOP1, 1e-3), (TOP5, 1e-3), (ZERO_SHARE, 1e-6), (GMACS, 6e-3)):
            for epoch, value in from_events.series[name].items():
                assert from_log.series[name][epoch] == pytest.approx(value, abs=rounding), (name, epoch)


@pytest.mark.slow
def test_command_prints_the_table_and_draws_one_band_per_search(tiny_runs, tmp_path, capsys):
    search, retrain = tiny_runs
    out = tmp_path / "report.png"
    main([str(search), "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"search {search}" in printed and f"retrain {retrain}" in printed
    best = load_checkpoint(retrain / "checkpoint.pth.tar")["best_acc1"]
    assert f"{best:8.3f}" in printed
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (round(FIGURE_WIDTH * DPI), round(GROUP_HEIGHT * DPI))


@pytest.mark.slow
def test_two_searches_give_a_figure_twice_as_tall(tiny_runs, runs_without_events, tmp_path):
    out = tmp_path / "two.png"
    main([str(tiny_runs[0]), str(runs_without_events[0]), "--out", str(out)])
    with Image.open(out) as image:
        assert image.size == (round(FIGURE_WIDTH * DPI), round(2 * GROUP_HEIGHT * DPI))


def test_without_find_only_the_folders_given_are_shown(tiny_runs):
    (comparison,) = compare([tiny_runs[0]], find=False)
    assert comparison.retrains == []


def _missing_folder(tmp_path, baseline):
    return tmp_path / "nowhere", "no such experiment folder"


def _not_an_experiment(tmp_path, baseline):
    return tmp_path, "no run_info.json in it"


def _an_unpruned_training(tmp_path, baseline):
    return baseline.parent, "a main_original.py run"


@pytest.mark.parametrize("bad_folder", [_missing_folder, _not_an_experiment, _an_unpruned_training])
def test_bad_folder_gets_one_line_and_exit_status_2(bad_folder, baseline, tmp_path, capsys):
    folder, reason = bad_folder(tmp_path, baseline)
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), "--out", str(tmp_path / "report.png")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert reason in error and error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "report.png").exists()


def test_a_figure_name_that_is_not_png_is_refused_before_reading_anything(tmp_path):
    with pytest.raises(UserError, match="ending in .png"):
        write_report([tmp_path / "not read"], tmp_path / "report.jpg")


def test_an_existing_file_at_out_is_refused_in_one_line_and_left_as_it_was(tiny_runs, tmp_path, capsys):
    unrelated = tmp_path / "fig.png"
    unrelated.write_bytes(b"someone else's figure")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tiny_runs[0]), "--out", str(unrelated)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "already exists; use --force to replace it" in error
    assert error.count("\n") == 1 and "Traceback" not in error
    assert unrelated.read_bytes() == b"someone else's figure"
    assert [path.name for path in tmp_path.iterdir()] == ["fig.png"]  # no temporary file left either


@pytest.mark.slow
def test_force_replaces_an_existing_file_at_out(tiny_runs, tmp_path):
    out = tmp_path / "fig.png"
    out.write_bytes(b"an old figure")
    main([str(tiny_runs[0]), "--out", str(out), "--force"])
    with Image.open(out) as image:
        assert image.format == "PNG"


@pytest.mark.slow
def test_a_second_report_into_the_default_file_needs_force(tiny_runs, tmp_path, capsys):
    search = tmp_path / tiny_runs[0].name  # a copy of what the report reads, so report.png lands there
    search.mkdir()
    for pattern in ("run_info.json", "_log.txt", "small_model_*.pth.tar"):
        for path in tiny_runs[0].glob(pattern):
            shutil.copy(path, search / path.name)
    main([str(search), "--no-find"])
    first = (search / "report.png").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main([str(search), "--no-find"])
    assert exit_info.value.code == 2
    assert f"{search / 'report.png'} already exists" in capsys.readouterr().err
    assert (search / "report.png").read_bytes() == first
    main([str(search), "--no-find", "--force"])
    assert f"wrote {search / 'report.png'}" in capsys.readouterr().out

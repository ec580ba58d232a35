"""What a finished search leaves for the retrain: the compressed model at its own threshold
and, as the original's search does, at each of the original's thresholds."""
import shutil

import pytest
from scripts import REPO, TINY, only_folder, run_script

from gsparsity.checkpoint import load_checkpoint
from gsparsity.masks import mask_from_record
from gsparsity.registry import register_experiment, resolve
from gsparsity.search import ORIGINAL_THRESHOLDS


def kept_filters(small_model_file) -> int:
    saved = load_checkpoint(small_model_file)
    mask = mask_from_record(saved["mask"], arch=saved["arch"], scope=saved["scope"])
    return sum(int(row.sum()) for row in mask.values())


@pytest.mark.slow
def test_a_finished_search_saves_every_original_threshold_and_logs_each(search_and_retrain):
    search = search_and_retrain[0]
    kept = []
    for threshold in ORIGINAL_THRESHOLDS:
        assert (search / f"mask_conv12_{threshold:g}.json").is_file()
        kept.append(kept_filters(search / f"small_model_conv12_{threshold:g}.pth.tar"))
    assert kept == sorted(kept, reverse=True)  # a higher threshold keeps no more filters
    assert kept[0] > kept[-1]  # and the thresholds do differ on this search
    log = (search / "_log.txt").read_text()
    for threshold in ORIGINAL_THRESHOLDS[1:]:  # 1e-6 is the search's own: logged at every epoch
        line = next(line for line in log.splitlines() if f"threshold {threshold:g}: " in line)
        assert "GMac" in line and "% of the MACs" in line and "output deviation" in line


@pytest.mark.slow
def test_the_registry_takes_the_searchs_own_threshold_not_the_newest_file(search_and_retrain, registry, tmp_path):
    search = tmp_path / "search"
    shutil.copytree(search_and_retrain[0], search)
    (search / "small_model_conv12_0.1.pth.tar").touch()  # the newest file, but not the run's threshold
    register_experiment("copy", search, registry)
    assert resolve("copy", registry).small_model.name == "small_model_conv12_1e-06.pth.tar"


@pytest.mark.slow
def test_retrain_takes_any_of_the_saved_thresholds(search_and_retrain, tmp_path):
    registry = tmp_path / "list_of_models.py"
    shutil.copy(REPO / "list_of_models.py", registry)
    register_experiment("tiny", search_and_retrain[0], registry)
    result = run_script("main_reduce_retrain_conv12.py", *TINY, "--baseline_model", "tiny", "--registry", str(registry),
                        "--pruning_threshold", "1e-2", "--evaluate", "--path_to_save", str(tmp_path))
    assert "small_model_conv12_0.01.pth.tar" in result.stdout
    assert "inherited weights, before retraining: top1" in result.stdout


@pytest.mark.slow
def test_evaluating_a_finished_search_writes_the_thresholds_it_lacks(search_and_retrain, tmp_path):
    search = tmp_path / "search"
    shutil.copytree(search_and_retrain[0], search)
    for file in search.glob("*_conv12_0.01.*"):
        file.unlink()
    run_script("main_search_conv12.py", "--resume", str(search), "--evaluate")
    assert (search / "small_model_conv12_0.01.pth.tar").is_file()
    assert (search / "mask_conv12_0.01.json").is_file()
    only_folder(search.parent, "search")  # and no new experiment folder beside it

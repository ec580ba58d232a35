"""demo.sh's recipe, scaled down (ResNet-18, 16x16, 400 images), checked by its outcome in bands, not
exact figures: training on the digits is chaotic enough that the float summation order (the thread
count, the CPU) moves any single figure."""
import json
import re
from pathlib import Path

import pytest
import torch
from scripts import only_folder, run_script

from gsparsity.compression import compressed_model_file
from gsparsity.report import EPOCH_DONE

COMMON = ["--data", "demo", "-a", "resnet18", "--image-size", "16", "--subset", "400", "-b", "32", "-j", "0",
          "-p", "1000", "--seed", "0"]
# Baseline and retrain clip gradients (as demo.sh); the search does not.
TRAIN = ["--lr", "0.02", "--lr-scheduler", "cosine", "--clip-grad-norm", "10"]
# Seen with this recipe, seed 0, at 1 and at 2 threads alike: baseline 84.4; the search's compressed model,
# BatchNorm recalibrated, 92.8; retrained 91.9. (Before clipping and two settling epochs, seeds 0-2 at 1 and 2
# threads: baseline 84.4-88.6, search 6.9 below to 6.7 above it, retrained 0.3 below to 3.6 above.) The bands
# leave room for another CPU's summation order and still fail a pipeline that breaks the model (a collapsed
# search or retrain sits at 10-50%).
BASELINE_AT_LEAST = 70.0
RETRAIN_BELOW_BASELINE_AT_MOST = 10.0
# The search keeps what it prunes (--settle-epochs): its compressed model, BatchNorm recalibrated.
SEARCH_BELOW_BASELINE_AT_MOST = 15.0
SHARE = re.compile(r"epoch \d+ compressed model: .*\((?P<share>[\d.]+)% of the MACs")


def epoch_top1s(folder: Path) -> list[float]:
    lines = (folder / "_log.txt").read_text().splitlines()
    return [float(match["top1"]) for match in map(EPOCH_DONE.search, lines) if match]


@pytest.mark.slow
def test_the_demo_recipe_compresses_to_half_the_macs_and_retrains_to_its_baselines_accuracy(tmp_path):
    registry = tmp_path / "list_of_models.py"
    registry.write_text("MODELS = {}\n")
    run_script("main_original.py", *COMMON, "--epochs", "4", *TRAIN, "--path_to_save", str(tmp_path))
    baseline = only_folder(tmp_path, "original_resnet18_*")
    run_script("main_search_conv12.py", *COMMON, "--pretrained", str(baseline / "checkpoint.pth.tar"),
               "--epochs", "3", "--lr", "0.05", "--no-adaptive_lr", "--normalization", "none", "--weight_decay", "0.1",
               "--group", "channel", "--pruning_threshold", "1e-3", "--target-macs", "50%", "--budget-ranking",
               "layer", "--budget-steps", "2", "--budget-probes", "1", "--bn-calibration-images", "64",
               "--lr-scheduler", "cosine", "--settle-epochs", "2",
               "--register", "demo", "--registry", str(registry), "--path_to_save", str(tmp_path))
    search = only_folder(tmp_path, "conv12_*")
    run_script("main_reduce_retrain_conv12.py", *COMMON, "--epochs", "4", *TRAIN,
               "--baseline_model", "demo", "--registry", str(registry),
               "--path_to_save", str(tmp_path))
    retrain = only_folder(tmp_path, "retrain_*")

    baseline_top1 = epoch_top1s(baseline)[-1]
    shares = [float(match["share"]) for match in map(SHARE.search, (search / "_log.txt").read_text().splitlines())
              if match]
    retrain_top1 = epoch_top1s(retrain)[-1]
    searched = torch.load(compressed_model_file(search), weights_only=True)
    print(f"baseline {baseline_top1}, MACs kept {shares[-1]}%, search's compressed model "
          f"{searched['val_top1_recalibrated']} (recalibrated), retrained {retrain_top1}")
    assert searched["val_top1_compressed"] == searched["val_top1_full"]  # settled: exact
    assert searched["val_top1_recalibrated"] >= baseline_top1 - SEARCH_BELOW_BASELINE_AT_MOST
    assert baseline_top1 >= BASELINE_AT_LEAST
    assert 45.0 <= shares[-1] <= 50.0  # the budget, met and not overshot
    assert json.loads((search / "run_info.json").read_text())["args"]["budget_ranking"] == "layer"
    assert retrain_top1 >= baseline_top1 - RETRAIN_BELOW_BASELINE_AT_MOST

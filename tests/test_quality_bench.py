"""bench/quality.py at toy size: every method runs, meets the MACs budget, and the outputs are
written; a second run reuses the finished runs. The figures themselves come from running it
at its default size (BENCHMARKS.md), never from here."""
import csv
import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from scripts import REPO

TOY = ["--image-size", "16", "--subset", "32", "-b", "16", "-j", "0", "--seeds", "0", "--budgets", "50%",
       "--baseline-epochs", "1", "--search-epochs", "1", "--retrain-epochs", "1", "--tp-steps", "60",
       "--search-flags", "--lr 0.05 --no-adaptive_lr --normalization none --weight_decay 1.0 --group channel "
                         "--pruning_threshold 1e-3 --budget-steps 2 --budget-probes 1 --bn-calibration-images 16"]
METHODS = {"gsparsity", "l1", "random", "scratch", "torch_pruning"}


def run_bench(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/quality.py", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={"OMP_NUM_THREADS": "2", **os.environ})


@pytest.mark.slow
def test_every_method_meets_the_budget_and_the_table_json_csv_and_png_are_written(tmp_path):
    out = tmp_path / "quality"
    done = run_bench(*TOY, "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    progress = [line for line in done.stdout.splitlines() if "min left" in line]
    assert len(progress) == 1 + len(METHODS)  # the unpruned reference, then each method
    results = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in results["summary"]}
    assert set(rows) == METHODS | {"unpruned"}
    full = rows["unpruned"]["gmacs"]
    for method in METHODS:
        row = rows[method]
        assert row["budget"] == 0.5 and row["runs"] == 1
        assert 0.3 * full < row["gmacs"] <= 0.5 * full, (method, row["gmacs"], full)  # met, not far below
        assert 0 <= row["top1_mean"] <= 100 and row["mparams"] < rows["unpruned"]["mparams"]
    assert rows["l1"]["gmacs"] == rows["random"]["gmacs"]  # the same widths, other filters
    assert rows["scratch"]["gmacs"] == rows["gsparsity"]["gmacs"]  # the searched architecture
    with open(out / "results.csv") as file:
        assert len(list(csv.DictReader(file))) == len(rows)
    with Image.open(out / "quality.png") as image:
        assert image.format == "PNG" and image.width > 300
    assert "| 50% | gsparsity |" in done.stdout

    folders = sorted((out / "runs").iterdir())
    again = run_bench(*TOY, "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted((out / "runs").iterdir()) == folders  # nothing trained twice
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]

    # The ablations retrain the same search: its weights rescaled, or its mask on the baseline's weights.
    ablations = run_bench(*TOY, "--methods", "gsparsity_rescaled", "gsparsity_mask", "--out", str(out))
    assert ablations.returncode == 0, ablations.stdout[-3000:] + ablations.stderr[-3000:]
    ablated = {row["method"]: row for row in json.loads((out / "results.json").read_text())["summary"]}
    assert set(ablated) == {"gsparsity_rescaled", "gsparsity_mask"}  # the table of this run's methods
    assert ablated["gsparsity_mask"]["gmacs"] == ablated["gsparsity_rescaled"]["gmacs"] == rows["gsparsity"]["gmacs"]
    logs = {folder.name.split("_p50_")[0]: (folder / "_log.txt").read_text() for folder in (out / "runs").iterdir()
            if folder.name.startswith("retrain_resnet50_q_gsparsity")}
    assert "--inherit start: the search's mask on the weights it started from" in logs["retrain_resnet50_q_gsparsity_mask"]
    assert "--rescale-filters: branch filters scaled" in logs["retrain_resnet50_q_gsparsity_rescaled"]
    assert "--inherit start" not in logs["retrain_resnet50_q_gsparsity"]


@pytest.mark.slow
def test_a_budget_outside_0_to_100_percent_is_refused_in_one_line(tmp_path):
    done = run_bench("--budgets", "150%", "--out", str(tmp_path / "quality"))
    assert done.returncode == 2 and "150%" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "quality").exists()

"""bench/quality.py at toy size: every method runs, meets the MACs budget, and the outputs are
written; a second run reuses the finished runs. The figures themselves come from running it
at its default size (BENCHMARKS.md), never from here."""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

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

    # --distill: every retrain learns from the seed's baseline, as new runs beside the plain ones.
    distilled = run_bench(*TOY, "--methods", "l1", "gsparsity_mask", "--distill", "--out", str(out))
    assert distilled.returncode == 0, distilled.stdout[-3000:] + distilled.stderr[-3000:]
    baseline = Path(json.loads((out / "baseline_seed0.json").read_text())["checkpoint"]).resolve()
    teachers = [folder for folder in (out / "runs").iterdir()
                if f"distilling from the unpruned resnet50 in {baseline}" in (folder / "_log.txt").read_text()]
    assert {folder.name.split("_p50_")[0] for folder in teachers} == {"retrain_resnet50_q_l1",
                                                                       "retrain_resnet50_q_gsparsity_mask"}


@pytest.mark.slow
def test_a_budget_outside_0_to_100_percent_is_refused_in_one_line(tmp_path):
    done = run_bench("--budgets", "150%", "--out", str(tmp_path / "quality"))
    assert done.returncode == 2 and "150%" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "quality").exists()


def load_bench_module():
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_combine_summarises_only_the_runs_made_with_the_commands_settings(tmp_path):
    """Variants (say --retrain-flags with label smoothing) share one --out and its runs.jsonl;
    a summary of one variant must not pool the others' runs of the same method."""
    quality = load_bench_module()
    flags = ["--image-size", "16", "--methods", "l1", "--budgets", "50%", "--out", str(tmp_path / "sum")]
    asked = quality.Bench(quality.build_parser().parse_args(flags))
    other = quality.Bench(quality.build_parser().parse_args([*flags, "--retrain-flags", "--label-smoothing 0.1"]))
    runs = tmp_path / "runs"
    runs.mkdir()
    records = [quality.Record("l1", 0.5, seed, top1, 2 * 10**9, 10**7, 1.0, "f", bench.key("l1", 0.5, seed))
               for bench, top1 in ((asked, 90.0), (other, 10.0)) for seed in (0, 1)]
    (runs / "runs.jsonl").write_text("".join(json.dumps(asdict(record)) + "\n" for record in records))
    done = run_bench("--seeds", "--combine", str(runs), *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 50% | l1 | 90.00 ± 0.00 | 2 |" in done.stdout  # the label-smoothing runs (10.0) left out

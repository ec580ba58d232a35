"""The bench scripts run, at toy sizes, and print the figures BENCHMARKS.md quotes.

No timing is asserted here (this machine is shared and noisy): the figures themselves
come from running the scripts at their default sizes, as BENCHMARKS.md shows.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from scripts import REPO

RATIO = r"\d+\.\d+"


def run_bench(*argv: str) -> str:
    done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_optimizer_step_prints_proxsgd_against_adam_and_sgd():
    out = run_bench("bench/optimizer_step.py", "--repeats", "1", "--warmup", "0", "--threads", "1", "--channels-last")
    assert out.splitlines()[1].endswith("1 CPU threads, freed memory kept")  # as the scripts run on the CPU
    assert "channels_last True" in out
    assert re.search(rf"ProxSGD/Adam {RATIO}", out) and re.search(rf"ProxSGD/SGD  {RATIO}", out)


@pytest.mark.slow
def test_search_step_prints_the_step_ratio_and_its_verdict():
    out = run_bench("bench/search_step.py", "--batch-size", "2", "--image-size", "32", "--repeats", "1",
                    "--warmup", "0", "--threads", "1", "--amp", "--channels-last")
    assert "amp True, channels_last True" in out
    assert out.splitlines()[1].endswith("1 CPU threads, freed memory kept")  # as the scripts run on the CPU
    assert re.search(rf"ProxSGD step / SGD step {RATIO} \(target <= 1.05: (met|NOT MET)\)", out)


@pytest.mark.slow
def test_latency_prints_every_form_asked_for_and_the_target_verdict():
    out = run_bench("bench/latency.py", "--batch-sizes", "32", "--image-size", "32", "--repeats", "1",
                    "--warmup", "0", "--threads", "1", "--round-to", "8", "--amp", "--floor", "--no-keep-freed-memory")
    assert out.splitlines()[1].endswith("malloc's default")
    header = next(line for line in out.splitlines() if line.startswith("model"))
    for form in ("plain ms", "fused ms", "fused-cl ms", "amp-cl ms"):
        assert form in header
    rows = [line for line in out.splitlines() if line.startswith(("full resnet50", "random conv12", "conv12 floor"))]
    assert len(rows) == 4  # full, random mask, the same rounded to multiples of 8, the floor
    # a verdict for each mask; for each, what the floor allows next to what the target asks
    assert len(re.findall(rf"inference speedup / MACs reduction {RATIO} >= 0.8: (met|NOT MET)", out)) == 2
    assert len(re.findall(rf"floor: the narrowest conv12 model is {RATIO}x faster here; .* is {RATIO}x, "
                          rf"the target asks {RATIO}x", out)) == 2


@pytest.mark.slow
def test_train_throughput_prints_img_per_second_of_search_and_retrain_in_bf16_and_channels_last():
    out = run_bench("bench/train_throughput.py", "--dummy", "--batch-size", "2", "--image-size", "32",
                    "--repeats", "1", "--warmup", "0", "--threads", "1", "--amp", "--channels-last",
                    "--scope", "all_conv")
    assert "amp True, channels_last True, retrain mask all_conv" in out
    assert re.search(rf"search eager +{RATIO} +{RATIO}", out) and re.search(rf"retrain eager +{RATIO} +{RATIO}", out)


@pytest.mark.slow
def test_residual_add_prints_both_forms_and_their_ratio():
    out = run_bench("bench/residual_add.py", "--batch-size", "2", "--image-size", "32", "--repeats", "1",
                    "--warmup", "0", "--threads", "1", "--channels-last")
    assert "channels_last True" in out and out.splitlines()[1].endswith("freed memory kept")
    assert re.search(rf"torch index_add +{RATIO} +{RATIO}", out) and re.search(rf"add_at_channels +{RATIO} +{RATIO}", out)
    assert re.search(rf"torch index_add step / add_at_channels step {RATIO}", out)


@pytest.mark.slow
def test_compress_prints_its_time_against_the_target():
    out = run_bench("bench/compress.py", "--repeats", "1", "--threads", "1", "--no-keep-freed-memory")
    assert "1 CPU threads, malloc's default" in out.splitlines()[1]
    assert re.search(rf"resnet50 conv12: {RATIO} s .*target < 0.5 s", out)


@pytest.mark.parametrize("part", ["", "nonsense"])
def test_the_gpu_runner_refuses_a_part_it_does_not_know(part, tmp_path):
    done = subprocess.run(["bash", "bench/gpu.sh", part], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "RESULTS": str(tmp_path / "results")})
    assert done.returncode == 2 and "usage: bash bench/gpu.sh train|latency" in done.stderr
    assert not (tmp_path / "results").exists()

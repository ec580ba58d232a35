"""Two CPU processes (torchrun, gloo) run the same search as one process would; how a
launch decides on processes and devices."""
import re
from pathlib import Path

import pytest
import torch
from scripts import TINY, only_folder, run_script

from gsparsity import distributed, launch
from gsparsity.distributed import LaunchSettings, configure_cudnn
from gsparsity.errors import UserError
from gsparsity.experiment import write_run_info
from gsparsity.masks import load_mask

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


@pytest.mark.slow
def test_two_process_search_writes_what_one_process_writes_and_ranks_agree(baseline, tmp_path):
    # lr 1 and a tiny momentum (the weight of the new gradient): each step is nearly the pure
    # proximal one, so which filters reach zero is set by their norms against mu (about half
    # do), hardly by the gradients, in which the runs differ: each process normalises its own
    # half batch in BatchNorm. Default flags prune nothing here; momentum 0.9 prunes 124
    # filters with one process and a mostly different 84 with two.
    flags = [*TINY, "--pretrained", str(baseline), "--lr", "1", "--momentum", "1e-4", "--no-adaptive_lr",
             "--normalization", "none", "--no-layer_adaptive", "--weight_decay", "1"]
    run_script("main_search_conv12.py", *flags, "--path_to_save", str(tmp_path / "one"))
    double = run_script("main_search_conv12.py", *flags, "--path_to_save", str(tmp_path / "two"),
                        launcher=TORCHRUN, OMP_NUM_THREADS="1")
    one = only_folder(tmp_path / "one", "conv12_*")
    two = only_folder(tmp_path / "two", "conv12_*")
    kinds = lambda folder: sorted(re.sub(r"events\.out\.tfevents.*", "events", p.name) for p in folder.iterdir())
    assert kinds(one) == kinds(two)
    log = (two / "_log.txt").read_text()
    assert "mask agreed by all 2 processes" in log
    assert "on 2 process(es)" in log and "on 1 process(es)" in (one / "_log.txt").read_text()
    assert "Traceback" not in double.stderr
    # What they computed. The masks: equal (seen so), up to 1% of the filters near the threshold.
    mask_one, _ = load_mask(one / "mask_conv12_1e-06.json", "resnet50", "conv12")
    mask_two, _ = load_mask(two / "mask_conv12_1e-06.json", "resnet50", "conv12")
    filters = sum(row.numel() for row in mask_one.values())
    zero = sum(int((~row).sum()) for row in mask_one.values())
    assert 0.1 * filters < zero < 0.9 * filters  # the search prunes for real
    differing = sum(int((mask_one[name] != row).sum()) for name, row in mask_two.items())
    assert differing <= 0.01 * filters, f"{differing} of {filters} filters pruned in one run only"
    # The last validation, of 32 images: top-1 within two images, top-5 within three (equal and
    # one apart seen). The model is near chance here (top-1 2 of 32, top-5 about half): these
    # bands catch a wrong reduction over the processes (e.g. counts doubled), not small drifts.
    (top1_one, top5_one), (top1_two, top5_two) = last_validation(one), last_validation(two)
    image = 100 / 32
    assert abs(top1_one - top1_two) <= 2 * image + 1e-6, (top1_one, top1_two)
    assert abs(top5_one - top5_two) <= 3 * image + 1e-6, (top5_one, top5_two)


def last_validation(folder: Path) -> tuple[float, float]:
    """(top-1, top-5) of a run's last epoch, from its _log.txt."""
    found = re.findall(r"\| val loss \S+ top1 (\S+) top5 (\S+) \|", (folder / "_log.txt").read_text())
    assert found, folder
    return float(found[-1][0]), float(found[-1][1])


@pytest.mark.slow
def test_two_processes_report_the_same_validation_top1_as_one(baseline):
    flags = [*TINY, "--pretrained", str(baseline), "--evaluate"]
    top1 = lambda output: re.search(r"validation: top1 (\S+) top5 (\S+)", output).groups()
    single = run_script("main_original.py", *flags)
    double = run_script("main_original.py", *flags, launcher=TORCHRUN, OMP_NUM_THREADS="1")
    assert top1(single.stdout) == top1(double.stdout)


@pytest.mark.slow
def test_two_processes_search_on_a_budget_with_the_same_mu(tmp_path):
    # Each process probes on its own batches; were their mu to differ, their weights would
    # diverge under DDP and the mask check at the epoch end would stop the run. Unseeded and
    # not pretrained: each process draws its own starting weights, and rank 0's must win
    # before the probes and the budget's start-of-search norms, not only once DDP wraps.
    unseeded = TINY[: TINY.index("--seed")] + TINY[TINY.index("--seed") + 2:]
    double = run_script("main_search_conv12.py", *unseeded, "-a", "resnet18", "--lr", "0.5", "--no-adaptive_lr",
                        "--normalization", "none", "--target-macs", "70%", "--budget-steps", "2",
                        "--budget-probes", "3", "--path_to_save", str(tmp_path),
                        launcher=TORCHRUN, OMP_NUM_THREADS="1")
    log = (only_folder(tmp_path, "conv12_*") / "_log.txt").read_text()
    assert "budget search: mu" in log and "mask agreed by all 2 processes" in log
    assert re.search(r"epoch 0 budget: [\d.]+ GMac \((\d+\.\d)% of the MACs\) for a target", log)
    assert "Traceback" not in double.stderr


@pytest.mark.slow
def test_two_processes_stop_together_when_the_register_name_is_taken(tmp_path):
    registry = tmp_path / "list_of_models.py"
    registry.write_text("MODELS = {'run': {'experiment_dir': 'conv12_other', 'small_model': 'small.pth.tar', "
                        "'mask': 'mask.json', 'scope': 'conv12', 'arch': 'resnet50'}}\n")
    double = run_script("main_search_conv12.py", *TINY, "--register", "run", "--registry", str(registry),
                        "--path_to_save", str(tmp_path / "experiments"), "--dist-timeout", "1",
                        launcher=TORCHRUN, expect=1, OMP_NUM_THREADS="1")  # torchrun's status for failed workers
    refusal = "main_search_conv12.py: error: --register run: model registry"
    assert double.stderr.count(refusal) == 2  # one line from each process, neither left waiting
    assert "exitcode  : 2" in double.stderr  # (torchrun's own report of the failure has a traceback)
    assert "gsparsity/" not in double.stderr and "timed out" not in double.stderr.lower()
    assert not (tmp_path / "experiments").exists()


@pytest.mark.parametrize("seed", [None, 0])
def test_cudnn_tunes_its_algorithms_unless_the_run_is_seeded(monkeypatch, seed):
    """On a GPU: cuDNN's autotuner for speed; with --seed, its deterministic algorithms."""
    # Set to the opposite first, and restored after the test.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", seed is not None)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", seed is None)
    configure_cudnn(seeded=seed is not None)
    assert torch.backends.cudnn.benchmark is (seed is None)
    assert torch.backends.cudnn.deterministic is (seed is not None)


def pretend_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("gpus, nodes, spawned", [(4, -1, 4), (1, -1, 0), (1, 2, 1), (0, -1, 0)])
def test_a_plain_launch_spawns_one_process_per_gpu_and_joins_other_nodes_even_with_one(
        monkeypatch, gpus, nodes, spawned):
    pretend_gpus(monkeypatch, gpus)
    node = ["--rank", "0", "--dist-url", "tcp://127.0.0.1:29500"] if nodes > 1 else []
    args = launch.parse_args("original", ["--dummy", "--world-size", str(nodes), *node])
    assert distributed.processes_to_spawn(LaunchSettings.from_args(args)) == spawned


def test_spawned_processes_get_their_places_from_the_plan_and_the_flags_stay_as_typed(monkeypatch):
    """Node 1 of 2, 4 GPUs each: its processes are ranks 4-7 of 8. The plan holds the run's 8
    processes; the settings (frozen) keep --world-size 2 as typed, as run_info.json does, so a
    resumed run does not multiply it again."""
    pretend_gpus(monkeypatch, 4)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    args = launch.parse_args("original", ["--dummy", "--world-size", "2", "--rank", "1"])
    settings = LaunchSettings.from_args(args)
    plan = distributed.prepare_spawn(settings, distributed.processes_to_spawn(settings))
    assert (plan.world_size, settings.world_size, args.world_size) == (8, 2, 2)
    assert [distributed.process_place(settings, index, plan) for index in range(4)] == [
        (4, 8, 0), (5, 8, 1), (6, 8, 2), (7, 8, 3)]


@pytest.mark.parametrize("flags, environment, refusal", [
    (["--dist-url", "tcp://127.0.0.1:29500"], {}, r"give each node its --rank, 0 to 1 \(got -1\)"),
    (["--rank", "2", "--dist-url", "tcp://127.0.0.1:29500"], {}, r"give each node its --rank, 0 to 1 \(got 2\)"),
    (["--rank", "1"], {}, "set MASTER_ADDR and MASTER_PORT to node 0's address on every node"),
    (["--rank", "1"], {"MASTER_ADDR": "10.0.0.1"}, "set MASTER_ADDR and MASTER_PORT"),
])
def test_a_node_of_several_that_could_not_meet_the_others_is_refused_before_spawning(
        monkeypatch, flags, environment, refusal):
    """Every node would otherwise wait for its peers until --dist-timeout: nodes without
    their own --rank all claim ranks 0..N-1, and env:// without MASTER_ADDR/PORT would
    make each node its own master on a random port."""
    pretend_gpus(monkeypatch, 4)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    args = launch.parse_args("original", ["--dummy", "--world-size", "2", *flags])
    with pytest.raises(UserError, match=refusal):
        distributed.processes_to_spawn(LaunchSettings.from_args(args))
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    args = launch.parse_args("original", ["--dummy", "--world-size", "2", "--rank", "1"])
    assert distributed.processes_to_spawn(LaunchSettings.from_args(args)) == 4


def test_several_nodes_without_gpus_and_without_torchrun_are_refused(monkeypatch):
    pretend_gpus(monkeypatch, 0)
    args = launch.parse_args("original", ["--dummy", "--world-size", "2"])
    with pytest.raises(UserError, match="on CPUs start every node with torchrun"):
        distributed.processes_to_spawn(LaunchSettings.from_args(args))


def test_a_resumed_run_runs_where_the_resuming_command_says_not_where_it_first_ran(tmp_path, monkeypatch, capsys):
    """run_info.json is written by rank 0 of node 0: restoring its --rank would give every
    node rank 0, and its --gpu could not be cleared when resuming under torchrun."""
    launch_flags = ["--device", "cuda", "--gpu", "0", "--world-size", "2", "--rank", "0",
                    "--dist-url", "tcp://10.0.0.1:23456", "--dist-backend", "gloo"]
    first = launch.parse_args("original", ["--dummy", "--epochs", "3", *launch_flags])
    write_run_info(tmp_path, first, "main_original.py", {})
    resumed = launch.parse_args("original", ["--resume", str(tmp_path)])
    note = capsys.readouterr().err  # said once, on one line, so that the move is not silent
    assert note.count("\n") == 1 and "the run started with --device cuda (now auto), --dist-backend gloo" in note
    defaults = launch.parse_args("original", ["--dummy"])
    for flag in ("device", "gpu", "world_size", "rank", "dist_url", "dist_backend"):
        assert getattr(resumed, flag) == getattr(defaults, flag), flag
    assert resumed.epochs == 3 and resumed.dummy  # the run's own settings do come back
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    # no "--gpu 0 under torchrun"
    assert distributed.process_place(LaunchSettings.from_args(resumed), None) == (1, 2, 1)
    node_one = launch.parse_args("original", ["--resume", str(tmp_path), "--world-size", "2", "--rank", "1"])
    assert (node_one.world_size, node_one.rank) == (2, 1)


def test_gpu_is_refused_with_several_nodes_without_torchrun(monkeypatch):
    pretend_gpus(monkeypatch, 2)
    args = launch.parse_args("original", ["--dummy", "--world-size", "2", "--gpu", "1"])
    with pytest.raises(UserError, match="--gpu 1 runs one process alone; with --world-size 2 leave it out"):
        distributed.processes_to_spawn(LaunchSettings.from_args(args))


def test_a_process_on_a_gpu_sets_cudnn_up(monkeypatch):
    pretend_gpus(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    ctx = distributed.setup(LaunchSettings.from_args(launch.parse_args("original", ["--dummy", "--device", "cuda"])))
    assert ctx.device == torch.device("cuda", 0)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic


def test_gpu_is_refused_under_a_multi_process_torchrun(monkeypatch):
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    args = launch.parse_args("original", ["--dummy", "--device", "cpu", "--gpu", "0"])
    with pytest.raises(UserError, match="--gpu 0 under torchrun: each process uses the GPU of its LOCAL_RANK"):
        distributed.setup(LaunchSettings.from_args(args))

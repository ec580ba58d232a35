"""--target-macs: the budget search picks mu by bisection over short probes that
predict which filters ProxSGD is driving to zero."""
import copy
import json
import math
import re

import pytest
import torch
import torchvision

from gsparsity.budget import (BudgetSettings, MuProbe, Probe, bisect_mu, budget_mask, mask_macs, parse_target, projected_mask,
                              smallest_macs, start_norms, target_macs)
from gsparsity.cli import build_parser
from gsparsity.distributed import DistContext
from gsparsity.engine import LoopSettings
from gsparsity.errors import UserError
from gsparsity.masks import compute_mask, load_mask
from gsparsity.search_optimizer import ProxSettings
from proxsgd import ProxSGD, group_model_parameters
from scripts import TINY, only_folder, run_script

CPU_ONLY = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_target_is_gmac_or_a_share_of_the_full_model():
    assert parse_target("50%") == (0.5, True)
    assert parse_target("2.05") == (pytest.approx(2.05e9), False)
    assert parse_target("2.05G") == (pytest.approx(2.05e9), False)
    assert target_macs("25%", 4_000_000_000) == 1_000_000_000
    assert target_macs("1.5", 4_000_000_000) == 1_500_000_000


@pytest.mark.parametrize("text", ["", "half", "0", "0%", "100%", "150%", "-1", "2 MMac", "nan"])
def test_nonsense_targets_are_refused(text):
    with pytest.raises(UserError, match="--target-macs"):
        parse_target(text)


def exponential_share(mu: float):
    """A stand-in probe: the share of MACs kept falls smoothly as mu grows."""
    share = math.exp(-mu)
    return Probe(mu=mu, macs=round(1e9 * share), share=share)


def test_bisection_brackets_the_target_then_lands_within_the_tolerance():
    best, probes = bisect_mu(exponential_share, 0.3, start_mu=0.01, max_probes=20, tolerance=0.005)
    assert abs(best.share - 0.3) <= 0.005
    assert probes[-1] is best
    # Bracketing: mu grows x4 from the start while the model stays above the target.
    assert [probe.mu for probe in probes[:5]] == pytest.approx([0.01, 0.04, 0.16, 0.64, 2.56])
    # Then every probe lies between the nearest probes on either side of the target.
    for index in range(5, len(probes)):
        above = max(p.mu for p in probes[:index] if p.share > 0.3)
        below = min(p.mu for p in probes[:index] if p.share <= 0.3)
        assert above < probes[index].mu < below


def test_bisection_searches_downwards_when_the_start_prunes_too_much():
    best, probes = bisect_mu(exponential_share, 0.9, start_mu=5.0, max_probes=20, tolerance=0.005)
    assert probes[1].mu == pytest.approx(5.0 / 4)
    assert abs(best.share - 0.9) <= 0.005


def test_bisection_stops_after_max_probes_with_the_nearest():
    best, probes = bisect_mu(exponential_share, 0.3, start_mu=0.01, max_probes=3, tolerance=0.0)
    assert len(probes) == 3
    assert best == min(probes, key=lambda probe: abs(probe.share - 0.3))


def search_args(*flags: str):
    # --layer_adaptive as search() resolves it for conv12, which these probes search
    return build_parser("search").parse_args(["--dummy", "-a", "resnet18", "--layer_adaptive", *flags])


def tiny_batches(count: int):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator))
            for _ in range(count)]


def budget_of(*flags: str) -> BudgetSettings:
    return BudgetSettings.from_args(search_args(*flags))


def probe_of(model, args, batches, full_macs: int, search_lrs: list[float]) -> MuProbe:
    """The budget search's probe over 10 classes, with the settings of ``args``."""
    return MuProbe(model, prox_settings(args), BudgetSettings.from_args(args), LoopSettings.from_args(args),
                   CPU_ONLY, batches, 10, full_macs, search_lrs)


def prox_settings(args) -> ProxSettings:
    return ProxSettings.from_args(args, "conv12")


def run_proxsgd(model, args, mu: float, batches) -> None:
    # Built by hand from the flags, not by search_optimizer: the probe is checked against ProxSGD itself.
    groups = group_model_parameters(model, mu, layer_adaptive=args.layer_adaptive, group=args.group)
    optimizer = ProxSGD(groups, lr=args.lr, momentum=args.momentum, adaptive_lr=args.adaptive_lr,
                        normalization=args.normalization)
    model.train()
    for images, target in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), target).backward()
        optimizer.step()


@pytest.fixture
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


# A fresh ResNeXt's gradients at lr 1 dwarf its weights; a small momentum (the weight of
# the new gradient) keeps its step near the pure proximal one, which prunes the layer1-3 groups.
@pytest.mark.parametrize("arch, mu, momentum", [("resnet18", 1.5, "0.9"), ("resnext50_32x4d", 3.0, "1e-4")])
@pytest.mark.slow
def test_with_lr_1_a_probe_predicts_exactly_what_the_same_steps_prune(arch, mu, momentum, one_thread):
    # lr 1 moves each filter to its proximal point, so "heading to zero" is "zero now".
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=10)
    args = search_args("-a", arch, "--lr", "1", "--no-adaptive_lr", "--normalization", "none",
                       "--momentum", momentum, "--budget-steps", "2")
    batches = tiny_batches(2)
    full_macs = mask_macs(arch, compute_mask(model, 1e-6), "conv12", 10)
    copy_of_start = copy.deepcopy(model)
    probe = probe_of(model, args, batches, full_macs, [1.0] * 10)
    predicted = probe(mu)

    run_proxsgd(copy_of_start, args, mu, batches)
    mask = compute_mask(copy_of_start, args.pruning_threshold)
    pruned = sum(int((~kept).sum()) for kept in mask.values())
    assert 0 < pruned < sum(kept.numel() for kept in mask.values())  # the test prunes for real
    assert predicted.macs == mask_macs(arch, mask, "conv12", 10) < full_macs
    assert predicted.share == predicted.macs / full_macs


def test_a_resnext_group_is_projected_to_zero_by_its_norm_in_both_convs():
    model = torchvision.models.resnext50_32x4d(num_classes=10)
    block = model.layer1[0]  # 32 groups of 4 channels
    with torch.no_grad():
        block.conv1.weight[0:4] = 0.001  # group 0: small in conv1, large in conv2
        block.conv1.weight[4:8] = 0  # group 1: norm 1.2e-6, over the threshold of 1e-6 until it decays
        block.conv2.weight[4:8] = 1e-7
    heading = {name: torch.ones(128, dtype=torch.bool) for name in ("layer1.0.conv1", "layer1.0.conv2")}
    mask = projected_mask(model, heading, [0.05] * 10, budget_of(), "conv12")
    assert mask["layer1.0.conv1"][:4].all() and mask["layer1.0.conv2"][:4].all()
    assert not mask["layer1.0.conv1"][4:8].any() and not mask["layer1.0.conv2"][4:8].any()
    assert compute_mask(model)["layer1.0.conv1"][4:8].all()  # not yet under the threshold now


@pytest.mark.slow
def test_a_probe_sees_filters_heading_to_zero_long_before_they_get_there(resnet18, one_thread):
    args = search_args("--lr", "0.05", "--no-adaptive_lr", "--normalization", "none")
    batches = tiny_batches(4)
    full_macs = mask_macs("resnet18", compute_mask(resnet18, 1e-6), "conv12", 10)
    start = copy.deepcopy(resnet18.state_dict())
    long_search = probe_of(resnet18, args, batches, full_macs, [0.05] * 1000)
    predicted = long_search(1.5)
    assert predicted.share < 0.9
    # With only 2 steps left, a filter with a zero prox keeps 0.95**2 of its norm: not pruned.
    short_search = probe_of(resnet18, args, batches, full_macs, [0.05] * 6)
    assert short_search(1.5).share == 1.0
    # The probe left the model as it found it ...
    for key, value in resnet18.state_dict().items():
        assert torch.equal(value, start[key]), key
    # ... and the same steps, taken for real, have not zeroed a single filter yet.
    run_proxsgd(resnet18, args, 1.5, batches)
    assert all(bool(kept.all()) for kept in compute_mask(resnet18, args.pruning_threshold).values())


def test_no_mu_goes_below_the_model_with_every_prunable_filter_pruned(resnet18):
    args = search_args()
    floor = smallest_macs(resnet18, BudgetSettings.from_args(args), "conv12", 10)
    everything_pruned = {name: torch.zeros_like(kept) for name, kept in compute_mask(resnet18).items()}
    assert floor == mask_macs("resnet18", everything_pruned, "conv12", 10)
    assert floor < mask_macs("resnet18", compute_mask(resnet18), "conv12", 10)


def planted(model, zero_filters: dict):
    with torch.no_grad():
        for name, filters in zero_filters.items():
            model.get_submodule(name).weight[filters] = 0
    return model


def test_a_budget_the_zero_filters_meet_exactly_gives_the_threshold_mask(resnet18):
    at_start = start_norms(resnet18, "conv12")
    model = planted(resnet18, {"layer1.0.conv1": [0, 1, 2], "layer3.1.conv1": list(range(100))})
    by_threshold = compute_mask(model)
    goal = mask_macs("resnet18", by_threshold, "conv12", 10)
    mask = budget_mask(model, goal, budget_of(), "conv12", 10, at_start)
    assert all(torch.equal(mask[name], row) for name, row in by_threshold.items())


def shrunk(model, factors: dict):
    """What the group lasso does over a search: some filters keep only part of their norm."""
    with torch.no_grad():
        for name, (filters, factor) in factors.items():
            model.get_submodule(name).weight[filters] *= factor
    return model


def test_under_global_ranking_a_tighter_budget_also_prunes_the_filters_that_shrank_most_whatever_their_layer(
        resnet18):
    at_start = start_norms(resnet18, "conv12")
    # layer4's filters have the smallest weights from the start; the search shrank layer1's.
    model = shrunk(planted(resnet18, {"layer3.1.conv1": list(range(100))}),
                   {"layer1.0.conv1": (list(range(32)), 0.1), "layer1.1.conv1": (list(range(32)), 0.2)})
    full = mask_macs("resnet18", compute_mask(model), "conv12", 10)
    goal = round(0.9 * full)
    mask = budget_mask(model, goal, budget_of("--budget-ranking", "global"), "conv12", 10, at_start)
    assert mask_macs("resnet18", mask, "conv12", 10) <= goal
    assert not mask["layer3.1.conv1"][:100].any()  # the zero filters go first
    assert not mask["layer1.0.conv1"][:32].any()  # then those with 10% of their norm left
    assert mask["layer4.0.conv1"].all() and mask["layer4.1.conv1"].all()  # small, but not shrunk
    # As many filters as fit: keeping one more of those with 20% left would break the budget.
    assert not mask["layer1.1.conv1"][:32].all()
    grown = {name: row.clone() for name, row in mask.items()}
    grown["layer1.1.conv1"][torch.nonzero(~mask["layer1.1.conv1"]).flatten()[0]] = True
    assert mask_macs("resnet18", grown, "conv12", 10) > goal


def test_layer_ranking_prunes_the_filters_that_fell_behind_their_own_layer_not_the_layer_shrunk_most(resnet18):
    """--budget-ranking layer: a filter's kept share over its layer's median. A layer-wide shrink
    (a doubled mu, say) says nothing about which filters matter; falling behind one's layer does."""
    at_start = start_norms(resnet18, "conv12")
    model = shrunk(resnet18, {"layer2.0.conv1": (list(range(128)), 0.05)})  # the whole layer, evenly
    model = shrunk(model, {"layer2.0.conv1": (list(range(10)), 0.4),  # 2%: behind their layer
                           "layer1.0.conv1": (list(range(16)), 0.5)})  # 50%: behind theirs
    laggards = {name: row.clone() for name, row in compute_mask(model).items()}
    laggards["layer2.0.conv1"][:10] = False
    laggards["layer1.0.conv1"][:16] = False
    goal = mask_macs("resnet18", laggards, "conv12", 10)
    by_layer = budget_mask(model, goal, budget_of("--budget-ranking", "layer"), "conv12", 10, at_start)
    assert all(torch.equal(by_layer[name], row) for name, row in laggards.items())
    # The global share ranks the evenly shrunk layer below every laggard of layer1 instead.
    by_share = budget_mask(model, goal, budget_of("--budget-ranking", "global"), "conv12", 10, at_start)
    assert int(by_share["layer2.0.conv1"].sum()) < 128 - 10 and by_share["layer1.0.conv1"].all()


def test_a_looser_budget_keeps_some_zero_filters_and_every_nonzero_one(resnet18):
    at_start = start_norms(resnet18, "conv12")
    model = planted(resnet18, {"layer2.0.conv1": list(range(128)), "layer3.1.conv1": list(range(256))})
    by_threshold = compute_mask(model)
    goal = 1.05 * mask_macs("resnet18", by_threshold, "conv12", 10)
    mask = budget_mask(model, round(goal), budget_of(), "conv12", 10, at_start)
    assert all(bool(mask[name][row].all()) for name, row in by_threshold.items())  # nonzero all kept
    assert sum(int(row.sum()) for row in mask.values()) > sum(int(row.sum()) for row in by_threshold.values())
    assert mask_macs("resnet18", mask, "conv12", 10) <= goal


@pytest.mark.slow
def test_a_search_with_a_target_lands_its_compressed_model_on_the_budget(tmp_path):
    run_script("main_search_conv12.py", *TINY, "-a", "resnet18", "--lr", "0.5", "--no-adaptive_lr",
               "--normalization", "none", "--target-macs", "60%", "--budget-steps", "4",
               "--budget-probes", "4", "--path_to_save", str(tmp_path))
    folder = only_folder(tmp_path, "conv12_lr_0.5_momentum_0.9_target_60pct_*")
    log = (folder / "_log.txt").read_text()
    info = json.loads((folder / "run_info.json").read_text())
    budget = info["budget"]
    assert 1 <= len(budget["probes"]) <= 4 and len(re.findall("budget probe: mu", log)) == len(budget["probes"])
    assert budget["mu"] in [probe["mu"] for probe in budget["probes"]]
    assert info["args"]["mu"] == 0.05  # the flag as given: the chosen mu is a result, in "budget"
    assert info["optimizer"]["mu"] == budget["mu"]  # the search ran with the chosen mu
    assert f"mu {budget['mu']}" in log
    full_macs = mask_macs("resnet18", compute_mask(torchvision.models.resnet18(num_classes=10)), "conv12", 10)
    assert budget["target_macs"] == round(0.6 * full_macs)
    small, _ = load_mask(folder / "mask_conv12_1e-06.json", "resnet18", "conv12")
    achieved = mask_macs("resnet18", small, "conv12", 10)
    assert 0.55 * full_macs < achieved <= budget["target_macs"]
    assert re.search(r"epoch 0 budget: [\d.]+ GMac \(\d+\.\d% of the MACs\) for a target of [\d.]+ GMac "
                     r"\(60\.0%\); the zero filters alone give \d+\.\d%", log)


@pytest.mark.parametrize("target, message", [
    ("1%", "below .* GMac, the MACs left when every conv12 filter is pruned .*: aim higher"),
    ("99", "is not below the full model's 1.82 GMac: nothing to prune"),
    ("half", "--target-macs takes GMac"),
    ("1e400", "must be a positive number of GMac"),
])
@pytest.mark.slow
def test_a_target_out_of_reach_is_refused_in_one_line_before_any_folder(target, message, tmp_path):
    result = run_script("main_search_conv12.py", *TINY, "-a", "resnet18", "--target-macs", target,
                        "--path_to_save", str(tmp_path / "experiments"), expect=2)
    assert re.search(message, result.stderr) and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "experiments").exists()


@pytest.mark.slow
def test_a_resumed_budget_search_goes_on_with_the_chosen_mu_without_probing_again(baseline, tmp_path):
    # From trained weights: the resumed process starts from a fresh model, whose norms differ.
    flags = [*TINY, "--pretrained", str(baseline), "--lr", "0.5", "--no-adaptive_lr", "--normalization", "none",
             "--target-macs", "60%", "--budget-steps", "2", "--budget-probes", "2"]
    run_script("main_search_conv12.py", *flags, "--path_to_save", str(tmp_path / "stopped"))
    folder = only_folder(tmp_path / "stopped", "conv12_*")
    chosen = json.loads((folder / "run_info.json").read_text())["budget"]["mu"]
    resumed = run_script("main_search_conv12.py", "--resume", str(folder), "--epochs", "2")
    assert "budget probe" not in resumed.stdout
    assert f"mu {chosen}," in resumed.stdout  # the "search with ProxSGD ..." line
    assert "epoch 1 budget: " in resumed.stdout
    # The budget's mask ranks by the norms at the search's start, which the checkpoint keeps:
    # the resumed run ends with the mask of a run that never stopped.
    run_script("main_search_conv12.py", *flags, "--epochs", "2", "--path_to_save", str(tmp_path / "straight"))
    straight = only_folder(tmp_path / "straight", "conv12_*")
    mask_file = "mask_conv12_1e-06.json"
    assert load_mask(folder / mask_file)[0].keys() == load_mask(straight / mask_file)[0].keys()
    for name, row in load_mask(straight / mask_file)[0].items():
        assert torch.equal(load_mask(folder / mask_file)[0][name], row), name

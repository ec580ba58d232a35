"""compute_mask(round_to=N) and the search's --round-to: every pruned layer keeps a multiple of N filters."""
import json

import pytest
import torch
import torchvision
from torch import nn

from gsparsity.cli import build_parser, validate_args
from gsparsity.errors import UserError
from gsparsity.compression import compress_model
from gsparsity.masks import compute_mask
from gsparsity.pruned_resnet import ShortcutOnlyBlock
from gsparsity.structure import prunable_convs
from scripts import TINY, only_folder, run_script

THRESHOLD = 1e-6
LAYER = "layer2.0.conv1"  # 128 filters


def planted_model(kept_per_layer: dict[str, int], seed: int = 0) -> nn.Module:
    """A resnet18 whose prunable convs keep ``kept_per_layer[name]`` (default 13) random filters
    above the threshold; every other filter gets a distinct random norm below it."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for prunable in prunable_convs(model, "conv12"):
            width = prunable.conv.out_channels
            kept = torch.randperm(width)[: kept_per_layer.get(prunable.name, 13)]
            scales = torch.empty(width).uniform_(1e-9, 1e-7)  # random init norms are about 1.4
            scales[kept] = 1.0
            prunable.conv.weight.mul_(scales.view(-1, 1, 1, 1))
    return model


def filter_norms(model: nn.Module, name: str) -> list[float]:
    return model.get_submodule(name).weight.flatten(1).norm(dim=1).tolist()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return planted_model({})


def test_every_layer_keeps_a_multiple_of_round_to_filters(model):
    for row in compute_mask(model, THRESHOLD, round_to=8).values():
        assert int(row.sum()) % 8 == 0


def test_rounding_only_adds_filters_and_adds_fewer_than_round_to(model):
    plain = compute_mask(model, THRESHOLD)
    for name, row in compute_mask(model, THRESHOLD, round_to=8).items():
        assert bool((row | plain[name]).eq(row).all())  # every filter kept before is still kept
        assert 0 <= int(row.sum()) - int(plain[name].sum()) < 8


def test_the_extra_filters_are_the_highest_norm_ones_under_the_threshold(model):
    norms = filter_norms(model, LAYER)
    below = [index for index, norm in enumerate(norms) if norm <= THRESHOLD]
    expected_extra = set(sorted(below, key=lambda index: norms[index], reverse=True)[:3])  # 13 -> 16
    row = compute_mask(model, THRESHOLD, round_to=8)[LAYER]
    extra = {index for index in below if row[index]}
    assert extra == expected_extra


def test_round_to_one_gives_exactly_the_threshold_mask(model):
    rounded = compute_mask(model, THRESHOLD, round_to=1)
    for name, row in compute_mask(model, THRESHOLD).items():
        above = torch.tensor([norm > THRESHOLD for norm in filter_norms(model, name)])
        assert torch.equal(row, above)
        assert torch.equal(rounded[name], row)


def test_a_layer_narrower_than_round_to_keeps_all_its_filters(model):
    mask = compute_mask(model, THRESHOLD, round_to=100)
    assert all(bool(mask[f"layer1.{block}.conv1"].all()) for block in range(2))  # 64 filters
    assert int(mask[LAYER].sum()) == 100  # 128 filters: rounded, not capped


def test_a_layer_already_at_a_multiple_is_unchanged():
    model = planted_model({LAYER: 16})
    assert torch.equal(compute_mask(model, THRESHOLD, round_to=8)[LAYER], compute_mask(model, THRESHOLD)[LAYER])


def test_a_layer_with_every_filter_under_the_threshold_stays_empty_and_its_branch_is_dropped():
    """Rounding 0 kept filters up to 8 would bring back a branch that the original drops."""
    model = planted_model({LAYER: 0})
    mask = compute_mask(model, THRESHOLD, round_to=8)
    assert not mask[LAYER].any()
    small = compress_model(model, mask, "conv12")
    assert isinstance(small.get_submodule(LAYER.rpartition(".")[0]), ShortcutOnlyBlock)


@pytest.mark.parametrize("round_to", [0, -8, 2.5])
def test_compute_mask_refuses_a_round_to_that_is_not_a_positive_integer(model, round_to):
    with pytest.raises(UserError, match="round_to"):
        compute_mask(model, THRESHOLD, round_to=round_to)


def test_the_search_flag_defaults_to_one():
    args = build_parser("search").parse_args(["--dummy"])
    assert args.round_to == 1


def test_the_search_refuses_a_round_to_below_one():
    args = build_parser("search").parse_args(["--dummy", "--round-to", "0"])
    with pytest.raises(UserError, match="--round-to must be >= 1"):
        validate_args(args, "search")


@pytest.mark.slow
def test_a_search_with_round_to_saves_a_mask_of_multiples(tmp_path):
    # Random-init filters have norms near 1.41, so this threshold prunes a good share of them.
    run_script("main_search_conv12.py", *TINY, "-a", "resnet18", "--path_to_save", str(tmp_path),
               "--pruning_threshold", "1.41", "--round-to", "8")
    record = json.loads((only_folder(tmp_path, "conv12_*") / "mask_conv12_1.41.json").read_text())  # its own threshold
    kept_counts = [len(layer["kept"]) for layer in record["layers"].values()]
    assert all(count % 8 == 0 for count in kept_counts)
    widths = [layer["filters"] for layer in record["layers"].values()]
    assert kept_counts != widths  # something was pruned, so the rounding had work to do

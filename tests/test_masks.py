"""Masks: which filters survive, on disk as readable JSON, refused when they do not fit."""
import json

import pytest
import torch
import torchvision
from torch import nn

from gsparsity.errors import UserError
from gsparsity.masks import (
    check_mask,
    compute_mask,
    dropped_blocks,
    kept_indices,
    load_mask,
    mask_from_record,
    mask_to_record,
    save_mask,
)

# resnet18's prunable convs written out by hand: 4 stages of 2 BasicBlocks.
RESNET18_CONV12 = [f"layer{stage}.{block}.conv1" for stage in range(1, 5) for block in range(2)]
RESNET18_ALL_CONV = [
    f"layer{stage}.{block}.conv{conv}" for stage in range(1, 5) for block in range(2) for conv in (1, 2)
]
RESNET18_WIDTHS = {f"layer{stage}": 64 * 2 ** (stage - 1) for stage in range(1, 5)}


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the real model sits in ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


def full_mask(arch: str = "resnet18", scope: str = "conv12") -> dict:
    with torch.device("meta"):
        model = torchvision.models.get_model(arch, weights=None)
    return {
        name: torch.ones(module.out_channels, dtype=torch.bool)
        for name, module in model.named_modules()
        if name in (RESNET18_CONV12 if scope == "conv12" else RESNET18_ALL_CONV)
    }


def with_zero_filters(model: nn.Module, zero_filters: dict) -> nn.Module:
    planted = torchvision.models.resnet18(weights=None)
    planted.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, filters in zero_filters.items():
            planted.get_submodule(name).weight[filters] = 0
    return planted


def test_compute_mask_has_one_entry_per_prunable_conv_in_forward_order(resnet18):
    assert list(compute_mask(resnet18, scope="conv12")) == RESNET18_CONV12
    assert list(compute_mask(resnet18, scope="all_conv")) == RESNET18_ALL_CONV


def test_compute_mask_marks_exactly_the_planted_zero_filters_as_pruned(resnet18):
    planted = with_zero_filters(resnet18, {"layer1.0.conv1": [0, 5, 63], "layer3.1.conv1": list(range(256))})
    mask = compute_mask(planted)
    for name, row in mask.items():
        width = RESNET18_WIDTHS[name.split(".")[0]]
        expected = torch.ones(width, dtype=torch.bool)
        if name == "layer1.0.conv1":
            expected[[0, 5, 63]] = False
        if name == "layer3.1.conv1":
            expected[:] = False
        assert torch.equal(row, expected), name


def test_compute_mask_rows_are_one_dimensional_bool_tensors_on_the_cpu(resnet18):
    for row in compute_mask(resnet18).values():
        assert row.dtype == torch.bool and row.dim() == 1 and row.device.type == "cpu"


def test_compute_mask_sees_through_a_module_wrapper(resnet18):
    planted = with_zero_filters(resnet18, {"layer2.1.conv1": [1, 2]})
    wrapped_mask = compute_mask(Wrapper(planted))
    assert list(wrapped_mask) == RESNET18_CONV12
    assert all(torch.equal(wrapped_mask[name], row) for name, row in compute_mask(planted).items())


def test_compute_mask_keeps_a_filter_only_when_its_norm_is_above_the_threshold(resnet18):
    planted = with_zero_filters(resnet18, {})
    with torch.no_grad():
        weight = planted.layer1[0].conv1.weight
        weight[0] = 0
        weight[0, 0, 1, 1] = 0.5e-6  # norm below the default threshold
        weight[1] = 0
        weight[1, 0, 1, 1] = 2e-6  # norm above it
    default_row = compute_mask(planted)["layer1.0.conv1"]
    assert not default_row[0] and default_row[1]
    assert not compute_mask(planted, threshold=3e-6)["layer1.0.conv1"][1]


def test_compute_mask_also_prunes_the_filters_it_is_told_to_whatever_their_norm(resnet18):
    extra = torch.zeros(64, dtype=torch.bool)
    extra[[3, 4]] = True
    mask = compute_mask(resnet18, also_pruned={"layer1.0.conv1": extra})
    assert torch.equal(mask["layer1.0.conv1"], ~extra)
    assert all(bool(row.all()) for name, row in mask.items() if name != "layer1.0.conv1")
    # Rounding up treats them as zero filters: a planted zero filter of lower index comes
    # back before them, however large their norms.
    planted = with_zero_filters(resnet18, {"layer1.0.conv1": [1]})
    rounded = compute_mask(planted, round_to=2, also_pruned={"layer1.0.conv1": extra})  # 61 -> 62 kept
    assert torch.nonzero(~rounded["layer1.0.conv1"]).flatten().tolist() == [3, 4]


@pytest.mark.parametrize("threshold", [0.0, -1e-6])
def test_compute_mask_refuses_a_threshold_that_is_not_positive(resnet18, threshold):
    with pytest.raises(ValueError, match="threshold"):
        compute_mask(resnet18, threshold=threshold)


def test_kept_indices_lists_the_true_positions():
    assert kept_indices(torch.tensor([False, True, False, True])).tolist() == [1, 3]


def test_kept_indices_is_empty_when_every_filter_is_pruned():
    kept = kept_indices(torch.zeros(5, dtype=torch.bool))
    assert kept.tolist() == [] and kept.dtype == torch.long


def test_the_blocks_whose_branch_has_a_conv_keeping_no_filter_are_dropped():
    mask = full_mask(scope="all_conv")
    mask["layer1.1.conv2"][:] = False  # the last conv of a BasicBlock: all_conv prunes it too
    mask["layer3.0.conv1"][:] = False
    mask["layer4.0.conv1"][1:] = False  # one filter left: the branch stays
    assert dropped_blocks(resnet18_on_meta(), mask, "all_conv") == {"layer1.1", "layer3.0"}
    conv12 = {name: row for name, row in mask.items() if name in RESNET18_CONV12}
    assert dropped_blocks(resnet18_on_meta(), conv12, "conv12") == {"layer3.0"}


def resnet18_on_meta() -> nn.Module:
    with torch.device("meta"):
        return torchvision.models.resnet18(weights=None)


def test_a_saved_mask_loads_back_identical_with_its_metadata(resnet18, tmp_path):
    planted = with_zero_filters(resnet18, {"layer1.1.conv1": [3, 4], "layer4.0.conv1": list(range(512))})
    mask = compute_mask(planted)
    path = tmp_path / "mask.json"
    save_mask(mask, path, arch="resnet18", scope="conv12", threshold=1e-6)
    loaded, metadata = load_mask(path, arch="resnet18", scope="conv12")
    assert metadata == {"arch": "resnet18", "scope": "conv12", "threshold": 1e-6}
    assert list(loaded) == list(mask)
    assert all(torch.equal(loaded[name], mask[name]) for name in mask)


def test_a_saved_mask_is_readable_json_listing_the_kept_filter_indices(tmp_path):
    mask = full_mask()
    mask["layer1.0.conv1"][:] = False
    mask["layer1.0.conv1"][[2, 7]] = True
    path = tmp_path / "mask.json"
    save_mask(mask, path, arch="resnet18", scope="conv12", threshold=1e-6)
    document = json.loads(path.read_text())
    assert document["format"] == "gsparsity-mask/1"
    assert document["layers"]["layer1.0.conv1"] == {"filters": 64, "kept": [2, 7]}
    assert document["layers"]["layer2.0.conv1"]["kept"] == list(range(128))


def test_saving_a_mask_leaves_no_temporary_file_behind(tmp_path):
    save_mask(full_mask(), tmp_path / "mask.json", arch="resnet18", scope="conv12", threshold=1e-6)
    assert [path.name for path in tmp_path.iterdir()] == ["mask.json"]


@pytest.fixture
def saved_mask(tmp_path):
    path = tmp_path / "mask.json"
    save_mask(full_mask(), path, arch="resnet18", scope="conv12", threshold=1e-6)
    return path


def rewrite_layers(path, change) -> None:
    document = json.loads(path.read_text())
    change(document["layers"])
    path.write_text(json.dumps(document))


def test_load_mask_refuses_a_mask_for_another_arch(saved_mask):
    with pytest.raises(UserError, match="arch resnet18, not resnet50"):
        load_mask(saved_mask, arch="resnet50")


def test_load_mask_refuses_a_mask_for_another_scope(saved_mask):
    with pytest.raises(UserError, match="scope conv12, not all_conv"):
        load_mask(saved_mask, scope="all_conv")


def test_load_mask_refuses_a_mask_missing_a_layer(saved_mask):
    rewrite_layers(saved_mask, lambda layers: layers.pop("layer2.1.conv1"))
    with pytest.raises(UserError, match="no layer layer2.1.conv1"):
        load_mask(saved_mask)


def test_load_mask_refuses_a_layer_with_the_wrong_number_of_filters(saved_mask):
    rewrite_layers(saved_mask, lambda layers: layers["layer3.0.conv1"].update(filters=100, kept=[0]))
    with pytest.raises(UserError, match="layer3.0.conv1 has 100 filters, resnet18 has 256"):
        load_mask(saved_mask)


def test_load_mask_refuses_a_kept_index_beyond_the_filters(saved_mask):
    rewrite_layers(saved_mask, lambda layers: layers["layer1.0.conv1"].update(kept=[64]))
    with pytest.raises(UserError, match="layer1.0.conv1 keeps a filter index outside 0..63"):
        load_mask(saved_mask)


@pytest.mark.parametrize("layer, message", [
    ({"filters": -1, "kept": []}, "layer1.0.conv1 has 'filters' -1; it must be at least 1"),
    ({"filters": 0, "kept": []}, "layer1.0.conv1 has 'filters' 0; it must be at least 1"),
    ({"filters": 64, "kept": [3, 5, 3]}, "layer1.0.conv1 lists kept filter index 3 more than once"),
    ({"filters": 64, "kept": [1.0]}, "layer1.0.conv1 keeps a filter index that is not an integer"),
    ({"filters": 64, "kept": [True]}, "layer1.0.conv1 keeps a filter index that is not an integer"),
], ids=["negative filters", "zero filters", "repeated index", "float index", "bool index"])
def test_load_mask_refuses_a_malformed_layer_with_one_line(saved_mask, layer, message):
    rewrite_layers(saved_mask, lambda layers: layers.update({"layer1.0.conv1": layer}))
    with pytest.raises(UserError, match=message) as refusal:
        load_mask(saved_mask)
    assert "\n" not in str(refusal.value)


def test_a_checkpoint_mask_with_a_negative_filter_count_is_refused_not_crashed(tmp_path):
    record = mask_to_record(full_mask(), "resnet18", "conv12", 1e-6)
    record["layers"]["layer2.0.conv1"] = {"filters": -1, "kept": []}
    torch.save({"mask": record}, tmp_path / "small_model.pth.tar")
    saved = torch.load(tmp_path / "small_model.pth.tar", weights_only=True)["mask"]
    with pytest.raises(UserError, match="small_model.pth.tar: layer layer2.0.conv1 has 'filters' -1"):
        mask_from_record(saved, source="small_model.pth.tar")


def test_load_mask_refuses_a_file_that_is_not_json(tmp_path):
    path = tmp_path / "mask.json"
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="not a JSON mask file"):
        load_mask(path)


def test_load_mask_refuses_json_that_is_not_a_mask(tmp_path):
    path = tmp_path / "mask.json"
    path.write_text(json.dumps({"layers": {}}))
    with pytest.raises(UserError, match="not a mask"):
        load_mask(path)


def test_load_mask_refuses_a_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_mask(tmp_path / "nowhere.json")


def test_a_mask_record_survives_a_weights_only_checkpoint_round_trip(tmp_path):
    mask = full_mask(scope="all_conv")
    mask["layer2.0.conv2"][::3] = False
    mask["layer3.1.conv1"][:] = False  # a layer keeping nothing: an empty list of kept filters
    torch.save({"mask": mask_to_record(mask, "resnet18", "all_conv", 1e-6)}, tmp_path / "model.pth")
    record = torch.load(tmp_path / "model.pth", weights_only=True)["mask"]
    assert record["layers"]["layer3.1.conv1"] == {"filters": 256, "kept": []}
    restored = mask_from_record(record, arch="resnet18", scope="all_conv")
    assert list(restored) == list(mask)
    assert all(torch.equal(restored[name], mask[name]) for name in mask)


def test_mask_from_record_names_its_source_when_refusing():
    record = mask_to_record(full_mask(), "resnet18", "conv12", 1e-6)
    with pytest.raises(UserError, match="checkpoint.pth: the mask is for scope conv12, not all_conv"):
        mask_from_record(record, scope="all_conv", source="checkpoint.pth")


def test_check_mask_names_a_layer_the_scope_does_not_prune():
    mask = full_mask()
    mask["layer1.0.conv2"] = torch.ones(64, dtype=torch.bool)
    with pytest.raises(UserError, match="layer1.0.conv2, which is not prunable in scope conv12"):
        check_mask(mask, "resnet18", "conv12")


def test_check_mask_accepts_a_model_as_well_as_an_arch_name(resnet18):
    mask = full_mask(scope="all_conv")
    check_mask(mask, Wrapper(resnet18), "all_conv")
    mask["layer4.1.conv2"] = torch.ones(3, dtype=torch.bool)
    with pytest.raises(UserError, match="layer4.1.conv2 has 3 filters, the model has 512"):
        check_mask(mask, resnet18, "all_conv")


def test_check_mask_refuses_an_unknown_arch():
    with pytest.raises(UserError, match="unknown architecture"):
        check_mask(full_mask(), "resnet_nonexistent", "conv12")

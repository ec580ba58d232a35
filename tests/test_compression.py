"""Compression: the small model computes what the sparse full model computes, with fewer weights."""
import copy
import io

import numerics
import pytest
import torch
import torchvision
from torch import nn

import models_with_reduce_all_conv
import models_with_reduce_conv12
from gsparsity.errors import UserError
from gsparsity.compression import compress_model, transfer_model_parameters
from gsparsity.masks import compute_mask
from gsparsity.complexity import count_macs
from gsparsity.mask_macs import mask_macs
from gsparsity.pruned_resnet import ARCHS, PrunedResidualBlock, ShortcutOnlyBlock, add_at_channels, build_pruned_resnet
from gsparsity.structure import branch_chain, prunable_convs, residual_blocks

NUM_CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the real model sits in ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def full_model(arch: str, seed: int = 0) -> nn.Module:
    """A full model whose BNs are not the identity, so that every channel matters."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, num_classes=NUM_CLASSES)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def random_mask(model: nn.Module, scope: str, seed: int = 0) -> dict:
    """About half the filters (or ResNeXt groups) of every layer, and one layer with every
    filter pruned (in a ResNeXt, the first tied pair)."""
    generator = torch.Generator().manual_seed(seed)
    mask = {}
    for index, prunable in enumerate(prunable_convs(model, scope)):
        if prunable.tied_with in mask:  # a grouped conv prunes the groups of its input conv
            mask[prunable.name] = mask[prunable.tied_with].clone()
            continue
        units = torch.rand(prunable.conv.out_channels // prunable.unit, generator=generator) < 0.5
        mask[prunable.name] = units.repeat_interleave(prunable.unit) & (index > 0)
    return mask


def keep_all_but(model: nn.Module, scope: str, pruned_convs: tuple, seed: int = 0) -> dict:
    """Half the filters of the convs whose name ends with one of ``pruned_convs``, all of the others."""
    mask = random_mask(model, scope, seed)
    return {
        name: row if name.endswith(pruned_convs) else torch.ones_like(row) for name, row in mask.items()
    }


def plant_zeros(model: nn.Module, mask: dict, scope: str, group: str) -> None:
    """What ProxSGD leaves: pruned filters are zero; with group="channel" their BN weight and bias too."""
    with torch.no_grad():
        for prunable in prunable_convs(model, scope):
            pruned = ~mask[prunable.name]
            prunable.conv.weight[pruned] = 0
            if group == "channel":
                prunable.bn.weight[pruned] = 0
                prunable.bn.bias[pruned] = 0


def relative_deviation(full: nn.Module, small: nn.Module, batch: torch.Tensor) -> float:
    """Eval-mode output deviation of ``small`` from ``full``, relative to the full output."""
    return numerics.relative_deviation(numerics.eval_output(full, batch), numerics.eval_output(small, batch))


def images(size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scope", ["conv12", "all_conv"])
@pytest.mark.parametrize("arch", ARCHS)  # every torchvision ResNet: BasicBlock, Bottleneck, wide, ResNeXt
@pytest.mark.slow
def test_compressed_model_matches_the_full_model_when_pruned_channels_are_zero(arch, scope):
    full = full_model(arch)
    mask = random_mask(full, scope)
    plant_zeros(full, mask, scope, group="channel")
    small = compress_model(full, mask, scope)
    assert relative_deviation(full, small, images()) < 1e-5


@pytest.mark.parametrize("scope, pruned_convs", [("conv12", ("conv2",)), ("all_conv", ("conv2", "conv3"))])
@pytest.mark.slow
def test_filter_pruning_is_exact_when_pruned_channels_feed_1x1_convs_or_the_residual(scope, pruned_convs):
    full = full_model("resnet50")
    mask = keep_all_but(full, scope, pruned_convs)
    plant_zeros(full, mask, scope, group="filter")
    small = compress_model(full, mask, scope, check_input=images())
    assert small.output_deviation["relative"] < 1e-5
    assert relative_deviation(full, small, images()) < 1e-5


def test_the_compression_check_runs_in_full_fp32_precision_and_restores_the_setting():
    """On Ampere and later GPUs cuDNN computes fp32 convolutions in TF32 by default: its
    rounding would be reported as the compression's deviation."""
    seen = []
    full = full_model("resnet18")
    full.register_forward_pre_hook(lambda module, inputs: seen.append(torch.backends.cudnn.conv.fp32_precision))
    before = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # what torch sets by default
    try:
        compress_model(full, compute_mask(full, scope="conv12"), "conv12", check_input=images())
        assert seen == ["ieee"]
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cudnn.conv.fp32_precision = before


@pytest.mark.slow
def test_filter_pruning_deviates_at_the_border_when_pruned_channels_feed_3x3_convs():
    full = full_model("resnet50")
    mask = keep_all_but(full, "conv12", ("conv1",))
    plant_zeros(full, mask, "conv12", group="filter")
    small = compress_model(full, mask, "conv12", check_input=images())
    deviation = small.output_deviation
    assert 1e-5 < deviation["relative"] < 1
    assert deviation["max_abs"] == pytest.approx(deviation["relative"] * full(images()).abs().max().item())


@pytest.mark.slow
def test_filter_pruning_without_folding_would_not_be_exact():
    """Guards the folding test above: the BN constants of pruned filters do matter."""
    full = full_model("resnet50")
    mask = keep_all_but(full, "conv12", ("conv2",))
    plant_zeros(full, mask, "conv12", group="filter")
    unfolded = build_pruned_resnet("resnet50", mask, "conv12", NUM_CLASSES)
    transfer_model_parameters(full, unfolded, mask, "conv12")
    bn_state = {key: value for key, value in full.state_dict().items() if "bn3.running_mean" in key}
    unfolded.load_state_dict(bn_state, strict=False)  # undo the folding into conv3's BN
    assert relative_deviation(full, unfolded, images()) > 1e-3


def test_compression_works_on_a_wrapped_full_model():
    full = full_model("resnet18")
    mask = random_mask(full, "all_conv")
    plant_zeros(full, mask, "all_conv", group="channel")
    small = compress_model(Wrapper(full), mask, "all_conv")
    assert relative_deviation(full, small, images()) < 1e-5


def test_compressed_model_keeps_the_full_models_train_mode():
    full = full_model("resnet18").train()
    small = compress_model(full, random_mask(full, "conv12"), "conv12")
    assert small.training and all(module.training for module in small.modules())


def test_compressed_all_conv_model_trains_end_to_end():
    full = full_model("resnet18")
    small = compress_model(full, random_mask(full, "all_conv"), "all_conv").train()
    small(images(32)).sum().backward()
    assert all(parameter.grad is not None for parameter in small.parameters())


def test_an_all_conv_model_in_channels_last_keeps_that_layout_and_computes_what_the_contiguous_one_does():
    """The residual add of a block whose last conv is pruned must not hand the next block
    a contiguous tensor, nor its branch a contiguous gradient: every conv after it would
    convert it back, and the branch's last BatchNorm would run its backward on mixed layouts."""
    full = full_model("resnet18")
    # eval: BatchNorm's batch statistics over 2 images would amplify rounding differences
    small = compress_model(full, random_mask(full, "all_conv"), "all_conv").eval()
    with torch.no_grad():
        for block in small.modules():
            if isinstance(block, (PrunedResidualBlock, ShortcutOnlyBlock)):
                block.residual_bias.normal_()  # as when constants of pruned channels are folded in
    wide = copy.deepcopy(small).to(memory_format=torch.channels_last)
    block_outputs, branch_gradients = [], []
    for block in wide.modules():
        if isinstance(block, (PrunedResidualBlock, ShortcutOnlyBlock)):  # layer1.0 lost its branch
            block.register_forward_hook(lambda module, inputs, output: block_outputs.append(output))
        if isinstance(block, PrunedResidualBlock):
            last_bn = getattr(block, block.chain[-1][1])
            last_bn.register_full_backward_hook(
                lambda module, grad_input, grad_output: branch_gradients.append(grad_output[0]))
    batch = images(64)  # at 32x32 layer4 runs at 1x1, where both layouts are the same
    expected, output = small(batch), wide(batch.to(memory_format=torch.channels_last))
    assert len(block_outputs) == 8
    assert all(block_output.is_contiguous(memory_format=torch.channels_last) for block_output in block_outputs)
    assert numerics.relative_deviation(expected, output) < 1e-5
    expected.sum().backward()
    output.sum().backward()
    assert len(branch_gradients) == 7
    assert all(gradient.is_contiguous(memory_format=torch.channels_last) for gradient in branch_gradients)
    for (name, parameter), wide_parameter in zip(small.named_parameters(), wide.parameters()):
        assert numerics.relative_deviation(parameter.grad, wide_parameter.grad) < 1e-5, name


def residual_and_branch(channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 residual of 6 channels and a branch of 3, to be added at KEPT_CHANNELS."""
    generator = torch.Generator().manual_seed(0)
    identity, branch = (torch.randn(2, width, 3, 4, generator=generator, dtype=torch.float64)
                        for width in (6, 3))
    if channels_last:
        identity, branch = (tensor.contiguous(memory_format=torch.channels_last) for tensor in (identity, branch))
    return identity, branch


KEPT_CHANNELS = torch.tensor([4, 0, 2])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("needs_grad", [("identity", "branch"), ("identity",), ("branch",)])
def test_the_residual_add_at_kept_channels_has_index_adds_values_and_gradients(channels_last, needs_grad):
    identity, branch = residual_and_branch(channels_last)
    identity.requires_grad_("identity" in needs_grad)
    branch.requires_grad_("branch" in needs_grad)
    inputs = [tensor for tensor in (identity, branch) if tensor.requires_grad]
    weights = torch.randn(2, 6, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = torch.autograd.grad((add_at_channels(identity, KEPT_CHANNELS, branch) * weights).sum(), inputs)
    torchs = torch.autograd.grad((identity.index_add(1, KEPT_CHANNELS, branch) * weights).sum(), inputs)
    for gradient, expected in zip(ours, torchs):
        assert torch.equal(gradient, expected)
    assert torch.equal(add_at_channels(identity, KEPT_CHANNELS, branch), identity.index_add(1, KEPT_CHANNELS, branch))


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_residual_add_at_kept_channels_passes_gradcheck_and_gradgradcheck(channels_last):
    inputs = tuple(tensor.requires_grad_() for tensor in residual_and_branch(channels_last))

    def residual_add(identity: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return add_at_channels(identity, KEPT_CHANNELS, branch)

    assert torch.autograd.gradcheck(residual_add, inputs)
    assert torch.autograd.gradgradcheck(residual_add, inputs)


@pytest.mark.filterwarnings("ignore:`torch.jit.(trace|trace_method|save|load)` is deprecated:FutureWarning")
@pytest.mark.slow
def test_a_compressed_all_conv_model_traced_with_gradients_on_can_be_saved():
    """torch.jit.trace records a Python-defined autograd Function as an op it cannot save."""
    full = full_model("resnet18")
    small = compress_model(full, random_mask(full, "all_conv"), "all_conv").eval()
    with torch.no_grad():
        for block in small.modules():
            if isinstance(block, (PrunedResidualBlock, ShortcutOnlyBlock)):
                block.residual_bias.normal_()  # so that every residual add shows in the output
    traced = torch.jit.trace(small, images(32))
    saved = io.BytesIO()
    torch.jit.save(traced, saved)
    saved.seek(0)
    loaded = torch.jit.load(saved)
    # Another batch than the one traced: the trace computes the model, not one output.
    batch = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = numerics.eval_output(small, batch)
    for form in (traced, loaded):
        assert numerics.relative_deviation(expected, numerics.eval_output(form, batch)) < 1e-5
    # and with gradients on, as traced: the same output, and gradients for the weights
    output = loaded(batch)
    assert numerics.relative_deviation(expected, output.detach()) < 1e-5
    output.sum().backward()
    assert all(parameter.grad is not None for parameter in loaded.parameters())


@pytest.mark.slow
def test_a_compiled_all_conv_model_in_channels_last_gets_the_eager_gradients():
    """--compile traces the residual add's autograd Function in one graph (no break)."""
    full = full_model("resnet18")
    eager = compress_model(full, random_mask(full, "all_conv"), "all_conv").eval()
    eager = eager.to(memory_format=torch.channels_last)
    compiled = copy.deepcopy(eager)
    batch = images(64).to(memory_format=torch.channels_last)
    eager(batch).sum().backward()
    torch.compile(compiled, fullgraph=True)(batch).sum().backward()
    for (name, parameter), compiled_parameter in zip(eager.named_parameters(), compiled.parameters()):
        assert numerics.relative_deviation(parameter.grad, compiled_parameter.grad) < 1e-4, name


def test_compressed_model_infers_the_arch_of_the_full_model():
    full = full_model("resnet34")
    small = compress_model(full, random_mask(full, "conv12"), "conv12")
    assert len(list(residual_blocks(small))) == len(list(residual_blocks(full)))


def test_compressed_model_has_the_widths_of_the_mask_and_no_branch_where_a_layer_is_empty():
    full = full_model("resnet50")
    mask = random_mask(full, "all_conv")  # layer1.0.conv1 keeps nothing
    small = compress_model(full, mask, "all_conv")
    assert isinstance(small.layer1[0], ShortcutOnlyBlock)
    remaining = prunable_convs(small, "all_conv")
    assert [prunable.name for prunable in remaining] == [name for name in mask if not name.startswith("layer1.0.")]
    for prunable in remaining:
        expected_width = int(mask[prunable.name].sum())
        assert prunable.conv.out_channels == expected_width == prunable.bn.num_features, prunable.name


def hand_count_resnet18(kept: dict, num_classes: int, dropped: tuple = ()) -> int:
    """Parameters of a resnet18 whose block convs keep ``kept[name]`` filters and whose
    ``dropped`` blocks have no branch, from the paper's layout."""
    count = 3 * 64 * 7 * 7 + 2 * 64  # stem conv + BN
    in_channels = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            conv1 = kept.get(f"layer{stage}.{block}.conv1", width)
            conv2 = kept.get(f"layer{stage}.{block}.conv2", width)
            if f"layer{stage}.{block}" not in dropped:
                count += in_channels * conv1 * 9 + 2 * conv1 + conv1 * conv2 * 9 + 2 * conv2
            if in_channels != width:  # downsample: 1x1 conv + BN, full width
                count += in_channels * width + 2 * width
            in_channels = width
    return count + 512 * num_classes + num_classes


def test_hand_count_of_the_full_resnet18_matches_torchvision():
    model = torchvision.models.resnet18(weights=None)
    assert hand_count_resnet18({}, 1000) == sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("scope", ["conv12", "all_conv"])
def test_compressed_parameter_count_equals_a_hand_count(scope):
    full = full_model("resnet18")
    mask = {name: torch.zeros_like(row) for name, row in compute_mask(full, scope=scope).items()}
    for name in mask:
        mask[name][[0, 2, 5]] = True
    mask["layer2.1.conv1"][:] = False  # every filter pruned: the block's branch goes
    kept = {name: 3 for name in mask}
    small = compress_model(full, mask, scope)
    counted = sum(parameter.numel() for parameter in small.parameters())
    assert counted == hand_count_resnet18(kept, NUM_CLASSES, dropped=("layer2.1",))


def without_branch(keys, block: str) -> list:
    """The state_dict keys of a model whose ``block`` lost its branch: its shortcut stays."""
    return [key for key in keys if not key.startswith(f"{block}.") or key.startswith(f"{block}.downsample.")]


def test_conv12_state_dict_keys_are_torchvisions_but_a_dropped_branchs():
    full = full_model("resnet50")
    small = compress_model(full, random_mask(full, "conv12"), "conv12")  # layer1.0's branch dropped
    assert sorted(small.state_dict()) == sorted(without_branch(full.state_dict(), "layer1.0")
                                                + ["layer1.0.residual_bias"])


def test_all_conv_state_dict_keys_are_torchvisions_plus_one_residual_bias_per_block():
    full = full_model("resnet50")
    small = compress_model(full, random_mask(full, "all_conv"), "all_conv")
    block_biases = [f"{name}.residual_bias" for name, _ in residual_blocks(full)]
    assert sorted(small.state_dict()) == sorted(without_branch(full.state_dict(), "layer1.0") + block_biases)


def test_all_conv_blocks_are_found_as_residual_blocks_by_the_structure_walk():
    full = full_model("resnet18")
    small = compress_model(full, random_mask(full, "all_conv"), "all_conv")
    blocks = list(residual_blocks(small))
    assert [name for name, _ in blocks] == [name for name, _ in residual_blocks(full)]
    assert isinstance(blocks[0][1], ShortcutOnlyBlock)  # layer1.0: its conv1 keeps nothing
    assert all(isinstance(block, PrunedResidualBlock) for _, block in blocks[1:])


@pytest.mark.slow
def test_a_compressed_state_dict_loads_into_a_model_built_from_the_mask_alone():
    full = full_model("resnet50")
    mask = random_mask(full, "all_conv")
    plant_zeros(full, mask, "all_conv", group="filter")
    small = compress_model(full, mask, "all_conv")
    rebuilt = models_with_reduce_all_conv.resnet50(mask, num_classes=NUM_CLASSES)
    rebuilt.load_state_dict(small.state_dict())
    assert relative_deviation(small, rebuilt, images()) == 0


@pytest.mark.parametrize("module", [models_with_reduce_conv12, models_with_reduce_all_conv])
def test_root_modules_offer_a_builder_per_arch_with_their_scope(module):
    mask = random_mask(full_model("resnet18"), module.SCOPE)
    small = module.resnet18(mask, num_classes=NUM_CLASSES)
    assert set(ARCHS) <= set(dir(module))
    kept_blocks = [name for name in mask if not name.startswith("layer1.0.")]  # layer1.0 keeps no conv1 filter
    assert [prunable.name for prunable in prunable_convs(small, module.SCOPE)] == kept_blocks
    assert small.layer1[1].conv1.out_channels == int(mask["layer1.1.conv1"].sum())


def test_transfer_refuses_a_small_model_built_from_another_mask():
    full = full_model("resnet18")
    mask = random_mask(full, "conv12", seed=0)
    other = build_pruned_resnet("resnet18", random_mask(full, "conv12", seed=1), "conv12", NUM_CLASSES)
    with pytest.raises(UserError, match="another mask"):
        transfer_model_parameters(full, other, mask, "conv12")


@pytest.mark.slow
def test_a_resnext_loses_whole_groups_of_its_grouped_conv():
    full = full_model("resnext50_32x4d")
    mask = random_mask(full, "conv12")
    small = compress_model(full, mask, "conv12")
    for name in ("layer1.1.conv2", "layer3.2.conv2"):  # 32 groups of 4 and of 16 channels
        conv, kept = full.get_submodule(name), int(mask[name].sum())
        width = conv.out_channels // conv.groups
        narrow = small.get_submodule(name)
        assert (narrow.groups, narrow.in_channels, narrow.out_channels) == (kept // width, kept, kept)
    # Every group pruned: the block's branch goes, as in a plain ResNet.
    assert isinstance(small.layer1[0], ShortcutOnlyBlock)


@pytest.mark.slow
def test_resnext_filter_pruning_is_exact_even_where_conv1_feeds_the_3x3_conv():
    # A pruned conv1 group feeds only its own conv2 group, which is pruned too, so no
    # constant reaches the border-sensitive 3x3 conv (unlike a plain Bottleneck).
    full = full_model("resnext50_32x4d")
    mask = random_mask(full, "conv12")
    plant_zeros(full, mask, "conv12", group="filter")
    small = compress_model(full, mask, "conv12")
    assert relative_deviation(full, small, images()) < 1e-5


def test_a_resnext_mask_must_prune_whole_groups_in_both_tied_convs():
    full = full_model("resnext50_32x4d")
    split = random_mask(full, "conv12")
    split["layer1.1.conv2"] = split["layer1.1.conv2"].clone()
    split["layer1.1.conv2"][0] = ~split["layer1.1.conv2"][0]
    with pytest.raises(UserError, match="splits a conv group"):
        build_pruned_resnet("resnext50_32x4d", split, "conv12")
    untied = random_mask(full, "conv12")
    untied["layer1.1.conv1"] = untied["layer1.1.conv1"].clone()
    untied["layer1.1.conv1"][:4] = ~untied["layer1.1.conv1"][:4]
    with pytest.raises(UserError, match="must be equal"):
        build_pruned_resnet("resnext50_32x4d", untied, "conv12")


def test_build_refuses_an_architecture_that_is_not_a_resnet():
    with pytest.raises(UserError, match="not a ResNet"):
        build_pruned_resnet("vgg11", {}, "conv12")


# --- a conv keeping no filter: its block's branch goes, as in the original ----------------


def emptied_mask(model: nn.Module, scope: str, emptied: str) -> dict:
    """Every filter kept but those of the conv ``emptied``: none of them."""
    mask = {prunable.name: torch.ones(prunable.conv.out_channels, dtype=torch.bool)
            for prunable in prunable_convs(model, scope)}
    mask[emptied][:] = False
    return mask


class OriginalsDroppedBlock(nn.Module):
    """What the original's compressed block computes once its branch is gone: relu(identity)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.downsample, self.relu = block.downsample, block.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x if self.downsample is None else self.downsample(x))


def with_originals_dropped_block(model: nn.Module, block_name: str) -> nn.Module:
    dropped = copy.deepcopy(model)
    parent, _, child = block_name.rpartition(".")
    setattr(dropped.get_submodule(parent), child, OriginalsDroppedBlock(dropped.get_submodule(block_name)))
    return dropped


@pytest.mark.parametrize("arch, scope, emptied, group", [
    ("resnet50", "conv12", "layer2.1.conv2", "filter"),
    ("resnet50", "conv12", "layer2.1.conv2", "channel"),
    ("resnet50", "conv12", "layer3.0.conv1", "channel"),  # a block with a downsample
    ("resnet50", "all_conv", "layer3.0.conv3", "filter"),
    ("resnet50", "all_conv", "layer3.0.conv3", "channel"),
    ("resnet50", "all_conv", "layer2.1.conv1", "channel"),
    ("resnet18", "conv12", "layer2.0.conv1", "channel"),  # BasicBlock
    ("resnet18", "all_conv", "layer3.1.conv2", "filter"),
])
@pytest.mark.slow
def test_a_block_whose_conv_keeps_no_filter_loses_its_branch_and_compresses_exactly(arch, scope, emptied, group):
    full = full_model(arch)
    mask = emptied_mask(full, scope, emptied)
    plant_zeros(full, mask, scope, group)
    small = compress_model(full, mask, scope)
    block_name = emptied.rpartition(".")[0]
    block = small.get_submodule(block_name)
    assert isinstance(block, ShortcutOnlyBlock)
    assert set(dict(block.named_children())) <= {"downsample", "relu"}
    # What the branch still added went into residual_bias (nothing only where a BN with a
    # zero weight and bias ends the branch), so the output is unchanged.
    ends_the_branch = emptied == f"{block_name}.{branch_chain(full.get_submodule(block_name))[-1][0]}"
    assert bool(block.residual_bias.abs().max() > 0.01) is not (ends_the_branch and group == "channel")
    assert relative_deviation(full, small, images()) < 1e-5


@pytest.mark.slow
def test_a_dropped_branch_fed_through_a_3x3_conv_is_exact_away_from_the_border():
    """group="filter" with conv1 emptied: bn1's constant reaches conv2, whose zero padding
    the folded constant cannot follow; inside the image the block is exact."""
    full = full_model("resnet50")
    mask = emptied_mask(full, "conv12", "layer2.1.conv1")
    plant_zeros(full, mask, "conv12", group="filter")
    small = compress_model(full, mask, "conv12")
    features = torch.randn(2, 512, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, output = full.layer2[1](features), small.layer2[1](features)
    inside = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert numerics.relative_deviation(expected[inside], output[inside]) < 1e-5
    assert numerics.relative_deviation(expected, output) > 1e-4  # the border does differ


@pytest.mark.parametrize("arch, scope, emptied", [
    ("resnet50", "conv12", "layer3.0.conv1"), ("resnet50", "all_conv", "layer2.1.conv3"),
    ("resnet18", "conv12", "layer2.0.conv1"), ("resnet18", "all_conv", "layer4.1.conv2"),
])
@pytest.mark.slow
def test_a_dropped_branch_costs_the_macs_and_parameters_of_the_originals_dropped_block(arch, scope, emptied):
    full = full_model(arch)
    mask = emptied_mask(full, scope, emptied)
    small = compress_model(full, mask, scope)
    block_name = emptied.rpartition(".")[0]
    expected_macs = count_macs(with_originals_dropped_block(full, block_name), 64)
    assert count_macs(small, 64) == mask_macs(arch, mask, scope, NUM_CLASSES, 64) == expected_macs
    block = full.get_submodule(block_name)
    branch_parameters = sum(parameter.numel() for names in branch_chain(block) for name in names
                            for parameter in getattr(block, name).parameters())
    full_parameters = sum(parameter.numel() for parameter in full.parameters())
    assert sum(parameter.numel() for parameter in small.parameters()) == full_parameters - branch_parameters

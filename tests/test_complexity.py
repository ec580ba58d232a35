"""Complexity: MACs on the paper's scale (ptflops' module hooks, as ptflops 0.6.6 counted them)
with their conv+fc share, parameters counted exactly; a mask's MACs counted without building it."""
import json
import pickle

import pytest
import torch
import torchvision
from torch import nn

from gsparsity.complexity import Macs, count_macs, count_macs_params, evaluation_mode, format_macs_params
from gsparsity.mask_macs import mask_macs
from gsparsity.compression import compress_model
from gsparsity.masks import compute_mask, reference_model
from gsparsity.pruned_resnet import build_pruned_resnet
from gsparsity.structure import prunable_convs


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None)


@pytest.mark.slow
def test_full_resnet50_at_224_costs_what_the_original_measured(resnet50):
    """4.12 GMac: the original's flops_resnet50_original.txt (ptflops 0.6.6, module hooks).
    ptflops >= 0.7 by default says 4.13, counting ReLU and pooling twice; conv+fc alone, 4.09."""
    macs, params = count_macs_params(resnet50, image_size=224)
    assert macs == 4_121_925_096 and f"{macs / 1e9:.3g}" == "4.12"
    assert macs.conv_fc == 4_089_185_256
    assert params == sum(parameter.numel() for parameter in resnet50.parameters()) == 25_557_032


def test_every_hooked_module_counts_once_per_call_as_ptflops_module_hooks_do():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    conv, batchnorm, relu = 10 * 10 * 8 * 3 * 9 + 10 * 10 * 8, 2 * 8 * 10 * 10, 8 * 10 * 10  # conv: with its bias
    max_pool, average_pool, fc = 8 * 10 * 10, 8 * 5 * 5, 8 * 5 + 5  # a pooling counts its input
    macs, _ = count_macs_params(model, image_size=10)
    assert macs == conv + batchnorm + relu + max_pool + average_pool + fc
    assert macs.conv_fc == conv + fc


@pytest.mark.slow
def test_a_compressed_model_costs_fewer_macs_and_reports_exactly_its_parameters(resnet50):
    mask = {name: torch.arange(row.numel()) % 2 == 0 for name, row in compute_mask(resnet50).items()}
    small = compress_model(resnet50, mask, "conv12")
    full_macs, full_params = count_macs_params(resnet50, image_size=64)
    small_macs, small_params = count_macs_params(small, image_size=64)
    assert small_macs < full_macs
    assert small_params == sum(parameter.numel() for parameter in small.parameters()) < full_params


def test_macs_grow_with_the_square_of_the_image_size():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    macs_32, _ = count_macs_params(model, image_size=32)
    macs_64, _ = count_macs_params(model, image_size=64)
    # The classifier is the only layer whose cost does not depend on the image size
    # (ptflops counts its multiply-adds plus the bias adds).
    classifier_macs = 512 * 10 + 10
    assert macs_64 - classifier_macs == 4 * (macs_32 - classifier_macs)


def test_counting_leaves_the_model_in_its_mode_and_without_hooks():
    model = torchvision.models.resnet18(weights=None).train()
    model.layer1.eval()  # a frozen part must stay frozen
    count_macs_params(model, image_size=32)
    assert model.training and model.layer2.training and not model.layer1.training
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_counting_prints_nothing(capsys):
    count_macs_params(torchvision.models.resnet18(weights=None), image_size=32)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_evaluation_mode_restores_each_modules_own_flag():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2)).train()
    model[1].eval()
    with evaluation_mode(model):
        assert not any(module.training for module in model.modules())
    assert [module.training for module in model.modules()] == [True, True, False]


def test_format_macs_params_scales_units_to_the_magnitude_and_names_the_conv_fc_share():
    assert format_macs_params(Macs(4_121_925_096, 4_089_185_256), 25_557_032) == \
        "4.12 GMac, of which conv+fc 4.09 GMac, 25.56 M params"
    assert format_macs_params(4_089_184_256, 25_557_032) == "4.09 GMac, 25.56 M params"
    assert format_macs_params(37_500_000, 512) == "37.50 MMac, 512 params"


def test_a_macs_count_is_an_int_that_keeps_its_conv_fc_share_through_pickling():
    macs = pickle.loads(pickle.dumps(Macs(7, 5)))
    assert (macs, macs.conv_fc, json.dumps(macs), macs / 7) == (7, 5, "7", 1.0)


def test_an_unpruned_all_conv_model_costs_what_torchvision_does(resnet50):
    """Its residual adds at the kept channels (add_at_channels, residual_bias) count nothing,
    as torchvision's residual add does not."""
    mask = compute_mask(resnet50, scope="all_conv")
    assert count_macs(build_pruned_resnet("resnet50", mask, "all_conv"), 64) == count_macs(resnet50, 64)


def masks_of(arch: str, scope: str) -> dict:
    """A mask keeping every filter, one keeping about 40% of them, and that one with every
    seventh layer emptied (its block's branch dropped)."""
    generator = torch.Generator().manual_seed(0)
    full, random, emptied = {}, {}, {}
    for index, prunable in enumerate(prunable_convs(reference_model(arch), scope)):
        full[prunable.name] = torch.ones(prunable.conv.out_channels, dtype=torch.bool)
        if prunable.tied_with in random:  # a ResNeXt conv2: the groups of its conv1
            random[prunable.name], emptied[prunable.name] = random[prunable.tied_with], emptied[prunable.tied_with]
            continue
        units = torch.rand(prunable.conv.out_channels // prunable.unit, generator=generator) < 0.4
        random[prunable.name] = units.repeat_interleave(prunable.unit)
        emptied[prunable.name] = random[prunable.name] & (index % 7 != 3)
    return {"full": full, "random": random, "emptied": emptied}


@pytest.mark.parametrize("scope", ["conv12", "all_conv"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.slow
def test_the_macs_of_a_mask_are_what_ptflops_counts_on_the_model_it_builds(arch, scope):
    for kind, mask in masks_of(arch, scope).items():
        built = build_pruned_resnet(arch, mask, scope, num_classes=10)
        assert mask_macs(arch, mask, scope, 10, image_size=64) == count_macs(built, 64), kind


def test_resnet50_without_the_branch_of_layer3_0_costs_its_convs_bns_and_two_relus_less():
    mask = masks_of("resnet50", "conv12")["full"]
    mask["layer3.0.conv1"][:] = False
    branch = (784 * 512 * 256 + 2 * 256 * 784 + 256 * 784  # conv1 at 28x28, bn1, its ReLU
              + 196 * 9 * 256 * 256 + 2 * 256 * 196 + 256 * 196  # conv2 (stride 2), bn2, its ReLU
              + 196 * 256 * 1024 + 2 * 1024 * 196)  # conv3, bn3
    assert mask_macs("resnet50", mask, "conv12", 1000) == 4_121_925_096 - branch == 3_851_024_872

"""Complexity: MACs from ptflops' aten backend, parameters counted exactly."""
import pytest
import torch
import torchvision
from torch import nn

from gsparsity.complexity import count_macs_params, evaluation_mode, format_macs_params
from gsparsity.masks import compress_model, compute_mask


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None)


def test_full_resnet50_at_224_has_its_published_size_and_cost(resnet50):
    macs, params = count_macs_params(resnet50, image_size=224)
    assert params == sum(parameter.numel() for parameter in resnet50.parameters()) == 25_557_032
    assert 4.0e9 <= macs <= 4.2e9


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
    # (ptflops counts its addmm as multiply-adds plus the bias adds).
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


def test_format_macs_params_scales_units_to_the_magnitude():
    assert format_macs_params(4_089_184_256, 25_557_032) == "4.09 GMac, 25.56 M params"
    assert format_macs_params(37_500_000, 512) == "37.50 MMac, 512 params"

"""The inference form: BatchNorm folded into the convs computes what the eval-mode model computes."""
import pytest
import torch
import torchvision
from numerics import eval_output, relative_deviation
from torch import nn

from gsparsity.inference import fuse_bn, inference_form
from gsparsity.pruned_resnet import PrunedResidualBlock, ShortcutOnlyBlock, build_pruned_resnet
from gsparsity.structure import prunable_convs

RELATIVE_TOLERANCE = 1e-5


def with_random_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that folding has work to do."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(channels))
                module.running_var.copy_(torch.empty(channels).uniform_(0.5, 2.0))
                module.weight.copy_(torch.empty(channels).uniform_(0.5, 1.5))
                module.bias.copy_(0.1 * torch.randn(channels))
    return model


def random_mask(model: nn.Module, scope: str) -> dict:
    """About half of every prunable conv's filters, at least one."""
    mask = {}
    for prunable in prunable_convs(model, scope):
        row = torch.rand(prunable.conv.out_channels) < 0.5
        row[0] = True
        mask[prunable.name] = row
    return mask


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(1)
    return with_random_batchnorm(torchvision.models.resnet18(weights=None, num_classes=10))


@pytest.fixture(scope="module", params=["conv12", "all_conv"])
def compressed_resnet50(request) -> nn.Module:
    torch.manual_seed(2)
    reference = torchvision.models.resnet50(weights=None)
    model = build_pruned_resnet("resnet50", random_mask(reference, request.param), request.param, num_classes=10)
    return with_random_batchnorm(model)


@pytest.mark.slow
def test_fused_torchvision_resnet_computes_the_eval_mode_output(resnet18, images):
    expected = eval_output(resnet18, images)
    assert relative_deviation(expected, eval_output(fuse_bn(resnet18), images)) < RELATIVE_TOLERANCE


@pytest.mark.slow
def test_fused_compressed_resnet_computes_the_eval_mode_output(compressed_resnet50, images):
    expected = eval_output(compressed_resnet50, images)
    fused = fuse_bn(compressed_resnet50)
    assert relative_deviation(expected, eval_output(fused, images)) < RELATIVE_TOLERANCE


@pytest.mark.slow
def test_no_batchnorm_is_left_in_a_fused_resnet(resnet18, compressed_resnet50):
    for model in (resnet18, compressed_resnet50):
        assert not any(isinstance(module, nn.BatchNorm2d) for module in fuse_bn(model).modules())


@pytest.mark.slow
def test_all_conv_blocks_stay_pruned_residual_blocks_when_fused():
    torch.manual_seed(3)
    reference = torchvision.models.resnet50(weights=None)
    model = build_pruned_resnet("resnet50", random_mask(reference, "all_conv"), "all_conv")
    blocks = [module for module in fuse_bn(model).modules() if isinstance(module, PrunedResidualBlock)]
    assert len(blocks) == 16  # ResNet-50: 3 + 4 + 6 + 3 blocks


@pytest.mark.parametrize("scope", ["conv12", "all_conv"])
@pytest.mark.slow
def test_a_block_that_lost_its_branch_fuses_its_shortcut_and_keeps_its_residual_bias(scope, images):
    torch.manual_seed(6)
    reference = torchvision.models.resnet50(weights=None)
    mask = random_mask(reference, scope)
    mask["layer2.0.conv2"][:] = False  # layer2.0 (with a downsample) keeps its shortcut only
    model = with_random_batchnorm(build_pruned_resnet("resnet50", mask, scope, num_classes=10))
    with torch.no_grad():
        model.layer2[0].residual_bias.copy_(0.1 * torch.randn(512))
    fused = fuse_bn(model)
    assert isinstance(fused.layer2[0], ShortcutOnlyBlock) and isinstance(fused.layer2[0].downsample[1], nn.Identity)
    assert relative_deviation(eval_output(model, images), eval_output(fused, images)) < RELATIVE_TOLERANCE


@pytest.mark.slow
def test_fusing_leaves_the_original_model_untouched(images):
    torch.manual_seed(4)
    model = with_random_batchnorm(torchvision.models.resnet18(weights=None, num_classes=10)).train()
    state_before = {key: value.clone() for key, value in model.state_dict().items()}
    fuse_bn(model)
    assert model.training
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.layer1[0].bn2, nn.BatchNorm2d)
    assert all(torch.equal(value, state_before[key]) for key, value in model.state_dict().items())


@pytest.mark.slow
def test_the_fused_copy_is_in_eval_mode(resnet18):
    resnet18.train()
    assert not any(module.training for module in fuse_bn(resnet18).modules())


def test_a_batchnorm_without_running_statistics_is_not_folded(images):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    fused = fuse_bn(model)
    assert isinstance(fused[1], nn.BatchNorm2d)
    assert torch.allclose(eval_output(fused, images), eval_output(model, images))


def test_a_batchnorm_that_does_not_follow_a_conv_is_not_folded(images):
    model = with_random_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    fused = fuse_bn(model)
    assert isinstance(fused[2], nn.BatchNorm2d)
    assert torch.allclose(eval_output(fused, images), eval_output(model, images))


def test_a_conv_with_a_bias_keeps_it_in_the_fold(images):
    torch.manual_seed(5)
    model = with_random_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[0].bias.copy_(torch.randn(4))
    expected = eval_output(model, images)
    assert relative_deviation(expected, eval_output(fuse_bn(model), images)) < RELATIVE_TOLERANCE


@pytest.mark.slow
def test_inference_form_is_channels_last_and_needs_no_gradients(resnet18, images):
    model = inference_form(resnet18, channels_last=True)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(parameter.requires_grad for parameter in model.parameters())
    channels_last_images = images.to(memory_format=torch.channels_last)
    expected = eval_output(resnet18, images)
    assert relative_deviation(expected, eval_output(model, channels_last_images)) < RELATIVE_TOLERANCE


@pytest.mark.slow
def test_inference_form_keeps_the_default_layout_when_asked(resnet18):
    model = inference_form(resnet18, channels_last=False)
    assert model.conv1.weight.is_contiguous()

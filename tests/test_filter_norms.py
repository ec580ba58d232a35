"""--rescale-filters: the retrain's branch filters get a fresh conv's norm, and the model computes
what it computed before (BatchNorm makes the branch convs blind to a filter's scale)."""
import math

import pytest
import torch
import torchvision

from gsparsity.filter_norms import init_filter_norm, rescale_branch_filters
from gsparsity.structure import branch_chain, residual_blocks


def shrunk_resnet18(smallest: float = 1e-2) -> torch.nn.Module:
    """A resnet18 whose branch filters were shrunk unevenly, as a search leaves them, with
    running statistics that fit the shrunk weights."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for _, block in residual_blocks(model):
            for conv_name, _ in branch_chain(block):
                weight = getattr(block, conv_name).weight
                weight.mul_(torch.logspace(math.log10(smallest), 0, weight.shape[0]).view(-1, 1, 1, 1))
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # plain averages: the statistics of the shrunk weights
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.mark.slow
def test_every_branch_filter_gets_the_norm_of_a_freshly_initialised_conv():
    model = shrunk_resnet18()
    factors = rescale_branch_filters(model)
    assert set(factors) == {f"{name}.{conv}" for name, block in residual_blocks(model) for conv, _ in branch_chain(block)}
    for _, block in residual_blocks(model):
        for conv_name, _ in branch_chain(block):
            conv = getattr(block, conv_name)
            norms = conv.weight.flatten(1).norm(dim=1)
            torch.testing.assert_close(norms, torch.full_like(norms, init_filter_norm(conv)))
    assert max(factors.values()) > 5  # the shrunk filters were scaled up


@pytest.mark.slow
def test_the_initial_norm_is_kaimings_fan_out_std_over_the_fan_in():
    conv = torch.nn.Conv2d(64, 128, 3)
    assert math.isclose(init_filter_norm(conv), math.sqrt(2 / (128 * 9)) * math.sqrt(64 * 9))
    torch.manual_seed(0)
    fresh = torchvision.models.resnet50().layer2[0].conv2
    measured = fresh.weight.flatten(1).norm(dim=1).mean().item()
    assert abs(measured / init_filter_norm(fresh) - 1) < 0.02


def outputs(model: torch.nn.Module, images: torch.Tensor, train: bool) -> torch.Tensor:
    state = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        output = model.train(train)(images)
    model.load_state_dict(state)  # a training-mode pass moves the running statistics
    return output


@pytest.mark.slow
def test_the_model_computes_exactly_what_it_did_in_eval_mode():
    model = shrunk_resnet18()
    images = torch.randn(8, 3, 32, 32)
    before = outputs(model, images, train=False)
    rescale_branch_filters(model)
    torch.testing.assert_close(outputs(model, images, train=False), before, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_in_training_mode_it_computes_nearly_what_it_did_where_eps_is_small_beside_the_variances():
    model = shrunk_resnet18(smallest=0.3)
    images = torch.randn(8, 3, 32, 32)
    before = outputs(model, images, train=True)
    rescale_branch_filters(model)
    # training mode divides by the batch's variance, not the running one that eps was folded with
    assert (outputs(model, images, train=True) - before).abs().max() <= 0.01 * before.abs().max()


def test_a_zero_filter_stays_zero():
    model = shrunk_resnet18()
    conv = model.layer1[0].conv1
    with torch.no_grad():
        conv.weight[3].zero_()
    rescale_branch_filters(model)
    assert conv.weight[3].abs().sum() == 0

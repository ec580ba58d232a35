"""ProxSGD against the equations restated filter by filter, and its ResNet param groups."""
from __future__ import annotations

import copy
import io
import math
import socket

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50, resnext50_32x4d

from gsparsity.structure import prunable_convs
from proxsgd import NOT_PRUNABLE, ProxSGD, group_model_parameters

FILTERS = 5


class ReferenceProxSGD:
    """The ProxSGD equations in float64, one filter at a time, written for the tests only.

    ``groups`` is a list of (params, mu): mu=None means every param is on its own and
    not prunable; otherwise the params of the group share their filters.
    """

    def __init__(self, groups, lr, momentum, delta, beta, adaptive_lr, normalization):
        self.groups = [([param.detach().clone() for param in params], mu) for params, mu in groups]
        self.lr, self.momentum, self.delta, self.beta = lr, momentum, delta, beta
        self.adaptive_lr, self.normalization = adaptive_lr, normalization
        self.velocity = [[torch.zeros_like(param) for param in params] for params, _ in self.groups]
        self.second_moment = [[torch.zeros_like(param) for param in params] for params, _ in self.groups]
        self.steps = 0
        self.pruned_filters = 0  # filters whose prox came out zero, over all steps
        self.kept_filters = 0

    def step(self, grads):
        self.steps += 1
        for group_index, (params, mu) in enumerate(self.groups):
            for index, grad in enumerate(grads[group_index]):
                velocity = self.velocity[group_index][index]
                velocity.copy_((1 - self.momentum) * velocity + self.momentum * grad)
                moment = self.second_moment[group_index][index]
                moment.copy_(self.beta * moment + (1 - self.beta) * grad**2)
            if mu is None:
                for index in range(len(params)):
                    self._plain_step(params[index], self.velocity[group_index][index],
                                     self.second_moment[group_index][index])
            else:
                self._prox_step(params, self.velocity[group_index], self.second_moment[group_index], mu)

    def _tau(self, moment_slices):
        if not self.adaptive_lr:
            return 1.0
        corrected = torch.cat(moment_slices) / (1 - self.beta**self.steps)
        return torch.sqrt(corrected).mean().item() + self.delta

    def _plain_step(self, param, velocity, moment):
        filters = param.shape[0] if param.dim() else 1
        param_rows, velocity_rows, moment_rows = (t.reshape(filters, -1) for t in (param, velocity, moment))
        for f in range(filters):
            tau = self._tau([moment_rows[f]])
            param_rows[f] -= self.lr * velocity_rows[f] / tau

    def _prox_step(self, params, velocities, moments, mu):
        filters = params[0].shape[0]
        size = sum(param.numel() // filters for param in params)
        factor = {None: 1.0, "none": 1.0, "mul": math.sqrt(size), "div": 1 / math.sqrt(size)}
        factor = factor[self.normalization]
        for f in range(filters):
            param_slices = [param.reshape(filters, -1)[f] for param in params]
            velocity_slices = [velocity.reshape(filters, -1)[f] for velocity in velocities]
            tau = self._tau([moment.reshape(filters, -1)[f] for moment in moments])
            trials = [x - v / tau for x, v in zip(param_slices, velocity_slices)]
            norm = torch.cat(trials).norm().item()
            mu_f = mu / tau * factor
            scale = max(0.0, 1 - mu_f / norm) if norm > 0 else 0.0
            self.pruned_filters += scale == 0.0
            self.kept_filters += scale > 0.0
            for x, trial in zip(param_slices, trials):
                x += self.lr * (scale * trial - x)


def random_params(layout: str) -> list[torch.Tensor]:
    """A conv-like 4-D param alone, or coupled with two 1-D params (its BN weight and bias).

    Filter f is scaled by a factor growing over orders of magnitude, so that one mu
    zeroes the small filters and only shrinks the large ones.
    """
    shapes = [(FILTERS, 3, 3, 3)] + ([(FILTERS,), (FILTERS,)] if layout == "coupled" else [])
    filter_scale = torch.logspace(-2, 1, FILTERS, dtype=torch.float64)
    return [
        (torch.randn(shape, dtype=torch.float64) * filter_scale.view((-1,) + (1,) * (len(shape) - 1)))
        .requires_grad_()
        for shape in shapes
    ]


GRAD_SCALE = 0.01


def run_both(groups, steps, **hyper):
    """Same grads into ProxSGD and the reference; returns both sets of params."""
    reference = ReferenceProxSGD(groups, **hyper)
    optimizer = ProxSGD([{"params": params, "weight_decay": mu} for params, mu in groups], **hyper)
    for _ in range(steps):
        grads = [[torch.randn_like(param) * GRAD_SCALE for param in params] for params, _ in groups]
        for (params, _), group_grads in zip(groups, grads):
            for param, grad in zip(params, group_grads):
                param.grad = grad.clone()
        optimizer.step()
        reference.step(grads)
    return [params for params, _ in groups], [params for params, _ in reference.groups], reference


@pytest.mark.parametrize("adaptive_lr", [False, True])
@pytest.mark.parametrize("normalization", [None, "mul", "div"])
@pytest.mark.parametrize("layout", ["single", "coupled"])
def test_prunable_group_matches_the_filterwise_equations(adaptive_lr, normalization, layout):
    torch.manual_seed(0)
    params = random_params(layout)
    size = sum(param.numel() // FILTERS for param in params)
    # mu_f of the order of the mid-sized filters' norm, whatever the mode (tau ~ GRAD_SCALE).
    mu = {None: 1.0, "mul": 1 / math.sqrt(size), "div": math.sqrt(size)}[normalization]
    mu *= 10 * GRAD_SCALE if adaptive_lr else 1.0
    hyper = dict(lr=0.3, momentum=0.8, delta=1e-8, beta=0.9, adaptive_lr=adaptive_lr,
                 normalization=normalization)
    got, expected, reference = run_both([(params, mu)], steps=4, **hyper)
    for got_param, expected_param in zip(got[0], expected[0]):
        torch.testing.assert_close(got_param.detach(), expected_param, rtol=1e-12, atol=1e-12)
    # Both branches of max(0, 1 - mu_f / ||x~_f||) were exercised.
    assert reference.pruned_filters > 0 and reference.kept_filters > 0


@pytest.mark.parametrize("adaptive_lr", [False, True])
@pytest.mark.parametrize("normalization", [None, "mul", "div"])
@pytest.mark.parametrize("layout", ["single", "coupled"])
def test_not_prunable_group_matches_the_filterwise_equations(adaptive_lr, normalization, layout):
    torch.manual_seed(1)
    params = random_params(layout)
    hyper = dict(lr=0.3, momentum=0.8, delta=1e-8, beta=0.9, adaptive_lr=adaptive_lr,
                 normalization=normalization)
    got, expected, _ = run_both([(params, None)], steps=4, **hyper)
    for got_param, expected_param in zip(got[0], expected[0]):
        torch.testing.assert_close(got_param.detach(), expected_param, rtol=1e-12, atol=1e-12)


def test_scalar_and_vector_params_match_the_equations_with_each_element_a_filter():
    torch.manual_seed(2)
    params = [torch.randn((), dtype=torch.float64, requires_grad=True),
              torch.randn(4, dtype=torch.float64, requires_grad=True)]
    hyper = dict(lr=0.1, momentum=0.5, delta=1e-3, beta=0.99, adaptive_lr=True, normalization=None)
    got, expected, _ = run_both([(params, None)], steps=3, **hyper)
    for got_param, expected_param in zip(got[0], expected[0]):
        torch.testing.assert_close(got_param.detach(), expected_param, rtol=1e-12, atol=1e-12)


def test_prunable_and_not_prunable_groups_together_match_the_equations():
    torch.manual_seed(3)
    groups = [(random_params("coupled"), 1.0), (random_params("single"), 0.5),
              (random_params("coupled"), None)]
    hyper = dict(lr=0.2, momentum=0.9, delta=1e-6, beta=0.999, adaptive_lr=True, normalization="none")
    got, expected, _ = run_both(groups, steps=3, **hyper)
    for got_group, expected_group in zip(got, expected):
        for got_param, expected_param in zip(got_group, expected_group):
            torch.testing.assert_close(got_param.detach(), expected_param, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.5, 0.0])
@pytest.mark.slow
def test_the_stored_second_moment_is_rescaled_without_leaving_the_equations(beta):
    """r is kept as second_moment * second_moment_scale; at beta 0.5 the scale falls under
    RESCALE_BELOW every 14 steps and is folded back, at beta 0 at every step."""
    torch.manual_seed(8)
    groups = [(random_params("coupled"), 0.02), (random_params("single"), None)]
    hyper = dict(lr=0.2, momentum=0.9, delta=1e-6, beta=beta, adaptive_lr=True, normalization="div")
    got, expected, _ = run_both(groups, steps=40, **hyper)
    for got_group, expected_group in zip(got, expected):
        for got_param, expected_param in zip(got_group, expected_group):
            torch.testing.assert_close(got_param.detach(), expected_param, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", [resnet18, resnext50_32x4d])
@pytest.mark.slow
def test_channels_last_weights_take_exactly_the_steps_contiguous_ones_take(arch):
    """--channels-last stores conv weights (and so their gradients and moments) in another
    layout; the filters, their norms and what gets pruned must not change."""
    torch.manual_seed(10)
    contiguous = arch(num_classes=10).double()
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    models = (contiguous, channels_last)
    # mu 30 with lr 1 zeroes some filters of both architectures within 3 steps (not all).
    optimizers = [ProxSGD(group_model_parameters(model, mu=30.0, scope="conv12"), lr=1.0, adaptive_lr=True,
                          normalization="div") for model in models]
    for _ in range(3):
        grads = [torch.randn_like(param) * GRAD_SCALE for param in contiguous.parameters()]
        for model, optimizer in zip(models, optimizers):
            for param, grad in zip(model.parameters(), grads):
                param.grad = torch.empty_like(param).copy_(grad)  # in the param's layout
            optimizer.step()
    assert channels_last.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for expected, got in zip(contiguous.parameters(), channels_last.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    filter_norms = torch.cat([prunable.conv.weight.flatten(1).norm(dim=1)
                              for prunable in prunable_convs(channels_last, "conv12")])
    assert 0 < (filter_norms == 0).sum() < len(filter_norms)


def conv_and_bn_params() -> list[nn.Parameter]:
    conv = nn.Conv2d(3, 4, 3, bias=False)
    bn = nn.BatchNorm2d(4)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    return [conv.weight, bn.weight, bn.bias]


def steps_with_random_grads(optimizer: ProxSGD, params: list[torch.Tensor], steps: int) -> None:
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer.step()


@pytest.mark.parametrize("adaptive_lr", [False, True])
def test_strong_mu_with_unit_lr_sets_every_filter_to_exact_zero(adaptive_lr):
    torch.manual_seed(4)
    params = conv_and_bn_params()
    optimizer = ProxSGD([{"params": params, "weight_decay": 100.0}], lr=1.0, adaptive_lr=adaptive_lr)
    steps_with_random_grads(optimizer, params, steps=3)
    for f in range(params[0].shape[0]):
        for param in params:
            assert torch.count_nonzero(param[f]) == 0


def test_weak_mu_keeps_every_filter_nonzero():
    torch.manual_seed(5)
    params = conv_and_bn_params()
    optimizer = ProxSGD([{"params": params, "weight_decay": 1e-6}], lr=1.0, adaptive_lr=True)
    steps_with_random_grads(optimizer, params, steps=3)
    filter_nonzeros = sum(torch.count_nonzero(param.reshape(param.shape[0], -1), dim=1) for param in params)
    assert bool((filter_nonzeros > 0).all())


@pytest.mark.parametrize("mu", [0.0, 0.1])  # mu = 0 would make mu_f / ||x~_f|| = 0 / 0
def test_all_zero_filter_with_zero_grad_stays_zero_without_nan(mu):
    weight = nn.Parameter(torch.zeros(2, 3, 1, 1))
    optimizer = ProxSGD([{"params": [weight], "weight_decay": mu}], lr=0.5, adaptive_lr=True)
    for _ in range(2):
        weight.grad = torch.zeros_like(weight)
        optimizer.step()
    assert torch.equal(weight.detach(), torch.zeros_like(weight))


def test_lr_below_one_shrinks_a_zeroed_prox_geometrically():
    # With scale 0, x <- x + lr * (0 - x): (1 - lr) x, not yet exactly zero.
    weight = nn.Parameter(torch.ones(1, 4))
    optimizer = ProxSGD([{"params": [weight], "weight_decay": 100.0}], lr=0.25)
    weight.grad = torch.zeros_like(weight)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.full((1, 4), 0.75))


@pytest.mark.parametrize("adaptive_lr", [False, True])
@pytest.mark.parametrize("normalization", [None, "div"])
def test_a_unit_of_k_filters_is_pruned_as_one_filter_k_times_as_large(adaptive_lr, normalization):
    # ResNeXt prunes a conv group at a time: unit=k must act exactly as if each k
    # consecutive filters (rows) were one filter.
    torch.manual_seed(2)
    unit, hyper = 2, dict(lr=0.3, momentum=0.8, beta=0.9, adaptive_lr=adaptive_lr, normalization=normalization)
    scale = torch.logspace(-2, 1, 3, dtype=torch.float64).repeat_interleave(unit)
    grouped = [(torch.randn(6, 2, 3, 3, dtype=torch.float64) * scale.view(-1, 1, 1, 1)).requires_grad_(),
               (torch.randn(6, dtype=torch.float64) * scale).requires_grad_()]
    as_filters = [param.detach().reshape(3, -1).clone().requires_grad_() for param in grouped]
    # mu_f of the order of the middle unit's norm, whatever the mode (as in the tests above).
    mu = (1.0 if normalization is None else math.sqrt(unit * 19)) * (0.1 if adaptive_lr else 1.0)
    optimizer = ProxSGD([{"params": grouped, "weight_decay": mu, "unit": unit, "members": ["a", "b"]}], **hyper)
    plain = ProxSGD([{"params": as_filters, "weight_decay": mu}], **hyper)
    for _ in range(4):
        for param, twin in zip(grouped, as_filters):
            param.grad = torch.randn_like(param) * 0.01
            twin.grad = param.grad.reshape(twin.shape).clone()
        optimizer.step()
        plain.step()
    for param, twin in zip(grouped, as_filters):
        torch.testing.assert_close(param.detach().reshape(twin.shape), twin.detach(), rtol=1e-12, atol=1e-12)
    zero = plain.zero_prox_filters()["0"]
    assert zero.any() and not zero.all()  # both branches of the prox ran
    heading = optimizer.zero_prox_filters()
    assert set(heading) == {"a", "b"}  # one entry per member, one flag per filter
    assert torch.equal(heading["a"], zero.repeat_interleave(unit))


def test_a_unit_that_does_not_divide_the_filters_is_refused():
    with pytest.raises(ValueError, match="unit"):
        ProxSGD([{"params": [nn.Parameter(torch.ones(6, 2))], "weight_decay": 0.1, "unit": 4}])


@pytest.mark.parametrize("lr", [1.0, 0.25])
def test_zero_prox_filters_names_the_filters_being_driven_to_zero(lr):
    torch.manual_seed(6)
    weight = nn.Parameter(torch.randn(FILTERS, 3) * torch.tensor([0.01, 10, 0.01, 10, 10]).view(-1, 1))
    other = nn.Parameter(torch.randn(2))
    optimizer = ProxSGD([{"params": [weight], "weight_decay": 0.5, "name": "conv"},
                         {"params": [other]}], lr=lr)
    assert optimizer.zero_prox_filters() == {}  # nothing stepped yet
    before = weight.detach().clone()
    weight.grad, other.grad = torch.zeros_like(weight), torch.zeros_like(other)
    optimizer.step()
    heading = optimizer.zero_prox_filters()
    assert list(heading) == ["conv"]  # prunable groups only, by name
    assert heading["conv"].tolist() == [True, False, True, False, False]
    # Those filters moved a fraction lr of the way to zero: zero now when lr is 1.
    torch.testing.assert_close(weight.detach()[heading["conv"]], (1 - lr) * before[heading["conv"]])
    assert bool((weight.detach()[~heading["conv"]].norm(dim=1) > 0).all())


@pytest.mark.parametrize("adaptive_lr", [False, True])
def test_step_never_reads_tensor_values_back_to_python(adaptive_lr):
    # Meta tensors have no values: .item(), bool() or NumPy on them raise, as would a
    # host-device sync on CUDA. The step must still run.
    with pytest.raises(RuntimeError):
        torch.empty((), device="meta").item()
    prunable = [nn.Parameter(torch.empty(shape, device="meta")) for shape in [(4, 3, 3, 3), (4,), (4,)]]
    others = [nn.Parameter(torch.empty(shape, device="meta")) for shape in [(2, 3), (5,), ()]]
    optimizer = ProxSGD([{"params": prunable, "weight_decay": 0.1}, {"params": others}],
                        adaptive_lr=adaptive_lr, normalization="mul")
    for _ in range(2):
        for param in prunable + others:
            param.grad = torch.empty_like(param)
        optimizer.step()
    assert optimizer.state[prunable[0]]["step"] == 2


def test_param_without_grad_is_left_alone_and_gets_no_state():
    with_grad, without_grad = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    optimizer = ProxSGD([with_grad, without_grad], lr=0.1)
    with_grad.grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(without_grad.detach(), torch.ones(3))
    assert without_grad not in optimizer.state
    assert not torch.equal(with_grad.detach(), torch.ones(3))


def two_group_setup(seed: int):
    torch.manual_seed(seed)
    shapes = [(4, 2, 3, 3), (4,), (4,), (3, 5), ()]
    params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    groups = [{"params": params[:3], "weight_decay": 0.3, "name": "conv"},
              {"params": params[3:], "weight_decay": None, "name": NOT_PRUNABLE}]
    return params, groups


HYPER = dict(lr=0.05, momentum=0.9, beta=0.99, adaptive_lr=True, normalization="div")


def grads_for(params, count):
    generator = torch.Generator().manual_seed(123)
    return [[torch.randn(param.shape, generator=generator) for param in params] for _ in range(count)]


def apply_steps(optimizer, params, grads):
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.clone()
        optimizer.step()


def resumed_from(params, state):
    """A fresh ProxSGD on a copy of ``params`` that loads ``state``, as a resumed run does."""
    resumed_params, resumed_groups = two_group_setup(seed=99)  # different start, overwritten below
    with torch.no_grad():
        for resumed, original in zip(resumed_params, params):
            resumed.copy_(original)
    resumed_optimizer = ProxSGD(resumed_groups, **HYPER)
    resumed_optimizer.load_state_dict(state)
    return resumed_params, resumed_optimizer


@pytest.mark.parametrize("through_file", [False, True])
def test_resuming_from_state_dict_continues_bit_identically(through_file):
    params, groups = two_group_setup(seed=6)
    optimizer = ProxSGD(groups, **HYPER)
    grads = grads_for(params, 6)
    apply_steps(optimizer, params, grads[:3])

    # A state_dict holds the live state tensors: copy it, as a checkpoint would.
    state = copy.deepcopy(optimizer.state_dict())
    if through_file:
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    resumed_params, resumed_optimizer = resumed_from(params, state)
    apply_steps(optimizer, params, grads[3:])
    apply_steps(resumed_optimizer, resumed_params, grads[3:])
    for resumed, original in zip(resumed_params, params):
        assert torch.equal(resumed, original)


def test_a_state_without_a_moment_scale_holds_r_itself_as_older_checkpoints_do():
    params, groups = two_group_setup(seed=9)
    optimizer = ProxSGD(groups, **HYPER)
    grads = grads_for(params, 6)
    apply_steps(optimizer, params, grads[:3])
    old_state = copy.deepcopy(optimizer.state_dict())
    for param_state in old_state["state"].values():  # r itself, and no scale
        param_state["second_moment"] *= param_state.pop("second_moment_scale")
    resumed_params, resumed_optimizer = resumed_from(params, old_state)
    apply_steps(optimizer, params, grads[3:])
    apply_steps(resumed_optimizer, resumed_params, grads[3:])
    for resumed, original in zip(resumed_params, params):
        torch.testing.assert_close(resumed, original, rtol=1e-6, atol=1e-7)  # float32: r = c * s rounds


def test_step_counter_is_saved_as_a_plain_int():
    params, groups = two_group_setup(seed=7)
    optimizer = ProxSGD(groups, **HYPER)
    apply_steps(optimizer, params, grads_for(params, 2))
    steps = [param_state["step"] for param_state in optimizer.state_dict()["state"].values()]
    assert steps == [2] * len(params) and all(type(step) is int for step in steps)


@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=0.0), dict(lr=-1.0), dict(lr=float("nan")),
        dict(momentum=0.0), dict(momentum=1.5), dict(momentum=-0.1),
        dict(beta=1.0), dict(beta=-0.1),
        dict(delta=-1e-8),
        dict(normalization="sqrt"),
    ],
)
def test_invalid_hyper_parameter_raises_value_error(hyper):
    with pytest.raises(ValueError):
        ProxSGD([nn.Parameter(torch.ones(2))], **hyper)


def test_invalid_hyper_parameter_in_a_group_raises_value_error():
    with pytest.raises(ValueError, match="momentum"):
        ProxSGD([{"params": [nn.Parameter(torch.ones(2))], "momentum": 2.0}])


def test_negative_weight_decay_raises_value_error():
    with pytest.raises(ValueError, match="weight_decay"):
        ProxSGD([{"params": [nn.Parameter(torch.ones(2, 3))], "weight_decay": -0.1}])


def test_prunable_params_with_different_first_dimension_raise_value_error():
    mismatched = [nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(5))]
    with pytest.raises(ValueError, match="first dimension"):
        ProxSGD([{"params": mismatched, "weight_decay": 0.1}])


def test_refused_param_group_is_not_added():
    optimizer = ProxSGD([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError):
        optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": -1.0})
    assert len(optimizer.param_groups) == 1


def test_normalization_none_string_means_no_normalization():
    torch.manual_seed(8)
    start = torch.randn(3, 4)
    results = []
    for normalization in (None, "none"):
        weight = nn.Parameter(start.clone())
        optimizer = ProxSGD([{"params": [weight], "weight_decay": 1.0}], lr=0.5, normalization=normalization)
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        results.append(weight.detach())
    assert torch.equal(results[0], results[1])


# --- group_model_parameters ------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50_model() -> nn.Module:
    return resnet50(weights=None)


def prunable_groups(groups):
    return [group for group in groups if group["weight_decay"] is not None]


@pytest.mark.parametrize("scope, expected", [("conv12", 32), ("all_conv", 48)])
def test_resnet50_has_one_prunable_group_per_prunable_conv(resnet50_model, scope, expected):
    groups = group_model_parameters(resnet50_model, mu=0.1, scope=scope)
    assert len(prunable_groups(groups)) == expected
    assert [group["name"] for group in groups if group["weight_decay"] is None] == [NOT_PRUNABLE]


@pytest.mark.parametrize("group", ["filter", "channel"])
@pytest.mark.parametrize("scope", ["conv12", "all_conv"])
def test_every_model_parameter_is_in_exactly_one_group(resnet50_model, scope, group):
    groups = group_model_parameters(resnet50_model, mu=0.1, scope=scope, group=group)
    grouped = [id(param) for param_group in groups for param in param_group["params"]]
    assert sorted(grouped) == sorted(id(param) for param in resnet50_model.parameters())


def test_layer_adaptive_doubles_mu_in_layer2_and_layer3(resnet50_model):
    groups = group_model_parameters(resnet50_model, mu=0.1, layer_adaptive=True)
    expected = {"layer1": 0.1, "layer2": 0.2, "layer3": 0.2, "layer4": 0.1}
    for group in prunable_groups(groups):
        assert group["weight_decay"] == pytest.approx(expected[group["name"].split(".")[0]])
    assert {group["name"].split(".")[0] for group in prunable_groups(groups)} == set(expected)


def test_without_layer_adaptive_every_prunable_group_gets_mu(resnet50_model):
    groups = group_model_parameters(resnet50_model, mu=0.1, layer_adaptive=False)
    assert {group["weight_decay"] for group in prunable_groups(groups)} == {0.1}


def test_filter_grouping_holds_the_conv_weight_alone(resnet50_model):
    for group in prunable_groups(group_model_parameters(resnet50_model, mu=0.1, group="filter")):
        assert group["params"] == [resnet50_model.get_submodule(group["name"]).weight]


def test_channel_grouping_puts_bn_weight_and_bias_with_the_conv(resnet50_model):
    for group in prunable_groups(group_model_parameters(resnet50_model, mu=0.1, group="channel")):
        bn = resnet50_model.get_submodule(group["name"].replace("conv", "bn"))
        conv = resnet50_model.get_submodule(group["name"])
        assert group["params"] == [conv.weight, bn.weight, bn.bias]


def test_resnet18_conv12_prunes_conv1_of_each_basic_block():
    model = resnet18(weights=None)
    groups = prunable_groups(group_model_parameters(model, mu=0.1, scope="conv12"))
    expected = [f"layer{stage}.{block}.conv1" for stage in range(1, 5) for block in range(2)]
    assert [group["name"] for group in groups] == expected


@pytest.mark.parametrize("group", ["filter", "channel"])
def test_a_resnext_block_prunes_conv1_and_the_grouped_conv2_one_group_at_a_time(group):
    model = resnext50_32x4d(weights=None)
    groups = group_model_parameters(model, mu=0.1, scope="all_conv", group=group)
    grouped = [id(param) for param_group in groups for param in param_group["params"]]
    assert sorted(grouped) == sorted(id(param) for param in model.parameters())
    tied = {group["name"]: group for group in prunable_groups(groups) if "members" in group}
    assert len(tied) == 16  # one per block
    block = model.layer3[2]
    pair = tied["layer3.2.conv1"]
    assert pair["members"] == ["layer3.2.conv1", "layer3.2.conv2"]
    assert pair["unit"] == block.conv2.out_channels // block.conv2.groups == 16
    assert pair["weight_decay"] == pytest.approx(0.2)  # layer-adaptive: layer3 gets 2 mu
    expected = [block.conv1.weight, block.conv2.weight]
    if group == "channel":
        expected = [block.conv1.weight, block.bn1.weight, block.bn1.bias,
                    block.conv2.weight, block.bn2.weight, block.bn2.bias]
    assert pair["params"] == expected
    assert "layer3.2.conv3" in {group["name"] for group in prunable_groups(groups)} - set(tied)
    ProxSGD(groups)  # accepted as they are


def test_groups_are_accepted_by_proxsgd_name_key_included(resnet50_model):
    optimizer = ProxSGD(group_model_parameters(resnet50_model, mu=0.1, group="channel"))
    assert optimizer.param_groups[0]["name"] == "layer1.0.conv1"


class Wrapper(nn.Module):
    """Stands in for DataParallel: the real model under ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def single_process_group():
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    torch.distributed.destroy_process_group()


def assert_same_groups(wrapped_groups, plain_groups):
    assert [group["name"] for group in wrapped_groups] == [group["name"] for group in plain_groups]
    for wrapped, plain in zip(wrapped_groups, plain_groups):
        assert [id(param) for param in wrapped["params"]] == [id(param) for param in plain["params"]]


def test_distributed_data_parallel_model_gives_the_plain_model_groups(single_process_group):
    model = resnet18(weights=None)
    wrapped = nn.parallel.DistributedDataParallel(model)
    assert_same_groups(
        group_model_parameters(wrapped, mu=0.1, group="channel"),
        group_model_parameters(model, mu=0.1, group="channel"),
    )


def test_model_wrapped_in_data_parallel_gives_the_plain_model_groups():
    model = resnet18(weights=None)
    assert_same_groups(
        group_model_parameters(nn.DataParallel(model), mu=0.1),
        group_model_parameters(model, mu=0.1),
    )


@pytest.mark.parametrize(
    "kwargs", [dict(mu=-0.1), dict(mu=0.1, scope="conv3"), dict(mu=0.1, group="kernel")]
)
def test_group_model_parameters_refuses_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        group_model_parameters(Wrapper(resnet18(weights=None)), **kwargs)


@pytest.mark.slow
def test_a_few_training_steps_on_resnet18_keep_params_finite_and_move_them():
    torch.manual_seed(9)
    model = resnet18(weights=None, num_classes=10)
    optimizer = ProxSGD(group_model_parameters(model, mu=0.01, group="channel"), lr=0.01,
                        adaptive_lr=True, normalization="div")
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])  # batch 2: BN needs > 1 value
    before = [param.detach().clone() for param in model.parameters()]
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    assert all(torch.isfinite(param).all() for param in model.parameters())
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters()))

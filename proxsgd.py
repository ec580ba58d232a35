"""ProxSGD with a group-lasso proximal step, and the ResNet parameter groups it needs.

ProxSGD (Yang et al., ICLR 2020) takes a momentum step on the loss, then applies the
proximal operator of the regularizer. Here the regularizer is group lasso over conv
filters, so its proximal operator shrinks every filter towards zero as a whole, and
returns it as exactly zero once its norm falls under the threshold: pruning happens
during training, filter by filter. The parameter then moves a fraction ``lr`` of the
way to that point: with ``lr=1`` a filter whose prox is zero is exactly zero at once;
with ``lr < 1`` it decays by a factor (1 - lr) at every step its prox stays zero.

A param group with ``weight_decay=mu`` (a float) is ONE prunable group: its params share
their first dimension F and "filter f" is slice f of every one of them (for instance
``[conv.weight, bn.weight, bn.bias]``). A group with ``weight_decay=None`` is not
prunable and gets the plain (adaptive) momentum step.

For each parameter x with gradient g, at step t (counted from 1):

    v <- (1 - momentum) * v + momentum * g            # momentum weighs the NEW gradient
    r <- beta * r + (1 - beta) * g**2                  # only with adaptive_lr
    tau_f = mean_f sqrt(r / (1 - beta**t)) + delta     # tau = 1 without adaptive_lr

    not prunable:  x <- x - lr * v / tau
    prunable:      x~ = x - v / tau
                   mu_f = mu / tau_f  (* sqrt(s) for "mul", / sqrt(s) for "div")
                   x_prox_f = max(0, 1 - mu_f / ||x~_f||) * x~_f
                   x <- x + lr * (x_prox - x)

where s is the number of elements of one filter (summed over the group's params).
A group with ``unit=k`` (ResNeXt's grouped convs) prunes k consecutive filters as one:
"filter f" above is then filters f*k .. f*k+k-1 of every param.

r is stored as ``second_moment`` times a Python float ``second_moment_scale`` c that
follows beta**t: then its update is ONE pass over the tensor, s += (1 - beta) / (beta * c)
* g**2 with c <- beta * c, instead of a multiply and an add, and the scale goes on the
(F,) filter sums. Once beta * c falls below ``RESCALE_BELOW`` (every ~9,200 steps at
beta 0.999, every step at beta 0), that step multiplies s back (c <- 1). A state
without a scale (checkpoints written before it existed) holds r itself: c = 1.

The step never synchronises with the device: no ``.item()``, no Python branching on
tensor values. The moment updates run as multi-tensor ``torch._foreach_*`` ops over all
parameters; everything per filter is a vectorised op on an (F,) vector. Full-size
temporaries (sqrt(r), x~) go to one reused scratch buffer rather than fresh memory.
"""
from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from gsparsity.structure import check_scope, pruning_groups, unwrap

NORMALIZATIONS = (None, "none", "mul", "div")
GROUPINGS = ("filter", "channel")
NOT_PRUNABLE = "not_prunable"
# Layer-adaptive regularization: the middle stages get twice the gain (GSparsity paper).
STAGE_GAIN = {"layer2": 2.0, "layer3": 2.0}
# Smallest scale c of the stored second moment (see the module docstring): s grows as r / c,
# so c >= 1e-4 keeps s within 1e4 of r, far from overflow in fp32, bf16 or fp64 (an fp16
# moment is never scaled).
RESCALE_BELOW = 1e-4


class ProxSGD(torch.optim.Optimizer):
    """ProxSGD whose proximal step prunes whole filters of each prunable param group.

    Every param group carries ``weight_decay``: the group-lasso gain mu of a prunable
    group, or ``None`` for parameters that are not prunable (the default). The other
    hyper-parameters may also be set per group, as with any torch optimizer.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.9,
        delta: float = 1e-8,
        beta: float = 0.999,
        adaptive_lr: bool = False,
        normalization: str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            delta=delta,
            beta=beta,
            adaptive_lr=adaptive_lr,
            normalization=normalization,
            weight_decay=None,
        )
        _check_hyper_parameters(defaults)
        super().__init__(params, defaults)
        # Reused temporaries, one per (device, dtype); not state: nothing to save.
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        # The last step's shrink factor of every prunable group, by group index.
        self._last_shrink: dict[int, Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, refusing hyper-parameters or prunable params that make no sense."""
        super().add_param_group(param_group)
        try:
            _check_hyper_parameters(self.param_groups[-1])
            _check_prunable_params(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One ProxSGD step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active_groups = [self._active_params(group) for group in self.param_groups]
        self._update_moments(active_groups)
        for index, (group, (params, _)) in enumerate(zip(self.param_groups, active_groups)):
            if not params:
                continue
            if group["weight_decay"] is None:
                self._momentum_step(group, params)
            else:
                self._last_shrink[index] = self._prox_step(group, params)
        return loss

    def zero_prox_filters(self) -> dict[str, Tensor]:
        """Per prunable group, a bool (F,) tensor: the filters whose proximal point was
        exactly zero at the last step. Keyed by each of the group's ``members`` (the layers
        whose filters it prunes together) if it has them, else by its ``name`` or index.

        These are the filters the optimizer is driving to zero: with ``lr=1`` they are
        zero now; with ``lr < 1`` they are (1 - lr) times smaller, and reach zero if their
        prox stays zero. Groups that have not stepped yet are left out.
        """
        heading: dict[str, Tensor] = {}
        for index, shrink in self._last_shrink.items():
            group = self.param_groups[index]
            zero = (shrink == 0).repeat_interleave(group.get("unit", 1))
            for member in group.get("members") or [group.get("name", index)]:
                heading[str(member)] = zero
        return heading

    def _active_params(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The group's params that have a gradient, and those gradients; counts their step."""
        params, grads = [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("ProxSGD does not support sparse gradients")
            state = self.state[param]
            if not state:
                state["step"] = 0  # a plain int: the state_dict stays weights_only-loadable
                state["velocity"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["adaptive_lr"] and "second_moment" not in state:
                state["second_moment"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(param)
            grads.append(param.grad)
        return params, grads

    def _scratch_like(self, tensor: Tensor) -> Tensor:
        """A reused buffer shaped and laid out like ``tensor`` (channels_last too), its
        content undefined.

        Large temporaries allocated afresh every step cost more than the arithmetic
        on them (page faults on CPU), so the step writes them here instead. The same
        layout as the parameter keeps the elementwise ops on their fast path.
        """
        key = (tensor.device, tensor.dtype)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < tensor.numel():
            buffer = torch.empty(tensor.numel(), device=tensor.device, dtype=tensor.dtype)
            self._scratch[key] = buffer
        scratch = buffer[: tensor.numel()]
        if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
            return scratch.as_strided(tensor.shape, tensor.stride())
        return scratch.view(tensor.shape)

    def _update_moments(self, active_groups: list[tuple[list[Tensor], list[Tensor]]]) -> None:
        """v and r of every active parameter, as few multi-tensor ops as possible."""
        # foreach ops take one scalar per call and want one device/dtype per list.
        buckets: dict[tuple, tuple[list[Tensor], list[Tensor], list[dict]]] = defaultdict(
            lambda: ([], [], [])
        )
        for group, (params, grads) in zip(self.param_groups, active_groups):
            for param, grad in zip(params, grads):
                key = (param.device, param.dtype, group["momentum"], group["beta"], group["adaptive_lr"])
                bucket_grads, velocities, states = buckets[key]
                state = self.state[param]
                bucket_grads.append(grad)
                velocities.append(state["velocity"])
                states.append(state)
        for (_device, _dtype, momentum, beta, adaptive_lr), bucket in buckets.items():
            bucket_grads, velocities, states = bucket
            torch._foreach_lerp_(velocities, bucket_grads, momentum)
            if adaptive_lr:
                _update_second_moments(states, bucket_grads, beta)

    def _filter_tau(self, group: dict[str, Any], params: list[Tensor]) -> Tensor | None:
        """tau_f of the filters shared by ``params``, shape (F,); None means tau = 1."""
        if not group["adaptive_lr"]:
            return None
        unit = group.get("unit", 1)
        filter_size = _filter_size(params, unit)
        root_mean = None
        for param in params:
            state = self.state[param]
            root = torch.sqrt(state["second_moment"], out=self._scratch_like(param))
            # Bias correction and the moment's scale go on the (F,) sums, not on the whole tensor.
            scale = _root_scale(state, group["beta"]) / filter_size
            row_mean = _rows(root, unit).sum(dim=_row_dims(root)).mul_(scale)
            root_mean = row_mean if root_mean is None else root_mean.add_(row_mean)
        return root_mean.add_(group["delta"])

    def _momentum_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """x <- x - lr * v / tau for every param on its own (not prunable)."""
        lr = group["lr"]
        velocities = [self.state[param]["velocity"] for param in params]
        if not group["adaptive_lr"]:
            torch._foreach_add_(params, velocities, alpha=-lr)
            return
        # Scalars and vectors (BN, biases: most of a ResNet's tensors) have one element
        # per filter, so tau is elementwise there and multi-tensor ops can do them all.
        elementwise = [param for param in params if param.dim() <= 1]
        if elementwise:
            self._elementwise_adaptive_step(group, elementwise)
        for param, velocity in zip(params, velocities):
            if param.dim() > 1:
                tau = self._filter_tau(group, [param])
                param.addcdiv_(velocity, _as_column(tau, param), value=-lr)

    def _elementwise_adaptive_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """x <- x - lr * v / tau with tau = sqrt(r / (1 - beta**t)) + delta, element by element."""
        states = [self.state[param] for param in params]
        taus = torch._foreach_sqrt([state["second_moment"] for state in states])
        torch._foreach_mul_(taus, [_root_scale(state, group["beta"]) for state in states])
        torch._foreach_add_(taus, group["delta"])
        torch._foreach_addcdiv_(params, [state["velocity"] for state in states], taus, value=-group["lr"])

    def _trial_norm(self, params: list[Tensor], velocities: list[Tensor], tau: Tensor | None,
                    unit: int) -> Tensor:
        """||x~_f|| with x~ = x - v / tau, over the whole filter (or unit) f of a group, shape (F / unit,)."""
        row_norms = []  # each param's part of the filters
        for param, velocity in zip(params, velocities):
            trial = self._scratch_like(param)  # x~, kept only long enough for its norm
            if tau is None:
                torch.sub(param, velocity, out=trial)
            else:
                torch.addcdiv(param, velocity, _as_column(tau, param, unit), value=-1, out=trial)
            row_norms.append(torch.linalg.vector_norm(_rows(trial, unit), dim=_row_dims(trial)))
        if len(row_norms) == 1:
            return row_norms[0]
        return torch.linalg.vector_norm(torch.stack(row_norms), dim=0)

    def _prox_step(self, group: dict[str, Any], params: list[Tensor]) -> Tensor:
        """Momentum step then group-lasso proximal step on the filters of one prunable group;
        returns the (F,) shrink factors, 0 where the proximal point is zero."""
        lr = group["lr"]
        velocities = [self.state[param]["velocity"] for param in params]
        unit = group.get("unit", 1)
        tau = self._filter_tau(group, params)
        trial_norm = self._trial_norm(params, velocities, tau, unit)
        # mu_f / ||x~_f|| = mu * factor / (tau_f * ||x~_f||)
        divisor = trial_norm if tau is None else trial_norm.mul_(tau)
        # An all-zero filter and mu = 0 would give 0 / 0 = NaN: keep the divisor positive.
        divisor.clamp_min_(torch.finfo(divisor.dtype).tiny)
        factor = _normalization_factor(group["normalization"], _filter_size(params, unit))
        # shrink = max(0, 1 - mu_f / ||x~_f||)
        shrink = divisor.reciprocal_().mul_(-group["weight_decay"] * factor).add_(1.0).clamp_min_(0.0)
        # x + lr * (shrink * (x - v / tau) - x) == keep * x - push * v: no need to keep x~.
        keep = shrink * lr + (1.0 - lr)
        push = shrink * lr if tau is None else shrink * lr / tau
        for param, velocity in zip(params, velocities):
            param.mul_(_as_column(keep, param, unit)).addcmul_(velocity, _as_column(push, param, unit), value=-1)
        return shrink


def group_model_parameters(
    model: nn.Module,
    mu: float,
    scope: str = "conv12",
    layer_adaptive: bool = True,
    group: str = "filter",
) -> list[dict[str, Any]]:
    """ProxSGD param groups: one prunable group per prunable conv, then everything else.

    ``group="filter"`` regularizes the conv weight alone (the paper's choice);
    ``"channel"`` adds the conv's BatchNorm weight and bias, so that a channel
    whose filter is zero outputs exactly zero. With ``layer_adaptive`` the convs of stages layer2 and
    layer3 get ``2 * mu``. ``model`` may be wrapped in DistributedDataParallel.
    """
    check_scope(scope)
    if group not in GROUPINGS:
        raise ValueError(f"group must be one of {', '.join(GROUPINGS)}, got {group!r}")
    if not (isinstance(mu, numbers.Real) and mu >= 0):
        raise ValueError(f"mu must be a number >= 0, got {mu!r}")
    param_groups = []
    grouped_ids: set[int] = set()
    # A tied pair (ResNeXt) is one group whose unit is a conv group's width.
    for members in pruning_groups(unwrap(model), scope):
        prunable = members[0]
        params = []
        for member in members:
            params.append(member.conv.weight)
            if group == "channel":
                bn_params = (member.bn.weight, member.bn.bias)  # None when the BN is not affine
                params += [bn_param for bn_param in bn_params if bn_param is not None]
        gain = STAGE_GAIN.get(prunable.stage, 1.0) if layer_adaptive else 1.0
        param_group = {"params": params, "weight_decay": mu * gain, "name": prunable.name}
        if prunable.tied_with is not None:
            param_group.update(unit=prunable.unit, members=[member.name for member in members])
        param_groups.append(param_group)
        grouped_ids.update(id(param) for param in params)
    # The wrapper shares its parameters with the plain model: the same objects either way.
    rest = [param for param in model.parameters() if id(param) not in grouped_ids]
    param_groups.append({"params": rest, "weight_decay": None, "name": NOT_PRUNABLE})
    return param_groups


def _check_hyper_parameters(group: dict[str, Any]) -> None:
    """ValueError for any hyper-parameter of ``group`` outside its valid range."""
    # "not (a < x)" rather than "x <= a" so that NaN is refused too.
    if not group["lr"] > 0:
        raise ValueError(f"lr must be > 0, got {group['lr']!r}")
    if not 0 < group["momentum"] <= 1:
        raise ValueError(f"momentum must be in (0, 1], got {group['momentum']!r}")
    if not 0 <= group["beta"] < 1:
        raise ValueError(f"beta must be in [0, 1), got {group['beta']!r}")
    if not group["delta"] >= 0:
        raise ValueError(f"delta must be >= 0, got {group['delta']!r}")
    if group["normalization"] not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {group['normalization']!r}")
    mu = group["weight_decay"]
    if mu is not None and not mu >= 0:
        raise ValueError(f"weight_decay (mu) must be >= 0 or None, got {mu!r}")


def _check_prunable_params(group: dict[str, Any]) -> None:
    """ValueError unless the params of a prunable group share their first dimension."""
    if group["weight_decay"] is None:
        return
    shapes = [tuple(param.shape) for param in group["params"]]
    name = group.get("name", "a prunable group")
    if any(len(shape) == 0 for shape in shapes) or len({shape[0] for shape in shapes}) > 1:
        raise ValueError(f"params of {name} must share their first dimension (filters), got shapes {shapes}")
    unit = group.get("unit", 1)
    if not (isinstance(unit, int) and unit >= 1 and shapes[0][0] % unit == 0):
        raise ValueError(f"unit of {name} must be a whole number of filters dividing {shapes[0][0]}, got {unit!r}")


def _rows(tensor: Tensor, unit: int = 1) -> Tensor:
    """``tensor`` with its first dimension split into (F / unit, unit): a view whatever its
    layout (a reshape to (F, -1) would copy a channels_last weight). Reduced over
    :func:`_row_dims`, it gives one figure per filter, or per ``unit`` consecutive filters
    (a 0-dim tensor is one filter)."""
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    return tensor.view(tensor.shape[0] // unit, unit, *tensor.shape[1:])


def _row_dims(tensor: Tensor) -> tuple[int, ...]:
    """The dimensions of ``_rows(tensor)`` that one filter (or unit) spans."""
    return tuple(range(1, max(tensor.dim(), 1) + 1))


def _as_column(per_filter: Tensor, like: Tensor, unit: int = 1) -> Tensor:
    """An (F / unit,) vector shaped to broadcast over the filters of ``like``."""
    if like.dim() == 0:
        return per_filter.reshape(())
    if unit > 1:
        per_filter = per_filter.repeat_interleave(unit)
    return per_filter.view((-1,) + (1,) * (like.dim() - 1))


def _filter_size(params: list[Tensor], unit: int = 1) -> int:
    """s: elements in one filter (or unit of filters), summed over the params that share them."""
    return unit * sum(param.numel() // (param.shape[0] if param.dim() else 1) for param in params)


def _update_second_moments(states: list[dict[str, Any]], grads: list[Tensor], beta: float) -> None:
    """r <- beta * r + (1 - beta) * g**2 for each state, r = second_moment * second_moment_scale:
    one pass where the scale may shrink further, two (the plain update, c back to 1) where not."""
    one_pass: dict[float, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
    rescaled: dict[float, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
    for state, grad in zip(states, grads):
        scale = state.get("second_moment_scale", 1.0)
        wide = torch.finfo(state["second_moment"].dtype).max > 1e30  # not fp16: s may be 1e4 * r
        batch = one_pass if wide and beta * scale >= RESCALE_BELOW else rescaled
        moments, moment_grads = batch[scale]  # states that stepped together share their scale
        moments.append(state["second_moment"])
        moment_grads.append(grad)
        state["second_moment_scale"] = beta * scale if batch is one_pass else 1.0
    for scale, (moments, moment_grads) in one_pass.items():
        # r' = beta*c*s + (1-beta)*g**2 = (beta*c) * (s + (1-beta)/(beta*c) * g**2)
        torch._foreach_addcmul_(moments, moment_grads, moment_grads, value=(1.0 - beta) / (beta * scale))
    for scale, (moments, moment_grads) in rescaled.items():
        torch._foreach_mul_(moments, beta * scale)
        torch._foreach_addcmul_(moments, moment_grads, moment_grads, value=1.0 - beta)


def _root_scale(state: dict[str, Any], beta: float) -> float:
    """sqrt(r / (1 - beta**t)) = sqrt(second_moment) * this: the moment's scale and the bias
    correction in one factor."""
    return math.sqrt(state["second_moment_scale"] / (1.0 - beta ** state["step"]))


def _normalization_factor(normalization: str | None, filter_size: int) -> float:
    """How mu scales with the filter size s."""
    if normalization == "mul":
        return math.sqrt(filter_size)
    if normalization == "div":
        return 1.0 / math.sqrt(filter_size)
    return 1.0

"""Which filters survive, and the exact compression of a sparse model into a small one.

A *mask* maps the name of every prunable conv (``structure.prunable_convs``; names
of the plain torchvision model, e.g. ``"layer1.0.conv1"``) to a 1-D bool tensor on
the CPU, True for the filters that are kept. On disk (``save_mask`` /
``load_mask``) and in checkpoints (``mask_to_record`` / ``mask_from_record``) it is
plain JSON data listing the indices of kept filters.

``kept_indices`` lists the channels the compressed model keeps of a layer. A block
whose branch has a conv with *no* kept filter loses its whole branch
(``dropped_blocks``), as in the original's compressed models: nothing passes that
conv, so the block computes ``relu(shortcut(x) + constant)``
(``pruned_resnet.ShortcutOnlyBlock``), and its branch convs and BatchNorms, their
MACs and parameters, are gone; the other layers of that block keep nothing either.

``transfer_model_parameters`` copies the surviving weights into the small model
(``pruned_resnet.build_pruned_resnet``) through a *channel plan*: pruning filter
``f`` of a conv removes output channel ``f`` of the conv, channel ``f`` of its
BatchNorm and input channel ``f`` of its consumer conv (Torch-Pruning's coupled
group). It then folds what pruned channels still emit in eval mode:

* ProxSGD with group="channel" zeroes the filter *and* its BN weight and bias, so a
  pruned channel outputs exactly 0 and removing it changes nothing.
* With group="filter" only the conv filter is zero; its BN still emits the constant
  ``c_f = bias_f - running_mean_f * weight_f / sqrt(running_var_f + eps)``.
  If a conv consumes it (after the block's ReLU, so ``a_f = relu(c_f)``), the
  missing contribution ``b_o = sum_f a_f * sum_{kh,kw} W[o, f, kh, kw]`` is folded
  into the consumer's BN running mean (``BN(y + b)`` with mean ``m`` equals
  ``BN(y)`` with mean ``m - b``). This is exact for a 1x1 consumer; for a 3x3
  consumer with zero padding it is exact away from the image border only, where
  the padded taps see zeros instead of ``a_f``. If the residual add consumes it
  (``all_conv``, last conv of the branch, no ReLU before the add), ``c_f`` goes
  into the compressed block's ``residual_bias`` buffer at channel ``f``.

A dropped branch still adds a constant to the residual in eval mode: after the last
conv that keeps nothing, its BatchNorm emits ``c_f`` on every channel (0 with
group="channel"), and the rest of the branch maps constants to constants
(``dropped_branch_output``). That constant is the ``ShortcutOnlyBlock``'s
``residual_bias``. It is exact where the rest of the branch has only 1x1 convs
(conv2 or conv3 of a Bottleneck emptied) and with group="channel" (the constant
reaching the next conv is 0, which zero padding does not change); where a nonzero
constant feeds a 3x3 conv (conv1 of a Bottleneck or a BasicBlock emptied, with
group="filter") it is exact away from the image border only, as above, and
``compress_model(..., check_input=...)`` logs the deviation.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
import torchvision
from torch import nn

from .checkpoint import atomic_write_text
from .complexity import evaluation_mode
from .errors import UserError
from .structure import (RESIDUAL, SCOPES, PrunableConv, branch_chain, check_scope, prunable_convs, pruning_groups,
                        unwrap)

Mask = dict[str, torch.Tensor]
ChannelPlan = dict[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]

MASK_FORMAT = "gsparsity-mask/1"
logger = logging.getLogger("gsparsity")


# ----------------------------------------------------------------- the mask itself


def plain_model(model: nn.Module) -> nn.Module:
    """The torchvision model inside DDP / DataParallel / torch.compile / any ``.module`` wrapper."""
    model = unwrap(model)
    while isinstance(getattr(model, "module", None), nn.Module):
        model = unwrap(model.module)
    return model


def compute_mask(
    model: nn.Module,
    threshold: float = 1e-6,
    scope: str = "conv12",
    round_to: int = 1,
    also_pruned: dict[str, torch.Tensor] | None = None,
) -> Mask:
    """True for every filter whose L2 norm is above ``threshold``, per prunable conv, in forward order.

    With ``round_to`` N > 1 every layer keeps a multiple of N filters (all of them when
    it has fewer than N): convolution kernels run faster at such widths. The filters
    added to reach the multiple are the highest-norm ones under the threshold.
    ``also_pruned`` (conv name -> bool per filter) prunes more filters whatever their
    norm: the budget search uses it for the filters ProxSGD is driving to zero.

    A tied pair (ResNeXt, ``structure``) is decided a unit at a time: one conv group's
    filters in both convs, by the L2 norm of them all; ``round_to`` then counts units.
    """
    if not threshold > 0:
        raise UserError(f"the mask threshold must be positive, got {threshold}")
    if type(round_to) is not int or round_to < 1:
        raise UserError(f"round_to must be an integer >= 1, got {round_to!r}")
    mask: Mask = {}
    for members in pruning_groups(plain_model(model), scope):
        prunable = members[0]
        norms = unit_norms(members)
        kept = norms > threshold
        extras = [also_pruned[member.name].cpu().view(-1, prunable.unit).all(dim=1)
                  for member in members if also_pruned is not None and member.name in also_pruned]
        if extras:  # a unit of a tied pair goes when every row given for it says so
            extra = torch.stack(extras).all(dim=0)
            kept &= ~extra
            norms = norms.masked_fill(extra, 0.0)  # rounding treats them as zero
        mask.update(member_rows(members, kept, norms, round_to))
    return {prunable.name: mask[prunable.name] for prunable in prunable_convs(plain_model(model), scope)}


def member_rows(members: list[PrunableConv], kept_units: torch.Tensor, norms: torch.Tensor,
                round_to: int) -> Mask:
    """Every member's mask row from one keep/prune decision per unit (a filter, or a conv
    group of a tied pair), the kept count rounded up to a multiple of ``round_to`` units."""
    row = _round_kept_count(kept_units, norms, round_to).repeat_interleave(members[0].unit)
    return {member.name: row.clone() for member in members}


def unit_norms(members: list[PrunableConv]) -> torch.Tensor:
    """L2 norm of every pruning unit (a filter, or a conv group of a tied pair) over ``members``' weights."""
    unit = members[0].unit
    squares = sum(member.conv.weight.detach().float().flatten(1).square().sum(dim=1) for member in members)
    return squares.view(-1, unit).sum(dim=1).sqrt().cpu()


def _round_kept_count(mask_row: torch.Tensor, filter_norms: torch.Tensor, round_to: int) -> torch.Tensor:
    """``mask_row`` plus the highest-norm pruned filters needed for a multiple of ``round_to`` kept.

    A layer that keeps nothing stays so (0 is a multiple): its block's branch is dropped
    (``dropped_blocks``), which is cheaper than any width rounding would give it, and what
    the original's compressed model does with such a layer.
    """
    if round_to == 1:
        return mask_row
    kept = int(mask_row.sum())
    wanted = min(mask_row.numel(), math.ceil(kept / round_to) * round_to)
    if wanted <= kept:
        return mask_row
    candidate_norms = filter_norms.masked_fill(mask_row, -math.inf)
    # Stable sort: equal norms (e.g. exact zeros) are taken in index order, reproducibly.
    order = torch.sort(candidate_norms, descending=True, stable=True).indices
    rounded = mask_row.clone()
    rounded[order[: wanted - kept]] = True
    return rounded


def kept_indices(mask_row: torch.Tensor) -> torch.Tensor:
    """Indices of the channels the compressed model keeps (none: the block's branch is dropped)."""
    return torch.nonzero(mask_row).flatten()


def pruned_indices(mask_row: torch.Tensor) -> torch.Tensor:
    """Indices of the channels the compressed model drops: all but ``kept_indices``."""
    return torch.nonzero(~mask_row).flatten()


def dropped_blocks(model: nn.Module, mask: Mask, scope: str) -> set[str]:
    """Names of the residual blocks whose branch has a prunable conv keeping no filter:
    the compressed model drops their whole branch (module docstring)."""
    return {prunable.block_name for prunable in prunable_convs(plain_model(model), scope)
            if not bool(mask[prunable.name].any())}


def reference_model(arch: str, num_classes: int = 1000) -> nn.Module:
    """The plain torchvision model ``arch`` on the meta device: structure only, no memory, fast."""
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError as error:
        raise UserError(f"unknown architecture {arch!r}: {error}") from None


def check_mask(mask: Mask, model_or_arch: nn.Module | str, scope: str) -> None:
    """Raise UserError naming the first way ``mask`` does not fit the model's prunable convs."""
    check_scope(scope)
    if isinstance(model_or_arch, str):
        model, described = reference_model(model_or_arch), model_or_arch
    else:
        model, described = plain_model(model_or_arch), "the model"
    prunables = prunable_convs(model, scope)
    expected = {prunable.name: prunable.conv.out_channels for prunable in prunables}
    missing = [name for name in expected if name not in mask]
    if missing:
        raise UserError(f"the mask has no layer {missing[0]} (scope {scope} of {described})")
    extra = [name for name in mask if name not in expected]
    if extra:
        raise UserError(
            f"the mask has layer {extra[0]}, which is not prunable in scope {scope} of {described}"
        )
    for name, filters in expected.items():
        row = mask[name]
        if not isinstance(row, torch.Tensor) or row.dtype != torch.bool or row.dim() != 1:
            raise UserError(f"the mask of layer {name} must be a 1-D bool tensor")
        if row.numel() != filters:
            raise UserError(f"the mask of layer {name} has {row.numel()} filters, {described} has {filters}")
    tied = [prunable for prunable in prunables if prunable.tied_with is not None]
    for prunable in tied:
        units = mask[prunable.name].view(-1, prunable.unit)
        if not torch.equal(units.all(dim=1), units.any(dim=1)):
            raise UserError(f"the mask of layer {prunable.name} splits a conv group: it must keep or prune "
                            f"its filters {prunable.unit} at a time")
    for prunable in tied:
        if not torch.equal(mask[prunable.name], mask[prunable.tied_with]):
            raise UserError(f"the masks of layers {prunable.name} and {prunable.tied_with} must be equal: "
                            f"a group of the grouped conv goes with its input channels")


# ---------------------------------------------------------- mask records and files


def mask_to_record(mask: Mask, arch: str, scope: str, threshold: float) -> dict:
    """The mask as plain JSON-able data: indices of kept filters per layer, with arch/scope/threshold.

    This is what ``save_mask`` writes, and what checkpoints carry (it loads with
    ``torch.load(..., weights_only=True)``).
    """
    return {
        "format": MASK_FORMAT,
        "arch": arch,
        "scope": check_scope(scope),
        "threshold": float(threshold),
        "layers": {
            name: {"filters": row.numel(), "kept": torch.nonzero(row).flatten().tolist()}
            for name, row in mask.items()
        },
    }


def mask_from_record(
    record: object, arch: str | None = None, scope: str | None = None, source: str = "the mask record"
) -> Mask:
    """The mask of a ``mask_to_record`` record, checked against the architecture it names.

    ``arch`` / ``scope``, when given, must be the ones the record was made for;
    ``source`` names the record in error messages (e.g. the file it came from).
    """
    if not isinstance(record, dict) or record.get("format") != MASK_FORMAT:
        raise UserError(f"{source}: not a mask (expected format {MASK_FORMAT!r})")
    for key, asked in (("arch", arch), ("scope", scope)):
        if asked is not None and record.get(key) != asked:
            raise UserError(f"{source}: the mask is for {key} {record.get(key)}, not {asked}")
    if record.get("scope") not in SCOPES or not isinstance(record.get("arch"), str):
        raise UserError(f"{source}: the mask names no valid arch and scope")
    mask = _parse_layers(record.get("layers"), source)
    try:
        check_mask(mask, record["arch"], record["scope"])
    except UserError as error:
        raise UserError(f"{source}: {error}") from None
    return mask


def _parse_layers(layers: object, source: str) -> Mask:
    """The ``layers`` object of a mask record as bool rows, refusing anything malformed."""
    if not isinstance(layers, dict):
        raise UserError(f"{source}: the mask has no 'layers' object")
    return {name: _parse_layer(name, layer, source) for name, layer in layers.items()}


def _parse_layer(name: str, layer: object, source: str) -> torch.Tensor:
    """One layer's ``{"filters": N, "kept": [indices]}`` as a bool row of N."""
    filters = layer.get("filters") if isinstance(layer, dict) else None
    kept = layer.get("kept") if isinstance(layer, dict) else None
    if type(filters) is not int or not isinstance(kept, list):
        raise UserError(f"{source}: layer {name} needs an integer 'filters' and a list 'kept'")
    if filters < 1:  # a conv has at least one filter; torch.zeros would fail on a negative count
        raise UserError(f"{source}: layer {name} has 'filters' {filters}; it must be at least 1")
    if not all(type(index) is int for index in kept):  # type(): True is no index
        raise UserError(f"{source}: layer {name} keeps a filter index that is not an integer")
    if not all(0 <= index < filters for index in kept):
        raise UserError(f"{source}: layer {name} keeps a filter index outside 0..{filters - 1}")
    repeated = _first_repeat(kept)  # mask_to_record lists each kept index once
    if repeated is not None:
        raise UserError(f"{source}: layer {name} lists kept filter index {repeated} more than once")
    row = torch.zeros(filters, dtype=torch.bool)
    row[kept] = True
    return row


def _first_repeat(indices: list[int]) -> int | None:
    seen: set[int] = set()
    for index in indices:
        if index in seen:
            return index
        seen.add(index)
    return None


def save_mask(mask: Mask, path: str | os.PathLike, arch: str, scope: str, threshold: float) -> None:
    """Write the mask as readable JSON (``mask_to_record``), atomically."""
    record = mask_to_record(mask, arch, scope, threshold)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")


def load_mask(
    path: str | os.PathLike, arch: str | None = None, scope: str | None = None
) -> tuple[Mask, dict]:
    """(mask, {"arch", "scope", "threshold"}) from a ``save_mask`` file, checked against its architecture.

    ``arch`` / ``scope``, when given, must be the ones the file was written for.
    """
    record = _read_json(Path(path))
    mask = mask_from_record(record, arch, scope, source=str(path))
    return mask, {key: record.get(key) for key in ("arch", "scope", "threshold")}


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise UserError(f"mask file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a JSON mask file ({error})") from None


# ------------------------------------------------------------ weight transfer


def channel_plan(model: nn.Module, mask: Mask, scope: str = "conv12") -> ChannelPlan:
    """{module name: (kept output channels or None, kept input channels or None)} for ``model``.

    Each prunable conv keeps ``kept_indices`` of its output channels, and so do its
    BatchNorm and the input channels of its consumer conv. Modules absent from the
    plan keep every channel, except the branches of ``dropped_blocks``, which go
    altogether (and are absent too).
    """
    plan: dict[str, list] = {}
    big = plain_model(model)
    dropped = dropped_blocks(big, mask, scope)
    for prunable in prunable_convs(big, scope):
        if prunable.block_name in dropped:
            continue
        kept = kept_indices(mask[prunable.name])
        plan.setdefault(prunable.name, [None, None])[0] = kept
        plan.setdefault(prunable.bn_name, [None, None])[0] = kept
        # A grouped consumer's weight holds each group's inputs, which do not change:
        # it loses whole groups, by its own outputs.
        if prunable.consumer != RESIDUAL and big.get_submodule(prunable.consumer).groups == 1:
            plan.setdefault(prunable.consumer, [None, None])[1] = kept
    return {name: (outputs, inputs) for name, (outputs, inputs) in plan.items()}


def _sliced(tensor: torch.Tensor, outputs: torch.Tensor | None, inputs: torch.Tensor | None) -> torch.Tensor:
    """Dim 0 is the output channel of a weight/bias/BN statistic, dim 1 the input channel of a weight."""
    if outputs is not None and tensor.dim() >= 1:
        tensor = tensor.index_select(0, outputs.to(tensor.device))
    if inputs is not None and tensor.dim() >= 2:
        tensor = tensor.index_select(1, inputs.to(tensor.device))
    return tensor


def transfer_model_parameters(
    big_model: nn.Module, small_model: nn.Module, mask: Mask, scope: str = "conv12"
) -> None:
    """Copy the surviving weights of ``big_model`` into ``small_model`` in place, then fold constants.

    Prunable convs, their BNs and their consumers are sliced by ``channel_plan``;
    every other parameter and buffer (stem, downsample, fc...) is copied unchanged,
    except those of dropped branches, which have no place in the small model;
    ``residual_bias`` buffers of the small model are reset, then receive the folded
    constants (see the module docstring).
    """
    big, small = plain_model(big_model), plain_model(small_model)
    check_mask(mask, big, scope)
    plan = channel_plan(big, mask, scope)
    dropped = dropped_blocks(big, mask, scope)
    big_state, small_state = big.state_dict(), small.state_dict()
    extra = [key for key in big_state if key not in small_state and not _in_dropped_branch(key, dropped)]
    if extra:
        raise UserError(f"the compressed model has no {extra[0]}: was it built for another architecture "
                        f"or from another mask?")
    with torch.no_grad():
        for key, target in small_state.items():
            if key not in big_state:
                if not key.endswith("residual_bias"):
                    raise UserError(f"the full model has no {key}: was it built for another architecture?")
                target.zero_()
                continue
            module_name = key.rpartition(".")[0]
            source = _sliced(big_state[key], *plan.get(module_name, (None, None)))
            if source.shape != target.shape:
                raise UserError(
                    f"{key}: the mask gives shape {tuple(source.shape)}, the compressed model has "
                    f"{tuple(target.shape)}: was it built from another mask?"
                )
            target.copy_(source)
        _fold_pruned_constants(big, small, mask, scope, plan, dropped)
        _fold_dropped_branches(big, small, mask, dropped)


def _in_dropped_branch(key: str, dropped: set[str]) -> bool:
    """Whether a state_dict key belongs to the branch of a dropped block (its shortcut stays)."""
    return any(key.startswith(f"{block}.") and not key.startswith(f"{block}.downsample.") for block in dropped)


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel factor of an eval-mode BatchNorm."""
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def _bn_output_at_zero(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What an eval-mode BatchNorm emits for an input of 0, per channel."""
    return bn.bias - bn.running_mean * _bn_scale(bn)


def _conv_output_of_constant(conv: nn.Conv2d, value: torch.Tensor) -> torch.Tensor:
    """What ``conv`` emits, per output channel, for an input holding ``value[c]`` on every
    pixel of channel c: away from the border, every tap sees the value."""
    tap_sums = conv.weight.sum(dim=(2, 3))  # (out, inputs per group)
    # Output channel o reads the inputs of its own group only.
    inputs = value.view(conv.groups, -1).repeat_interleave(conv.out_channels // conv.groups, dim=0)
    output = (tap_sums * inputs).sum(dim=1)
    return output if conv.bias is None else output + conv.bias


def dropped_branch_output(block: nn.Module, block_name: str, mask: Mask) -> torch.Tensor:
    """The constant, per channel, that the eval-mode branch of a dropped block adds to its
    residual (module docstring; exact away from the border).

    The last conv of the branch that keeps no filter outputs 0 whatever its input, so its
    BatchNorm emits a constant; each later conv and BatchNorm of the branch (a ReLU
    between them) maps constants to constants.
    """
    chain = branch_chain(block)
    emptied = [position for position, (conv_name, _) in enumerate(chain)
               if f"{block_name}.{conv_name}" in mask and not bool(mask[f"{block_name}.{conv_name}"].any())]
    value = _bn_output_at_zero(getattr(block, chain[emptied[-1]][1]))
    for conv_name, bn_name in chain[emptied[-1] + 1:]:
        bn = getattr(block, bn_name)
        value = _conv_output_of_constant(getattr(block, conv_name), value.clamp(min=0))  # ReLU before the conv
        value = value * _bn_scale(bn) + _bn_output_at_zero(bn)
    return value


def _fold_dropped_branches(big: nn.Module, small: nn.Module, mask: Mask, dropped: set[str]) -> None:
    """Each dropped branch's constant becomes its ShortcutOnlyBlock's ``residual_bias``."""
    for block_name in dropped:
        residual_bias = small.get_submodule(block_name).residual_bias
        residual_bias.copy_(dropped_branch_output(big.get_submodule(block_name), block_name, mask))


def _fold_pruned_constants(
    big: nn.Module, small: nn.Module, mask: Mask, scope: str, plan: ChannelPlan, dropped: set[str]
) -> None:
    """Move the eval-mode constants of pruned channels into what consumes them (module docstring);
    the ``dropped`` blocks' branches are left to ``_fold_dropped_branches``."""
    bn_name_of = {prunable.name: prunable.bn_name for prunable in prunable_convs(big, "all_conv")}
    for prunable in prunable_convs(big, scope):
        if prunable.block_name in dropped:
            continue
        pruned = pruned_indices(mask[prunable.name]).to(prunable.bn.weight.device)
        if pruned.numel() == 0 or prunable.consumer == prunable.tied_with:
            # Nothing pruned, or only feeding the grouped conv's groups that are pruned too.
            continue
        constants = _bn_output_at_zero(prunable.bn)[pruned]
        if prunable.consumer == RESIDUAL:
            _fold_into_residual(small, prunable, pruned, constants)
        else:
            consumer_bn_name = bn_name_of[prunable.consumer]
            _fold_into_consumer_bn(big, small, prunable, pruned, constants, consumer_bn_name, plan)


def _fold_into_residual(
    small: nn.Module, prunable: PrunableConv, pruned: torch.Tensor, constants: torch.Tensor
) -> None:
    residual_bias = small.get_submodule(prunable.block_name).residual_bias
    residual_bias[pruned.to(residual_bias.device)] += constants.to(residual_bias)


def _fold_into_consumer_bn(
    big: nn.Module,
    small: nn.Module,
    prunable: PrunableConv,
    pruned: torch.Tensor,
    constants: torch.Tensor,
    consumer_bn_name: str,
    plan: ChannelPlan,
) -> None:
    activations = constants.clamp(min=0)  # the block's ReLU sits between the BN and its consumer
    consumer_weight = big.get_submodule(prunable.consumer).weight
    tap_sums = consumer_weight.index_select(1, pruned).sum(dim=(2, 3))  # (out, pruned), exact for 1x1
    missing_input = tap_sums @ activations
    kept_outputs = plan.get(prunable.consumer, (None, None))[0]
    running_mean = small.get_submodule(consumer_bn_name).running_mean
    running_mean -= _sliced(missing_input, kept_outputs, None).to(running_mean)


# ------------------------------------------------------------------ compression


def compress_model(
    model: nn.Module,
    mask: Mask,
    scope: str = "conv12",
    check_input: torch.Tensor | None = None,
    arch: str | None = None,
) -> nn.Module:
    """The small dense model that keeps the mask's filters, with the surviving weights.

    ``arch`` is the torchvision name of ``model`` (found by comparing with the
    supported ResNets when omitted). The result lives on the model's device, in its
    train/eval mode. With ``check_input``, both models run it in eval mode and the
    largest output deviation is logged and stored as ``output_deviation``.
    """
    from .pruned_resnet import build_pruned_resnet  # imported here: pruned_resnet imports this module

    big = plain_model(model)
    arch = arch or infer_arch(big)
    reference_parameter = next(big.parameters())
    small = build_pruned_resnet(arch, mask, scope, num_classes=big.fc.out_features)
    small = small.to(device=reference_parameter.device, dtype=reference_parameter.dtype)
    transfer_model_parameters(big, small, mask, scope)
    small.train(big.training)
    if check_input is not None:
        small.output_deviation = output_deviation(big, small, check_input)
        logger.info(
            "compressed model output deviation on the check input: max abs %.3g, relative %.3g",
            small.output_deviation["max_abs"],
            small.output_deviation["relative"],
        )
    return small


def output_deviation(full_model: nn.Module, small_model: nn.Module, batch: torch.Tensor) -> dict[str, float]:
    """Largest |full - small| eval-mode output difference, absolute and relative to max |full|,
    computed in full fp32 precision."""
    with torch.no_grad(), evaluation_mode(full_model), evaluation_mode(small_model), full_fp32_convolutions():
        full_output = full_model(batch.to(next(full_model.parameters()).device))
        small_output = small_model(batch.to(next(small_model.parameters()).device)).to(full_output.device)
    max_abs = (full_output - small_output).abs().max().item()
    scale = full_output.abs().max().item()
    return {"max_abs": max_abs, "relative": max_abs / scale if scale > 0 else max_abs}


@contextlib.contextmanager
def full_fp32_convolutions() -> Iterator[None]:
    """cuDNN convolutions in full fp32 precision, then the setting as it was. From Ampere on
    they default to TF32, whose rounding (about 1e-3 relative) would swamp the deviation
    that compression itself causes (1e-5 or less where it is exact)."""
    try:  # torch >= 2.9; mixing in the old flag is an error there
        owner, name, full = torch.backends.cudnn.conv, "fp32_precision", "ieee"
        previous = getattr(owner, name)
    except (AttributeError, RuntimeError):
        owner, name, full = torch.backends.cudnn, "allow_tf32", False
        previous = getattr(owner, name)
    setattr(owner, name, full)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def infer_arch(model: nn.Module) -> str:
    """The supported torchvision ResNet whose weights have the shapes of ``model``'s (classifier aside)."""
    from .pruned_resnet import ARCHS  # imported here: pruned_resnet imports this module

    shapes = _weight_shapes(plain_model(model))
    for arch in ARCHS:
        if _reference_weight_shapes(arch) == shapes:
            return arch
    raise UserError("cannot tell which torchvision ResNet this model is: pass arch=... explicitly")


def _weight_shapes(model: nn.Module) -> tuple:
    return tuple(
        (key, tuple(tensor.shape)) for key, tensor in model.state_dict().items() if not key.startswith("fc.")
    )


@functools.lru_cache(maxsize=None)
def _reference_weight_shapes(arch: str) -> tuple:
    return _weight_shapes(reference_model(arch))

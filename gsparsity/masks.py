"""Which filters survive: computing a mask, checking it, and its records and files.

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

The channel plan a mask implies is ``pruned_resnet.channel_plan``; copying the surviving
weights into the small model, and its file, are ``compression``'s.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from .checkpoint import atomic_write_text
from .errors import UserError
from .structure import SCOPES, PrunableConv, check_scope, prunable_convs, pruning_groups, unwrap

Mask = dict[str, torch.Tensor]

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

"""MACs of the compressed model that a mask gives, counted without building it.

The budget search bisects over masks (``budget.budget_mask``), some fifteen per epoch
end and more per probe: building each compressed ResNet-50 and running ptflops on it
took about 0.3 s, this arithmetic well under a millisecond. It counts exactly what
ptflops' module hooks count (``complexity``; tests/test_complexity.py compares the two
on built models), block by block: the full model's count (ptflops, once per
architecture and image size), plus for every residual block what its branch costs at
the mask's widths minus what it costs at full width. Stem, shortcuts, pooling and fc
never change.

A branch costs its convs and BatchNorms and the block's ReLU calls: one after every
BatchNorm of the branch but the last, and one on the block's output. A dropped branch
(``masks.dropped_blocks``) costs only that last ReLU, all that ``ShortcutOnlyBlock``
runs besides its (unchanged) shortcut.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .complexity import count_macs
from .masks import Mask, reference_model
from .structure import branch_chain, check_scope, residual_blocks


@dataclass(frozen=True)
class BranchConv:
    """What the count needs of one conv of a block's branch (and its BatchNorm) at full width."""

    name: str  # e.g. "layer1.0.conv1"
    in_channels: int
    out_channels: int
    kernel_area: int
    groups: int
    has_bias: bool
    bn_macs_per_element: int  # ptflops: 2 for an affine BatchNorm, else 1
    pixels: int  # output height x width, per image


def mask_macs(arch: str, mask: Mask, scope: str, num_classes: int, image_size: int = 224) -> int:
    """MACs per image of the model ``build_pruned_resnet(arch, mask, scope, num_classes)``,
    on the paper's scale (as ``complexity.count_macs`` counts it)."""
    check_scope(scope)
    full_macs, blocks = _reference_costs(arch, num_classes, image_size)
    total = full_macs
    for convs in blocks:
        prunable = convs if scope == "all_conv" else convs[:-1]
        widths = [int(mask[conv.name].sum()) for conv in prunable] + [conv.out_channels for conv in convs[len(prunable):]]
        dropped = any(width == 0 for width in widths)
        total += _branch_macs(convs, widths, dropped)
        total -= _branch_macs(convs, [conv.out_channels for conv in convs], False)
    return total


def _branch_macs(convs: tuple[BranchConv, ...], widths: list[int], dropped: bool) -> int:
    """What ptflops counts for a block's branch with ``widths`` filters per conv, and for
    the block's ReLU calls."""
    last = convs[-1]
    output_relu = last.out_channels * last.pixels  # the block's output keeps its full width
    if dropped:
        return output_relu
    total, in_channels = output_relu, convs[0].in_channels
    for position, (conv, width) in enumerate(zip(convs, widths)):
        total += _conv_macs(conv, in_channels, width) + conv.bn_macs_per_element * width * conv.pixels
        if position < len(convs) - 1:
            total += width * conv.pixels  # the ReLU after this BatchNorm
        in_channels = width
    return total


def _conv_macs(conv: BranchConv, in_channels: int, out_channels: int) -> int:
    """ptflops' count for ``conv`` narrowed to ``in_channels`` -> ``out_channels``."""
    # A grouped conv loses whole groups (pruned_resnet): every output still reads one full group.
    inputs_per_output = conv.in_channels // conv.groups if conv.groups > 1 else in_channels
    bias = out_channels if conv.has_bias else 0
    return conv.pixels * (conv.kernel_area * inputs_per_output * out_channels + bias)


@functools.lru_cache(maxsize=None)
def _reference_costs(arch: str, num_classes: int, image_size: int) -> tuple[int, tuple[tuple[BranchConv, ...], ...]]:
    """(ptflops' count of the full model, every block's branch convs), from the model on the meta device."""
    model = reference_model(arch, num_classes)
    pixels = _output_pixels(model, image_size)
    blocks = tuple(tuple(_branch_conv(block, block_name, conv_name, bn_name, pixels)
                         for conv_name, bn_name in branch_chain(block))
                   for block_name, block in residual_blocks(model))
    return count_macs(model, image_size), blocks


def _branch_conv(block: nn.Module, block_name: str, conv_name: str, bn_name: str,
                 pixels: dict[nn.Module, int]) -> BranchConv:
    conv, bn = getattr(block, conv_name), getattr(block, bn_name)
    return BranchConv(name=f"{block_name}.{conv_name}", in_channels=conv.in_channels, out_channels=conv.out_channels,
                      kernel_area=conv.kernel_size[0] * conv.kernel_size[1], groups=conv.groups,
                      has_bias=conv.bias is not None, bn_macs_per_element=2 if bn.affine else 1,
                      pixels=pixels[conv])


def _output_pixels(model: nn.Module, image_size: int) -> dict[nn.Module, int]:
    """Output height x width of every conv of ``model`` (on the meta device: shapes only)."""
    pixels: dict[nn.Module, int] = {}

    def record(conv: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        pixels[conv] = output.shape[-2] * output.shape[-1]

    handles = [module.register_forward_hook(record) for module in model.modules() if isinstance(module, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return pixels

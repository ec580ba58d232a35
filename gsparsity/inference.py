"""The inference form of a model: BatchNorm folded into the convolutions, eval mode.

In eval mode a BatchNorm is a per-channel affine map, ``y = scale * x + shift`` with
``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``.
When it directly follows a conv it folds into that conv: ``W' = scale * W`` (one scale
per output channel) and ``b' = scale * b + shift``. The BatchNorm becomes an
``nn.Identity``, which saves one pass over every activation and changes the outputs
only by float rounding.

Which conv feeds which BatchNorm is read from the module tree, as
``structure.branch_chain`` does: a BatchNorm registered right after a Conv2d in the
same parent module, with as many channels as the conv has filters. That is how the
stem, the blocks' branches and the downsample shortcuts of torchvision's ResNets and
of ``pruned_resnet.PrunedResidualBlock`` and ``ShortcutOnlyBlock`` (a shortcut only)
are laid out. A BatchNorm that uses batch
statistics in eval mode (``track_running_stats=False``) cannot be folded and is left.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .masks import plain_model


def fuse_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every foldable BatchNorm folded into its conv.

    The copy computes what ``model.eval()`` computes; ``model`` itself is not touched.
    DDP / DataParallel / torch.compile wrappers are stripped.
    """
    fused = copy.deepcopy(plain_model(model)).eval()
    for parent in list(fused.modules()):
        for conv_name, bn_name in _conv_bn_pairs(parent):
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            setattr(parent, conv_name, _folded_conv(conv, bn))
            setattr(parent, bn_name, nn.Identity())
    return fused.eval()  # the new modules too


def inference_form(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """``fuse_bn(model)`` without gradients, in channels_last memory format if asked.

    channels_last is usually the faster layout for convolutions (oneDNN on CPU, Tensor
    Cores on GPU); feed it inputs in the same format (``bench/latency.py`` measures both).
    """
    fused = fuse_bn(model).requires_grad_(False)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    return fused


def _conv_bn_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) of the children of ``parent`` where the BN folds into the conv."""
    pairs = []
    children = list(parent.named_children())
    for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and _foldable(conv, bn):
            pairs.append((conv_name, bn_name))
    return pairs


def _foldable(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    has_statistics = bn.running_mean is not None and bn.running_var is not None
    return has_statistics and bn.num_features == conv.out_channels


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with a bias computing ``bn(conv(x))`` of the eval-mode BatchNorm."""
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        # float64 so that folding adds no rounding of its own beyond the final cast.
        variance = bn.running_var.double()
        scale = torch.rsqrt(variance + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        conv_bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        folded.weight.copy_(weight.to(conv.weight.dtype))
        folded.bias.copy_((conv_bias * scale + shift).to(conv.weight.dtype))
    folded.train(False)
    return folded

"""The small dense ResNet that a mask describes, built from the mask alone.

``build_pruned_resnet`` starts from torchvision's model (so module names and
state_dict keys are torchvision's) and swaps every conv/BatchNorm whose width the
mask changes for a narrower one: a prunable conv keeps ``len(kept_indices(row))``
filters, its BN as many channels, and its consumer conv as many input channels
(``channel_plan``, which ``compression.transfer_model_parameters`` slices weights by too).

Scope ``conv12`` leaves the last conv of each block at full width, so the blocks stay
torchvision's own classes. Scope ``all_conv`` narrows the last conv too, while the
residual path (identity or downsample) keeps its full width: each block becomes a
``PrunedResidualBlock`` that adds its narrow branch into the full-width residual at
the kept channel positions. In either scope, a block whose branch has a conv keeping
no filter (``masks.dropped_blocks``) becomes a ``ShortcutOnlyBlock``: its branch is
gone, as in the original's compressed models.

The model is laid out on the meta device first and materialised once, so no time
is spent initialising layers that are then replaced.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .errors import UserError
from .masks import Mask, check_mask, dropped_blocks, kept_indices, plain_model, reference_model
from .structure import RESIDUAL, branch_chain, check_scope, prunable_convs, residual_blocks

# Every torchvision ResNet: BasicBlock/Bottleneck, and ResNeXt's grouped Bottleneck.
ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
)

# {module name: (kept output channels or None, kept input channels or None)}
ChannelPlan = dict[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]


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


class PrunedResidualBlock(nn.Module):
    """A torchvision residual block whose last conv keeps only some of its filters.

    Children keep torchvision's names (conv1, bn1, ..., relu, downsample), so the
    state_dict is torchvision's plus ``residual_bias``: a full-width constant added
    to the residual (zeros unless constants of pruned channels were folded into it).
    ``kept_out`` (positions of the kept filters in the full width) is rebuilt from
    the mask and therefore not saved.
    """

    is_residual_block = True  # so that structure.residual_blocks finds it

    def __init__(self, block: nn.Module, last_conv_mask_row: torch.Tensor) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        if "downsample" not in self._modules:
            self.downsample = None
        self.stride = getattr(block, "stride", 1)
        self.chain = tuple(branch_chain(block))
        device = next(block.parameters()).device
        self.register_buffer("kept_out", kept_indices(last_conv_mask_row).to(device), persistent=False)
        self.register_buffer("residual_bias", torch.zeros(last_conv_mask_row.numel(), device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = x
        for position, (conv_name, bn_name) in enumerate(self.chain):
            branch = getattr(self, bn_name)(getattr(self, conv_name)(branch))
            if position < len(self.chain) - 1:
                branch = self.relu(branch)
        identity = x if self.downsample is None else self.downsample(x)
        out = add_at_channels(identity, self.kept_out, branch.to(identity.dtype))
        out.add_(self.residual_bias.to(out.dtype).view(1, -1, 1, 1))
        return self.relu(out)

    def extra_repr(self) -> str:
        return f"kept_out={self.kept_out.numel()} of {self.residual_bias.numel()} channels"


class ShortcutOnlyBlock(nn.Module):
    """A torchvision residual block whose branch was pruned away: a conv of it kept no filter.

    It computes ``relu(shortcut(x) + residual_bias)``, where the shortcut is the block's
    ``downsample`` (None: the identity) and ``residual_bias`` is what the branch still
    added in eval mode (``compression.dropped_branch_output``; zeros until folded). The
    original's compressed block computes ``relu(identity)`` there. Children keep
    torchvision's names, so the state_dict is the block's downsample plus ``residual_bias``.
    """

    is_residual_block = True  # so that structure.residual_blocks finds it (with an empty branch)

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.downsample = getattr(block, "downsample", None)
        self.relu = block.relu
        last_conv = getattr(block, branch_chain(block)[-1][0])
        device = last_conv.weight.device
        self.register_buffer("residual_bias", torch.zeros(last_conv.out_channels, device=device))

    def reset_parameters(self) -> None:
        """Zeros: built on the meta device, the buffer gets its values when the model is initialised."""
        nn.init.zeros_(self.residual_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(identity + self.residual_bias.to(identity.dtype).view(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return f"branch pruned away, {self.residual_bias.numel()} channels"


def add_at_channels(identity: torch.Tensor, channels: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``identity`` plus ``branch`` added at positions ``channels`` of dim 1, in the layout
    of ``identity``; the gradient for ``branch`` comes back in the layout of ``branch``.

    torch's own ``index_add`` returns a contiguous result whatever its inputs' layout,
    and so does ``index_select``, its gradient for ``branch``: in channels_last, every
    conv after the block then converted its input back, and the branch's last BatchNorm
    ran its backward on mixed layouts (BENCHMARKS.md, ``bench/residual_add.py``).
    """
    needs_grad = torch.is_grad_enabled() and (identity.requires_grad or branch.requires_grad)
    # A trace would record the Python-defined Function as an op it cannot save.
    if needs_grad and not torch.jit.is_tracing():
        return _AddAtChannels.apply(identity, channels, branch)
    return _scatter_add(identity, channels, branch)


class _AddAtChannels(torch.autograd.Function):
    """:func:`add_at_channels` with a backward that keeps ``branch``'s layout."""

    @staticmethod
    def forward(ctx, identity: torch.Tensor, channels: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(channels)
        ctx.branch_shape, ctx.branch_format = branch.shape, _memory_format(branch)
        return _scatter_add(identity, channels, branch)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor | None]:
        (channels,) = ctx.saved_tensors
        if not ctx.needs_input_grad[2]:
            return grad, None, None
        if grad.requires_grad:  # a double backward: out= ops are not differentiable
            return grad, None, grad.index_select(1, channels).contiguous(memory_format=ctx.branch_format)
        grad_branch = torch.empty(ctx.branch_shape, dtype=grad.dtype, device=grad.device,
                                  memory_format=ctx.branch_format)
        torch.index_select(grad, 1, channels, out=grad_branch)
        return grad, None, grad_branch


def _scatter_add(identity: torch.Tensor, channels: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """The sum itself: a copy of ``identity`` in its own layout, ``branch`` added in place."""
    return identity.clone(memory_format=torch.preserve_format).index_add_(1, channels, branch)


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """channels_last where ``tensor`` is laid out so (and not also plainly contiguous)."""
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def build_pruned_resnet(arch: str, mask: Mask, scope: str, num_classes: int = 1000) -> nn.Module:
    """torchvision's ``arch`` keeping only the mask's channels, freshly initialised as torchvision does."""
    check_scope(scope)
    model = reference_model(arch, num_classes)
    _check_supported(model, arch)
    check_mask(mask, model, scope)
    with torch.device("meta"):
        _drop_branches(model, mask, scope)
        _narrow_layers(model, mask, scope)
    model.to_empty(device="cpu")
    _initialise_like_torchvision(model)
    if scope == "all_conv":
        _wrap_blocks(model, mask)
    return model


def scope_builders(scope: str) -> dict[str, Callable[..., nn.Module]]:
    """{arch: function(mask, num_classes=1000)} for every ARCHS entry, building with ``scope``.

    These are the functions of ``models_with_reduce_conv12.py`` and
    ``models_with_reduce_all_conv.py``.
    """
    check_scope(scope)

    def builder(arch: str) -> Callable[..., nn.Module]:
        def build(mask: Mask, num_classes: int = 1000) -> nn.Module:
            return build_pruned_resnet(arch, mask, scope, num_classes)

        build.__name__ = build.__qualname__ = arch
        build.__doc__ = f"torchvision's {arch} keeping only the filters of ``mask`` (scope {scope})."
        return build

    return {arch: builder(arch) for arch in ARCHS}


def _check_supported(model: nn.Module, arch: str) -> None:
    if next(residual_blocks(model), None) is None:
        raise UserError(f"{arch} is not a ResNet made of BasicBlock/Bottleneck blocks")


def _narrow_layers(model: nn.Module, mask: Mask, scope: str) -> None:
    """Swap every conv/BN that the channel plan narrows for one with the planned widths."""
    for name, (outputs, inputs) in channel_plan(model, mask, scope).items():
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Conv2d):
            out_channels = layer.out_channels if outputs is None else outputs.numel()
            in_channels = layer.in_channels if inputs is None else inputs.numel()
            groups = 1
            if layer.groups > 1:  # whole groups go: as many fewer inputs as outputs
                groups = out_channels // (layer.out_channels // layer.groups)
                in_channels = groups * (layer.in_channels // layer.groups)
            _replace_module(model, name, _resized_conv(layer, in_channels, out_channels, groups))
        elif isinstance(layer, nn.BatchNorm2d):
            _replace_module(model, name, _resized_bn(layer, outputs.numel()))
        else:
            raise UserError(f"{name}: cannot narrow a {type(layer).__name__}")


def _resized_conv(conv: nn.Conv2d, in_channels: int, out_channels: int, groups: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def _resized_bn(bn: nn.BatchNorm2d, channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(
        channels,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
    )


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def _initialise_like_torchvision(model: nn.Module) -> None:
    """torchvision's ResNet init: Kaiming-normal (fan_out) convs, default init of everything else."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:  # torchvision's ResNet convs have none
                nn.init.zeros_(module.bias)
        elif hasattr(module, "reset_parameters"):
            # BN: weight 1, bias 0, fresh running stats; Linear: default; ShortcutOnlyBlock: zero bias
            module.reset_parameters()


def _drop_branches(model: nn.Module, mask: Mask, scope: str) -> None:
    """Every block whose branch has a conv keeping no filter keeps its shortcut only."""
    for block_name in dropped_blocks(model, mask, scope):
        _replace_module(model, block_name, ShortcutOnlyBlock(model.get_submodule(block_name)))


def _wrap_blocks(model: nn.Module, mask: Mask) -> None:
    """all_conv: every block but the dropped ones adds its (narrow) branch into the full-width residual."""
    for block_name, block in list(residual_blocks(model)):
        if isinstance(block, ShortcutOnlyBlock):
            continue
        last_conv_name = branch_chain(block)[-1][0]
        row = mask[f"{block_name}.{last_conv_name}"]
        _replace_module(model, block_name, PrunedResidualBlock(block, row))

"""Where the prunable convolutions of a ResNet are, found by walking its modules.

A residual block's main branch is a chain ``conv -> bn -> (relu) -> conv -> bn ...``;
the last conv of the chain feeds the residual add. Pruning filter ``f`` of a conv
couples three things (Torch-Pruning's "group"): output channel ``f`` of the conv,
channel ``f`` of its BatchNorm, and input channel ``f`` of whatever consumes it
(the next conv of the chain, or the residual add for the last conv).

A grouped conv (ResNeXt's conv2) is pruned a whole group at a time: its group g reads
only the channels of group g of the conv before it, so that conv and the grouped
conv form one *tied* pair, pruned in units of ``channels per group`` channels, unit g
of both at once. Removing unit g then removes one group of the grouped conv, and the
compressed model is a narrower grouped conv with fewer groups of the same width.

The interface the rest of the tool prunes through is ``prunable_convs(model, scope)`` and
``pruning_groups(model, scope)``: lists of ``PrunableConv`` records naming each conv, its
BatchNorm and its consumer. ProxSGD's groups, masks, the budget and the channel plan read only
those records, so another way of finding them (a traced graph of any CNN, say) can replace the
module walk below by returning the same records. Building the small model and transferring
its weights (``pruned_resnet``, ``compression``), counting its MACs by arithmetic
(``mask_macs``) and ``--rescale-filters`` (``filter_norms``) still walk ResNet blocks
themselves (``residual_blocks``, ``branch_chain``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

SCOPES = ("conv12", "all_conv")
RESIDUAL = "residual"  # the consumer of the last conv of a block's main branch


@dataclass(frozen=True)
class PrunableConv:
    """One prunable conv and the modules coupled to its output channels."""

    name: str  # module name in the plain model, e.g. "layer1.0.conv1"
    conv: nn.Conv2d
    bn_name: str
    bn: nn.BatchNorm2d
    consumer: str  # name of the conv fed by this one, or RESIDUAL
    stage: str  # top-level stage holding the block, e.g. "layer1"
    unit: int = 1  # channels pruned together: a group's width for a tied pair, else 1
    tied_with: str | None = None  # the other conv of a tied pair (module docstring)

    @property
    def block_name(self) -> str:
        """The residual block holding the conv, e.g. "layer1.0"."""
        return self.name.rpartition(".")[0]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel / DataParallel / torch.compile."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    return scope


def residual_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, block) for every residual block, in forward order."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, (Bottleneck, BasicBlock)) or getattr(module, "is_residual_block", False):
            yield name, module


def branch_chain(block: nn.Module) -> list[tuple[str, str]]:
    """The block's main branch as (conv_name, bn_name) pairs, in order.

    Each conv is paired with the BatchNorm registered right after it; the
    ``downsample`` shortcut is not part of the branch.
    """
    chain: list[tuple[str, str]] = []
    pending_conv: str | None = None
    for child_name, child in block.named_children():
        if isinstance(child, nn.Conv2d):
            pending_conv = child_name
        elif isinstance(child, nn.BatchNorm2d) and pending_conv is not None:
            chain.append((pending_conv, child_name))
            pending_conv = None
    return chain


def prunable_convs(model: nn.Module, scope: str = "conv12") -> list[PrunableConv]:
    """Every conv whose filters the scope allows to prune, in forward order.

    ``conv12``: every conv of a block's main branch except the last one (conv1/conv2
    of a Bottleneck, conv1 of a BasicBlock). ``all_conv``: the last one too.
    Stem, downsample and classifier are never prunable.
    """
    check_scope(scope)
    found: list[PrunableConv] = []
    for block_name, block in residual_blocks(model):
        chain = branch_chain(block)
        last = len(chain) if scope == "all_conv" else len(chain) - 1
        ties = _tied_pairs(block, chain, last, block_name)
        for position, (conv_name, bn_name) in enumerate(chain[:last]):
            consumer = chain[position + 1][0] if position + 1 < len(chain) else RESIDUAL
            unit, tied_with = ties.get(conv_name, (1, None))
            found.append(
                PrunableConv(
                    name=f"{block_name}.{conv_name}",
                    conv=getattr(block, conv_name),
                    bn_name=f"{block_name}.{bn_name}",
                    bn=getattr(block, bn_name),
                    consumer=consumer if consumer == RESIDUAL else f"{block_name}.{consumer}",
                    stage=block_name.split(".")[0],
                    unit=unit,
                    tied_with=None if tied_with is None else f"{block_name}.{tied_with}",
                )
            )
    return found


def pruning_groups(model: nn.Module, scope: str = "conv12") -> list[list[PrunableConv]]:
    """The prunable convs grouped by what is pruned together: one conv, or a tied pair."""
    prunables = prunable_convs(model, scope)
    by_name = {prunable.name: prunable for prunable in prunables}
    groups, seen = [], set()
    for prunable in prunables:
        if prunable.name in seen:
            continue  # the second conv of a tied pair
        members = [prunable] if prunable.tied_with is None else [prunable, by_name[prunable.tied_with]]
        seen.update(member.name for member in members)
        groups.append(members)
    return groups


def _tied_pairs(block: nn.Module, chain: list[tuple[str, str]], last: int,
                block_name: str) -> dict[str, tuple[int, str]]:
    """{conv name: (unit, the other conv)} for every grouped conv of the branch and its producer."""
    ties: dict[str, tuple[int, str]] = {}
    for position, (conv_name, _) in enumerate(chain):
        conv = getattr(block, conv_name)
        if conv.groups == 1:
            continue
        if not 0 < position < last or conv.in_channels != conv.out_channels:
            raise ValueError(f"{block_name}.{conv_name}: a grouped conv can only be pruned between two "
                             f"prunable convs, with as many inputs as outputs (as in ResNeXt)")
        producer = chain[position - 1][0]
        if producer in ties:
            raise ValueError(f"{block_name}.{conv_name}: two grouped convs in a row cannot be pruned")
        unit = conv.out_channels // conv.groups
        ties[producer] = (unit, conv_name)
        ties[conv_name] = (unit, producer)
    return ties

"""The search's optimizer: ProxSGD's settings, fixed once the flags are parsed, and the one
function that builds it, for the search and for the budget's probes alike."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from torch import nn

from proxsgd import ProxSGD, group_model_parameters

# --layer_adaptive when not given, as the original's scripts have it: its conv12 search doubles
# mu in layer2 and layer3, its all_conv search gives every stage the same mu.
LAYER_ADAPTIVE_BY_SCOPE = {"conv12": True, "all_conv": False}


@dataclass(frozen=True)
class ProxSettings:
    """How a search's ProxSGD prunes: ``mu`` is the group-lasso gain (``--mu``, spelt
    ``--weight_decay`` by the original), doubled in layer2 and layer3 with ``layer_adaptive``."""

    mu: float
    lr: float
    momentum: float
    adaptive_lr: bool
    normalization: str
    layer_adaptive: bool
    group: str
    scope: str

    @classmethod
    def from_args(cls, args: argparse.Namespace, scope: str) -> "ProxSettings":
        layer_adaptive = LAYER_ADAPTIVE_BY_SCOPE[scope] if args.layer_adaptive is None else args.layer_adaptive
        return cls(mu=args.mu, lr=args.lr, momentum=args.momentum, adaptive_lr=args.adaptive_lr,
                   normalization=args.normalization, layer_adaptive=layer_adaptive, group=args.group, scope=scope)

    def with_mu(self, mu: float) -> "ProxSettings":
        return dataclasses.replace(self, mu=mu)

    def describe(self) -> str:
        """The log's words for it, e.g. ``mu 0.05, 2x in layer2 and layer3``."""
        return f"mu {self.mu}" + (", 2x in layer2 and layer3" if self.layer_adaptive else "")


def search_optimizer(model: nn.Module, settings: ProxSettings) -> ProxSGD:
    """ProxSGD over ``model`` (plain or DDP-wrapped): one prunable group per conv of the scope."""
    groups = group_model_parameters(model, settings.mu, scope=settings.scope,
                                    layer_adaptive=settings.layer_adaptive, group=settings.group)
    return ProxSGD(groups, lr=settings.lr, momentum=settings.momentum, adaptive_lr=settings.adaptive_lr,
                   normalization=settings.normalization)

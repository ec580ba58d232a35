"""How sparse a model is: zero filters per stage and the share of parameters in them."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from .structure import prunable_convs, unwrap


@dataclass
class SparsityReport:
    zero_filters: dict[str, int]  # per stage, e.g. {"layer1": 12, ...}
    total_filters: dict[str, int]
    zero_parameters: int  # parameters inside pruned conv filters
    total_parameters: int

    @property
    def zero_share(self) -> float:
        total = sum(self.total_filters.values())
        return sum(self.zero_filters.values()) / max(total, 1)

    @property
    def zero_parameter_share(self) -> float:
        return self.zero_parameters / max(self.total_parameters, 1)

    def lines(self) -> list[str]:
        rows = [f"  {stage}: {self.zero_filters[stage]}/{self.total_filters[stage]} zero filters "
                f"({100 * self.zero_filters[stage] / max(self.total_filters[stage], 1):.1f}%)"
                for stage in self.total_filters]
        rows.append(f"  all: {sum(self.zero_filters.values())}/{sum(self.total_filters.values())} "
                    f"zero filters ({100 * self.zero_share:.1f}%), holding "
                    f"{100 * self.zero_parameter_share:.2f}% of the parameters")
        return rows


def sparsity_report(model: nn.Module, mask: dict[str, torch.Tensor], scope: str) -> SparsityReport:
    zero: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    zero_parameters = 0
    for layer in prunable_convs(model, scope):
        kept = mask[layer.name]
        pruned = int(kept.numel() - kept.sum())
        zero[layer.stage] += pruned
        total[layer.stage] += kept.numel()
        zero_parameters += pruned * layer.conv.weight[0].numel()
    total_parameters = sum(parameter.numel() for parameter in unwrap(model).parameters())
    return SparsityReport(dict(zero), dict(total), zero_parameters, total_parameters)

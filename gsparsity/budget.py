"""--target-macs: a search that lands its compressed model on a MACs budget.

Two stages, both logged:

1. **Choosing mu.** Before the search, short *probes* train copies of the starting
   model for ``--budget-steps`` steps each, with the search's own optimizer settings
   and a candidate mu, on the same batches. A probe predicts the compressed model
   from the filters ProxSGD is driving to zero (their proximal point was zero in at
   least half of the probe's second-half steps) that will be under the pruning
   threshold by the end of the search: such a filter keeps a factor (1 - lr) of its
   norm per step. The predicted MACs fall as mu grows, so a bisection on log(mu) finds
   the mu whose prediction is nearest the target.
2. **Meeting the budget.** A short probe cannot foresee the whole search (on the demo
   digits, mu chosen for 50% ended at 19% with lr 0.1 and at 66% with lr 0.05). So at
   every epoch end the mask is fitted to the budget (:func:`budget_mask`): it keeps the
   strongest filters that fit, zero or not. The log says how far the zero filters alone
   are from the target, and how many filters that took; pruning nonzero filters
   changes the model's output, which the search's check on a few images reports.

MACs are on the paper's scale (``complexity``): ``--target-macs 2.06`` means the paper's
2.06 GMac. The bisections count each mask's MACs by arithmetic (``mask_macs``), exactly
as ptflops would count the built model.
"""
from __future__ import annotations

import argparse
import logging
import math
import re
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader


from .data import start_epoch
from .distributed import DistContext, all_reduce_sum, broadcast_object
from .engine import LoopSettings, autocast, backward_and_step, make_scaler, to_device
from .errors import UserError
from .mask_macs import mask_macs
from .masks import Mask, compute_mask, member_rows, unit_norms
from .search_optimizer import ProxSettings, search_optimizer
from .structure import prunable_convs, pruning_groups

log = logging.getLogger("gsparsity")
MU_FACTOR = 4.0  # how far each bracketing probe moves mu while the target is not bracketed
FALLBACK_START_MU = 0.05  # where the bisection starts when --mu is 0


@dataclass(frozen=True)
class BudgetSettings:
    """What the budget search and the budget mask read of the flags, fixed once they are parsed."""

    target: str | None  # --target-macs as given: GMac ("2.05") or a share ("50%"); None: no budget
    arch: str
    pruning_threshold: float
    round_to: int
    ranking: str  # --budget-ranking: "layer" or "global"
    probe_steps: int  # --budget-steps
    max_probes: int  # --budget-probes
    tolerance: float  # --budget-tolerance, in percentage points of the full model's MACs
    seed: int | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BudgetSettings":
        return cls(target=args.target_macs, arch=args.arch, pruning_threshold=args.pruning_threshold,
                   round_to=args.round_to, ranking=args.budget_ranking, probe_steps=args.budget_steps,
                   max_probes=args.budget_probes, tolerance=args.budget_tolerance, seed=args.seed)


@dataclass
class Probe:
    mu: float
    macs: int  # of the predicted compressed model, per 224x224 image
    share: float  # macs / the full model's


def parse_target(text: str) -> tuple[float, bool]:
    """``"50%"`` -> (0.5, True): a share of the full model; ``"2.05"`` -> (2.05e9, False): GMac."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%|G|GMac)?\s*", text)
    if not match:
        raise UserError(f"--target-macs takes GMac (e.g. 2.05) or a share of the full model's MACs "
                        f"(e.g. 50%), got {text!r}")
    value, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        if not 0 < value < 100:
            raise UserError(f"--target-macs as a share must be between 0% and 100%, got {text!r}")
        return value / 100, True
    if not (value > 0 and math.isfinite(value)):
        raise UserError(f"--target-macs must be a positive number of GMac, got {text!r}")
    return value * 1e9, False


def target_macs(text: str, full_macs: int) -> int:
    value, is_share = parse_target(text)
    return round(value * full_macs) if is_share else round(value)


def smallest_macs(model: nn.Module, budget: BudgetSettings, scope: str, num_classes: int) -> int:
    """MACs of the model with every prunable filter pruned (every branch dropped, whatever the
    scope): no mu can go below this."""
    everything = {prunable.name: torch.ones(prunable.conv.out_channels, dtype=torch.bool)
                  for prunable in prunable_convs(model, scope)}
    mask = compute_mask(model, budget.pruning_threshold, scope, budget.round_to, also_pruned=everything)
    return mask_macs(budget.arch, mask, scope, num_classes)


def bisect_mu(probe: Callable[[float], Probe], target_share: float, start_mu: float,
              max_probes: int, tolerance: float) -> tuple[Probe, list[Probe]]:
    """The probe nearest ``target_share``, and every probe, in order.

    Moves mu by x4 until the target is bracketed (a probe above it, one below), then
    halves the bracket in log(mu). Stops after ``max_probes`` probes or as soon as a
    probe is within ``tolerance`` (a share of the full model's MACs) of the target.
    """
    probes: list[Probe] = []
    too_big: Probe | None = None  # the largest mu whose model still has too many MACs
    small_enough: Probe | None = None  # the smallest mu whose model is within budget
    mu = start_mu
    while True:
        result = probe(mu)
        probes.append(result)
        if abs(result.share - target_share) <= tolerance or len(probes) >= max_probes:
            break
        if result.share > target_share:
            too_big = result
        else:
            small_enough = result
        if small_enough is None:
            mu = too_big.mu * MU_FACTOR
        elif too_big is None:
            mu = small_enough.mu / MU_FACTOR
        else:
            mu = math.sqrt(too_big.mu * small_enough.mu)
    best = min(probes, key=lambda candidate: abs(candidate.share - target_share))
    return best, probes


def projected_mask(model: nn.Module, heading_to_zero: dict[str, torch.Tensor], remaining_lrs: list[float],
                   budget: BudgetSettings, scope: str) -> Mask:
    """The mask the search would end with if the filters now heading to zero kept heading there.

    Such a filter (ResNeXt: a conv group of a tied pair) keeps a factor (1 - lr) of its
    norm at every step, so it counts as pruned when its norm times the product over the
    remaining steps is under the threshold.
    """
    log_decay = sum(math.log1p(-lr) if lr < 1 else -math.inf for lr in remaining_lrs)
    pruned = {}
    for members in pruning_groups(model, scope):
        unit, norms = members[0].unit, unit_norms(members)
        heading = heading_to_zero.get(members[0].name)
        if heading is None:
            continue
        heading = heading.cpu().view(-1, unit).all(dim=1)
        decayed = heading & (norms * math.exp(log_decay) <= budget.pruning_threshold)
        pruned[members[0].name] = decayed.repeat_interleave(unit)
    return compute_mask(model, budget.pruning_threshold, scope, budget.round_to, also_pruned=pruned)


class MuProbe:
    """Trains ``model`` from its starting weights for a few steps at a given mu, predicts
    the compressed model's MACs (module docstring), and puts the starting weights back."""

    def __init__(self, model: nn.Module, prox: ProxSettings, budget: BudgetSettings, loop: LoopSettings,
                 ctx: DistContext, batches: list, num_classes: int, full_macs: int, search_lrs: list[float]) -> None:
        self.model, self.prox, self.budget, self.loop, self.ctx = model, prox, budget, loop, ctx
        self.scope = prox.scope
        self.batches, self.num_classes, self.full_macs = batches, num_classes, full_macs
        self.start_state = {key: value.clone() for key, value in model.state_dict().items()}
        # The probe's steps stand in for the search's first ones.
        self.remaining_lrs = search_lrs[len(batches):]

    def __call__(self, mu: float) -> Probe:
        loop = self.loop
        optimizer = search_optimizer(self.model, self.prox.with_mu(mu))
        scaler = make_scaler(loop.amp, self.ctx.device)
        criterion = nn.CrossEntropyLoss()
        counted_from, counted = len(self.batches) // 2, 0
        zero_counts: dict[str, torch.Tensor] = {}
        average = self.average_gradients if self.ctx.distributed else None
        self.model.train()
        try:
            for step, (images, target) in enumerate(self.batches):
                images, target = to_device(images, target, self.ctx.device, loop.channels_last)
                with autocast(self.ctx.device, loop.amp):
                    loss = criterion(self.model(images), target)
                optimizer.zero_grad(set_to_none=True)
                skipped = backward_and_step(loss, optimizer, scaler, before_step=average,
                                            clip_grad_norm=loop.clip_grad_norm)
                if step >= counted_from and not (skipped is not None and bool(skipped)):
                    counted += 1
                    for name, zero in optimizer.zero_prox_filters().items():
                        zero_counts[name] = zero_counts.get(name, 0) + zero.to(torch.int32)
            heading_to_zero = {name: 2 * count >= max(counted, 1) for name, count in zero_counts.items()}
            mask = projected_mask(self.model, heading_to_zero, self.remaining_lrs, self.budget, self.scope)
        finally:
            self.model.load_state_dict(self.start_state)
        # Every process takes rank 0's figure, so that all run the same bisection.
        macs = broadcast_object(mask_macs(self.budget.arch, mask, self.scope, self.num_classes))
        result = Probe(mu=mu, macs=macs, share=macs / self.full_macs)
        if self.ctx.is_main:
            log.info(f"budget probe: mu {mu:.4g} -> {macs / 1e9:.3f} GMac predicted "
                     f"({100 * result.share:.1f}% of the MACs)")
        return result

    def average_gradients(self) -> None:
        """Average the gradients over the processes, as DistributedDataParallel would (the
        model is not wrapped yet)."""
        grads = [param.grad for param in self.model.parameters() if param.grad is not None]
        flat = all_reduce_sum(torch.cat([grad.flatten() for grad in grads])).div_(self.ctx.world_size)
        for grad, averaged in zip(grads, flat.split([grad.numel() for grad in grads])):
            grad.copy_(averaged.view_as(grad))


def start_norms(model: nn.Module, scope: str) -> dict[str, torch.Tensor]:
    """Norm of every pruning unit (a filter, or a ResNeXt conv group) by its first conv's name."""
    return {members[0].name: unit_norms(members) for members in pruning_groups(model, scope)}


def budget_mask(model: nn.Module, goal_macs: int, budget: BudgetSettings, scope: str,
                num_classes: int, norms_at_start: dict[str, torch.Tensor]) -> Mask:
    """The mask that keeps the strongest filters, as many as fit in ``goal_macs``.

    Filters (ResNeXt: conv groups of a tied pair, as ``compute_mask``) are ranked
    nonzero first (norm above the pruning threshold), then by how much of their norm
    at the start of the search (``norms_at_start``, from :func:`start_norms`) they
    still have: the group lasso's own verdict, which raw norms would not give, since
    layers differ in weight scale (and a BatchNorm after each conv makes that scale
    irrelevant). With ``--budget-ranking layer`` that share is divided by its layer's
    median: a shrink the whole layer took (layer-adaptive mu doubles it in layer2 and layer3)
    says nothing about which of its filters matter, and would otherwise empty whole layers
    first; a filter that fell behind its own layer is the one to prune.
    They are kept from the top; the count is the largest whose compressed
    model has at most ``goal_macs`` MACs (MACs only grow with it, so a bisection finds
    it). When the search zeroed more than the budget asks, some zero filters are kept
    (exact); when fewer, the filters that shrank most go too, and the compressed model's
    output changes (the search logs by how much, and retraining recovers it).
    """
    groups = pruning_groups(model, scope)
    norms = [unit_norms(members) for members in groups]  # per unit: a filter, or a ResNeXt group
    all_norms = torch.cat(norms)
    kept_shares = [norm / norms_at_start[members[0].name].clamp_min(torch.finfo(norm.dtype).tiny)
                   for members, norm in zip(groups, norms)]
    if budget.ranking == "layer":
        kept_shares = [share / share.median().clamp_min(torch.finfo(share.dtype).tiny) for share in kept_shares]
    by_strength = torch.sort(torch.cat(kept_shares), descending=True, stable=True).indices
    nonzero_first = torch.sort((all_norms > budget.pruning_threshold)[by_strength].to(torch.int8),
                               descending=True, stable=True).indices
    order = by_strength[nonzero_first]

    def keeping(count: int) -> Mask:
        kept = torch.zeros(len(all_norms), dtype=torch.bool)
        kept[order[:count]] = True
        mask = {}
        for members, norm, row in zip(groups, norms, kept.split([len(norm) for norm in norms])):
            mask.update(member_rows(members, row, norm, budget.round_to))
        return mask

    fitting, too_many = 0, len(all_norms) + 1  # keeping(fitting) fits (checked: goal >= the floor)
    while too_many - fitting > 1:
        middle = (fitting + too_many) // 2
        if mask_macs(budget.arch, keeping(middle), scope, num_classes) <= goal_macs:
            fitting = middle
        else:
            too_many = middle
    return keeping(fitting)


def first_batches(loader: DataLoader, count: int, seed: int | None) -> list:
    """The first ``count`` batches of epoch 0, starting over if the loader has fewer;
    kept so that every probe trains on the same ones."""
    start_epoch(loader, 0, seed)
    # A loader of its own, without persistent workers: they stop as soon as the batches
    # are in, rather than idling half-way through an epoch until the search's first one.
    once = DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                      num_workers=loader.num_workers, generator=loader.generator,
                      worker_init_fn=loader.worker_init_fn)
    batches: list = []
    while len(batches) < count:
        before = len(batches)
        iterator = iter(once)
        batches.extend(islice(iterator, count - len(batches)))
        del iterator  # shuts its workers down
        if len(batches) == before:
            raise UserError("the budget search found no training images")
    return batches


def check_target(model: nn.Module, budget: BudgetSettings, scope: str, num_classes: int,
                 full_macs: int) -> int:
    """The target in MACs; UserError when no mask can reach it (checked before any file is written)."""
    goal = target_macs(budget.target, full_macs)
    if goal >= full_macs:
        raise UserError(f"--target-macs {budget.target} is not below the full model's "
                        f"{full_macs / 1e9:.2f} GMac: nothing to prune")
    floor = smallest_macs(model, budget, scope, num_classes)
    if goal < floor:
        # Every branch dropped: stem, shortcuts and fc are all that is left, in either scope.
        raise UserError(f"--target-macs {budget.target} is below {floor / 1e9:.2f} GMac, the MACs left "
                        f"when every {scope} filter is pruned ({100 * floor / full_macs:.1f}% of the full "
                        f"model): aim higher")
    return goal


def choose_mu(model: nn.Module, prox: ProxSettings, budget: BudgetSettings, loop: LoopSettings,
              ctx: DistContext, loader: DataLoader, num_classes: int, goal: int, full_macs: int,
              search_lrs: list[float]) -> dict:
    """Run the budget search for ``goal`` MACs (from :func:`check_target`); returns its record
    for run_info.json (``"mu"``: the choice). ``search_lrs``: the lr of every step of the
    search (:func:`~gsparsity.training.step_lrs`).

    Every process trains the probes on its part of the same global batches, gradients
    averaged as in the search, and takes rank 0's predictions."""
    target_share = goal / full_macs
    if ctx.is_main:
        log.info(f"budget search: target {goal / 1e9:.3f} GMac ({100 * target_share:.1f}% of the MACs), "
                 f"up to {budget.max_probes} probes of {budget.probe_steps} steps")
    batches = first_batches(loader, budget.probe_steps, budget.seed)
    probe = MuProbe(model, prox, budget, loop, ctx, batches, num_classes, full_macs, search_lrs)
    start_mu = prox.mu if prox.mu > 0 else FALLBACK_START_MU
    best, probes = bisect_mu(probe, target_share, start_mu, budget.max_probes, budget.tolerance / 100)
    if ctx.is_main:
        log.info(f"budget search: mu {best.mu:.4g}, predicted {best.macs / 1e9:.3f} GMac "
                 f"({100 * best.share:.1f}% of the MACs) for a target of {100 * target_share:.1f}%")
    return {"target_macs": goal, "target_share": target_share, "mu": best.mu,
            "probes": [asdict(candidate) for candidate in probes]}


def describe_budget_mask(model: nn.Module, mask: Mask, threshold_mask: Mask, scope: str) -> str:
    """How the budget mask differs from the threshold's: filters pruned above it, zero ones kept
    (a ResNeXt conv group counts as its conv1 filters)."""
    first_members = [members[0].name for members in pruning_groups(model, scope)]
    pruned_nonzero = sum(int((threshold_mask[name] & ~mask[name]).sum()) for name in first_members)
    kept_zero = sum(int((~threshold_mask[name] & mask[name]).sum()) for name in first_members)
    return (f"{pruned_nonzero} filter(s) above the threshold pruned to meet it, "
            f"{kept_zero} zero filter(s) kept to fill it")

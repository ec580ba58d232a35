"""The search: train from a pretrained model with ProxSGD, so that whole filters become
zero, and after every epoch compress the model to the filters that survive.
"""
from __future__ import annotations

import argparse
import copy
import logging
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .budget import (BudgetSettings, budget_mask, check_target, choose_mu, describe_budget_mask, mask_macs,
                     parse_target, start_norms, target_macs)
from .bn_calibration import calibration_loader, recalibrate_batchnorm
from .complexity import count_macs_params, format_macs_params
from .distributed import DistContext, all_reduce_sum, broadcast_object
from .errors import UserError
from .experiment import read_run_info, timestamp
from .settle import CutFilters
from .compression import compress_model, save_compressed_model
from .masks import Mask, compute_mask
from .registry import check_can_register, register_experiment, registers_itself, registry_file
from .engine import validate
from .search_optimizer import ProxSettings, search_optimizer
from .sparsity import sparsity_report
from .data import Loaders
from .training import Run, evaluate_only, step_lrs
from .workflow import Workflow, data_and_starting_model, run_workflow

log = logging.getLogger("gsparsity")
CHECK_IMAGES = 8  # images on which the compressed model is compared with the full one
# The thresholds at which the original's search saves its compressed model when it ends.
ORIGINAL_THRESHOLDS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def experiment_name(args: argparse.Namespace, scope: str) -> str:
    if args.target_macs is not None:
        value, is_share = parse_target(args.target_macs)
        mu_part = f"target_{100 * value:g}pct" if is_share else f"target_{value / 1e9:g}GMac"
    else:
        mu_part = f"wd_{args.mu}"  # the original's folder names spell mu so
    return (f"{scope}_lr_{args.lr}_momentum_{args.momentum}_{mu_part}"
            f"_normalization_{args.normalization}_pretrained_{args.pretrained is not None}_{timestamp()}")


def check_ranks_agree(mask: dict[str, torch.Tensor], ctx: DistContext) -> None:
    """Every process must derive the same mask (their weights are identical under DDP)."""
    if not ctx.distributed:
        return
    kept = torch.cat([row.to(ctx.device, torch.float64) for row in mask.values()])
    total = all_reduce_sum(kept.clone())
    if not torch.equal(total, kept * ctx.world_size):
        raise UserError("processes disagree on which filters are zero: their weights diverged")
    log.info(f"mask agreed by all {ctx.world_size} processes")


def sample_batch(dataset: Dataset, device: torch.device) -> torch.Tensor:
    count = min(CHECK_IMAGES, len(dataset))
    return torch.stack([dataset[index][0] for index in range(count)]).to(device)


@dataclass(frozen=True)
class SearchSettings:
    """What the search does at an epoch's end (:class:`EpochEnd`) and when it ends."""

    scope: str
    arch: str
    epochs: int
    pruning_threshold: float
    round_to: int
    settle_epochs: int  # the last epochs train without the filters the budget's mask cuts
    calibration_images: int  # --bn-calibration-images; 0: no recalibrated figure
    budget: BudgetSettings

    @classmethod
    def from_args(cls, args: argparse.Namespace, scope: str) -> "SearchSettings":
        return cls(scope=scope, arch=args.arch, epochs=args.epochs, pruning_threshold=args.pruning_threshold,
                   round_to=args.round_to, settle_epochs=args.settle_epochs,
                   calibration_images=args.bn_calibration_images, budget=BudgetSettings.from_args(args))


class EpochEnd:
    """After each epoch: mask, sparsity log, compressed model, its MACs, files."""

    def __init__(self, run: Run, settings: SearchSettings, full_macs: int, full_params: int) -> None:
        self.run, self.settings, self.scope = run, settings, settings.scope
        self.full_macs, self.full_params = full_macs, full_params
        self.budget = settings.budget
        self.goal_macs = target_macs(self.budget.target, full_macs) if self.budget.target else None
        self.norms_at_start = run.extra_checkpoint.get("norms_at_start")
        self.check_batch = sample_batch(run.loaders.val.dataset, run.ctx.device) if run.ctx.is_main else None
        images = settings.calibration_images
        self.calibration = (calibration_loader(run.loaders.train.dataset, images, run.loaders.train.batch_size,
                                               run.ctx) if images else None)
        self.calibration_images = 0
        self.cut: CutFilters | None = None
        settled_mask = run.extra_checkpoint.get("settled_mask")
        if settled_mask is not None and run.start_epoch < settings.epochs:  # resumed while settling
            self.cut = CutFilters(run.plain_model, settled_mask, self.scope, resumed=True)

    def __call__(self, epoch: int, val) -> None:
        run, settings = self.run, self.settings
        if self.cut is not None and epoch + 1 == settings.epochs:
            self.cut.finish()  # the cut filters become zero filters: exact compression
        by_threshold = compute_mask(run.plain_model, settings.pruning_threshold, self.scope, settings.round_to)
        mask = by_threshold
        if self.cut is not None:
            mask = self.cut.mask
        elif self.goal_macs is not None:
            mask = budget_mask(run.plain_model, self.goal_macs, self.budget, self.scope, run.loaders.num_classes,
                               self.norms_at_start)
        check_ranks_agree(mask, run.ctx)
        # Every process compresses and evaluates (validation is sharded); rank 0 logs and saves.
        small = compress_model(run.plain_model, mask, self.scope, arch=settings.arch,
                               check_input=self.check_batch)
        accuracy = self.evaluate_compressed(small)
        if settings.settle_epochs and epoch + 1 == settings.epochs - settings.settle_epochs:
            self.settle(epoch, mask)
        if not run.ctx.is_main:
            return
        self.log_sparsity(epoch, by_threshold)
        macs, params = count_macs_params(small, 224)
        log.info(f"epoch {epoch} compressed model: {format_macs_params(macs, params)} at 224x224 "
                 f"({100 * macs / self.full_macs:.1f}% of the MACs, {100 * params / self.full_params:.1f}% "
                 f"of the parameters)")
        self.log_accuracy(epoch, accuracy)
        if self.goal_macs is not None:
            self.log_budget(epoch, mask, by_threshold, macs)
        run.scalars.add("complexity/compressed_gmacs", macs / 1e9, epoch)
        run.scalars.add("complexity/compressed_mparams", params / 1e6, epoch)
        # BatchNorm statistics as trained: exact compression
        save_compressed_model(run.folder, small, mask, settings.arch, self.scope, settings.pruning_threshold,
                              run.loaders.num_classes, epoch + 1, val_top1_full=val.top1,
                              val_top1_compressed=accuracy["compressed"],
                              val_top1_recalibrated=accuracy.get("recalibrated"))
        if epoch + 1 == settings.epochs:
            save_other_thresholds(run, settings, self.check_batch, val.top1, self.full_macs)

    def settle(self, epoch: int, mask: Mask) -> None:
        """Make ``mask`` final and train the last epochs without the filters it cuts (module ``settle``)."""
        run = self.run
        self.cut = CutFilters(run.plain_model, mask, self.scope)
        run.extra_checkpoint["settled_mask"] = mask
        if run.ctx.is_main:
            log.info(f"epoch {epoch}: this budget mask is final; the network trains without the filters it "
                     f"cuts for the last {self.settings.settle_epochs} epoch(s)")

    def evaluate_compressed(self, small: torch.nn.Module) -> dict[str, float]:
        """Val top-1 of the compressed model with the BatchNorm statistics it inherited, and
        (unless ``--bn-calibration-images 0``) of a copy whose statistics are re-estimated on
        training images: the trained statistics trail weights that ProxSGD keeps shrinking."""
        run = self.run
        memory_format = torch.channels_last if run.loop.channels_last else torch.contiguous_format
        small = small.to(memory_format=memory_format)
        accuracy = {"compressed": validate(small, run.loaders.val, run.criterion, run.ctx, run.loop).top1}
        if self.calibration is not None:
            calibrated = copy.deepcopy(small)
            self.calibration_images = recalibrate_batchnorm(calibrated, self.calibration, run.ctx,
                                                            run.loop.channels_last, run.loop.amp)
            accuracy["recalibrated"] = validate(calibrated, run.loaders.val, run.criterion, run.ctx, run.loop).top1
        small.train()
        return accuracy

    def log_accuracy(self, epoch: int, accuracy: dict[str, float]) -> None:
        line = f"epoch {epoch} compressed model: val top1 {accuracy['compressed']:.3f} (BatchNorm statistics as trained)"
        if "recalibrated" in accuracy:
            line += (f", {accuracy['recalibrated']:.3f} (BatchNorm recalibrated on "
                     f"{self.calibration_images} training images)")
        log.info(line)
        self.run.scalars.add("val/compressed_top1", accuracy["compressed"], epoch)
        if "recalibrated" in accuracy:
            self.run.scalars.add("val/compressed_top1_recalibrated", accuracy["recalibrated"], epoch)

    def log_sparsity(self, epoch: int, by_threshold: Mask) -> None:
        """The filters the search zeroed (the budget's mask may differ: log_budget says how)."""
        run = self.run
        report = sparsity_report(run.plain_model, by_threshold, self.scope)
        log.info(f"epoch {epoch} sparsity (threshold {self.settings.pruning_threshold:g}):")
        for line in report.lines():
            log.info(line)
        run.scalars.add("sparsity/zero_filter_share", report.zero_share, epoch)
        run.scalars.add("sparsity/zero_parameter_share", report.zero_parameter_share, epoch)
        run.scalars.add_group("sparsity/zero_filter_share_per_stage",
                              {stage: report.zero_filters[stage] / report.total_filters[stage]
                               for stage in report.total_filters}, epoch)
        run.scalars.add_group("kept_channels_per_stage",
                              {stage: report.total_filters[stage] - report.zero_filters[stage]
                               for stage in report.total_filters}, epoch)

    def log_budget(self, epoch: int, mask: Mask, by_threshold: Mask, macs: int) -> None:
        run = self.run
        exact_macs = mask_macs(self.settings.arch, by_threshold, self.scope, run.loaders.num_classes)
        log.info(f"epoch {epoch} budget: {macs / 1e9:.3f} GMac ({100 * macs / self.full_macs:.1f}% of the MACs) "
                 f"for a target of {self.goal_macs / 1e9:.3f} GMac ({100 * self.goal_macs / self.full_macs:.1f}%); "
                 f"the zero filters alone give {100 * exact_macs / self.full_macs:.1f}%: "
                 f"{describe_budget_mask(run.plain_model, mask, by_threshold, self.scope)}")
        run.scalars.add("complexity/zero_filters_only_gmacs", exact_macs / 1e9, epoch)


def save_other_thresholds(run: Run, settings: SearchSettings, check_batch: torch.Tensor | None, val_top1: float,
                          full_macs: int) -> None:
    """As the original's search does when it ends: the mask and compressed model at each of
    its thresholds too (the search's own is saved already), so that a retrain can take any
    of them with ``--pruning_threshold``. One log line each: MACs, params, output deviation."""
    for threshold in ORIGINAL_THRESHOLDS:
        if threshold == settings.pruning_threshold:
            continue
        mask = compute_mask(run.plain_model, threshold, settings.scope, settings.round_to)
        small = compress_model(run.plain_model, mask, settings.scope, arch=settings.arch, check_input=check_batch)
        macs, params = count_macs_params(small, 224)
        deviation = getattr(small, "output_deviation", {}).get("relative", float("nan"))
        log.info(f"threshold {threshold:g}: {format_macs_params(macs, params)} "
                 f"({100 * macs / full_macs:.1f}% of the MACs), output deviation {deviation:.3g}")
        save_compressed_model(run.folder, small, mask, settings.arch, settings.scope, threshold,
                              run.loaders.num_classes, settings.epochs, val_top1_full=val_top1)


def check_registry_takes_name(args: argparse.Namespace, ctx: DistContext) -> None:
    """Refuse a ``--register`` NAME that the registry cannot take now, not after days of search.

    Every process takes part, with or without the flag: rank 0 registers at the end, so its
    flags and its view of the registry decide (other nodes may have their own copy, or
    none), and every process then stops together instead of waiting for rank 0.
    """
    problem = ""
    if ctx.is_main and args.register and not args.evaluate:
        registry = registry_file(args.registry)
        try:
            own_entry = registers_itself(args.register, args.resume, registry)
            check_can_register(args.register, registry, overwrite=own_entry)
        except UserError as error:
            problem = f"--register {args.register}: {error}"
        except OSError as error:
            problem = f"--register {args.register}: cannot read the model registry {registry}: {error.strerror}"
    problem = broadcast_object(problem)
    if problem:
        raise UserError(problem)


def finish(args: argparse.Namespace, folder: Path, scope: str) -> None:
    registry = registry_file(args.registry)
    if args.register:
        # checks again: the name may have been taken meanwhile
        own_entry = registers_itself(args.register, folder, registry)
        register_experiment(args.register, folder, registry, overwrite=own_entry)
        log.info(f"registered {folder} as {args.register!r} in {registry}")
        name = args.register
    else:
        name = "NAME"
        log.info("to register the compressed model:\n  "
                 f"{sys.executable} -m gsparsity.registry {name} {shlex.quote(str(folder))}")
    registry_flag = f" --registry {shlex.quote(str(registry))}" if args.registry else ""
    log.info("to retrain it:\n  "
             f"{sys.executable} main_reduce_retrain_{scope}.py --baseline_model={name}{registry_flag}")


class Search(Workflow):
    """ProxSGD from the unpruned model; at every epoch's end, the mask and the compressed model."""

    def __init__(self, args: argparse.Namespace, ctx: DistContext, scope: str) -> None:
        super().__init__(args, ctx)
        self.scope, self.script = scope, f"main_search_{scope}.py"
        self.search_settings = SearchSettings.from_args(args, scope)
        self.prox = ProxSettings.from_args(args, scope)
        # A budget is chosen once, by a fresh run; a resumed or evaluated one reads its choice.
        self.probing = self.search_settings.budget.target is not None and not (args.resume or args.evaluate)
        self.budget: dict | None = None  # the budget search's record: its "mu" is the search's

    def prepare(self) -> tuple[Loaders, nn.Module]:
        # The registry first: it is quick to read, and otherwise only read when the search is over.
        check_registry_takes_name(self.args, self.ctx)
        self.loaders, model = data_and_starting_model(self.args, self.ctx)
        return self.loaders, model

    def check(self, model: nn.Module) -> None:
        self.full_macs, self.full_params = count_macs_params(model, 224)
        self.goal = (check_target(model, self.search_settings.budget, self.scope, self.loaders.num_classes,
                                  self.full_macs) if self.probing else None)

    def folder_name(self) -> str:
        return experiment_name(self.args, self.scope)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """ProxSGD with --mu, or with the mu the budget search chooses for --target-macs."""
        loaders = self.loaders
        if self.probing:
            self.budget = choose_mu(model, self.prox, self.search_settings.budget, self.settings.loop, self.ctx,
                                    loaders.train, loaders.num_classes, self.goal, self.full_macs,
                                    step_lrs(self.settings.schedule, len(loaders.train)))
        elif self.args.resume:
            self.budget = read_run_info(self.args.resume).get("budget")
        if self.budget is not None:  # the budget's choice: a result in run_info.json, not a setting
            self.prox = self.prox.with_mu(self.budget["mu"])
        return search_optimizer(model, self.prox)

    def extra_checkpoint(self, model: nn.Module) -> dict[str, Any]:
        # The budget's mask ranks filters by how much of these norms they keep; checkpoints carry them.
        if self.search_settings.budget.target is None:
            return {}
        return {"norms_at_start": start_norms(model, self.scope), "settled_mask": None}

    def evaluate(self, run: Run) -> None:
        metrics = evaluate_only(run)
        if self.args.resume and run.start_epoch >= self.settings.epochs and self.ctx.is_main:  # a finished search
            check_batch = sample_batch(self.loaders.val.dataset, self.ctx.device)
            save_other_thresholds(run, self.search_settings, check_batch, metrics.top1, self.full_macs)

    def run_info(self, run: Run) -> dict[str, Any]:
        return {"scope": self.scope, "budget": self.budget, "optimizer": asdict(self.prox)}

    def before_fit(self, run: Run) -> None:
        if self.args.pretrained is None and not self.args.resume:
            log.warning("--no-pretrained: the search starts from random weights (GSparsity, as published, "
                        "starts from pretrained ones)")
        log.info(f"search with ProxSGD on {self.ctx.world_size} process(es), device {self.ctx.device}: scope "
                 f"{self.scope}, {self.prox.describe()}, full model "
                 f"{format_macs_params(self.full_macs, self.full_params)}")

    def epoch_end(self, run: Run) -> EpochEnd:
        return EpochEnd(run, self.search_settings, self.full_macs, self.full_params)

    def finished(self, run: Run) -> None:
        if self.ctx.is_main:
            finish(self.args, run.folder, self.scope)


def search(args: argparse.Namespace, ctx: DistContext, scope: str) -> None:
    run_workflow(Search(args, ctx, scope))

"""Retrain a compressed model: rebuild it from its mask, load the inherited weights,
show what compression cost, then train it with SGD."""
from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

import torch
from torch import nn

from .complexity import count_macs_params, format_macs_params
from .data import DataSettings, build_loaders
from .distill import DistillationLoss, distill_record, load_teacher, searchs_starting_weights, teacher_file
from .distributed import DistContext
from .errors import UserError
from .filter_norms import rescale_branch_filters
from .compression import compress_model, compressed_model_fields, load_compressed_model
from .masks import mask_from_record
from .models import build_model, load_pretrained
from .experiment import open_experiment, read_run_info, start_logging, timestamp, write_run_info
from .registry import registry_file, resolve, saved_small_models, small_model_file
from .training import evaluate_only, fit, place_model, seed_everything, start_run

log = logging.getLogger("gsparsity")


def load_small_model(path: Path, scope: str, num_classes: int) -> tuple[nn.Module, dict]:
    """The compressed model saved by a search, and the mask record travelling with it."""
    model, info = load_compressed_model(path)
    if info["scope"] != scope:
        raise UserError(f"{path} was compressed with scope {info['scope']!r}; "
                        f"retrain it with main_reduce_retrain_{info['scope']}.py")
    if info["num_classes"] != num_classes:
        raise UserError(f"{path} classifies {info['num_classes']} classes but the data has {num_classes}")
    return model.train(), info["mask"]


def cut_to_mask(weights: Path, mask_record: dict, scope: str, num_classes: int) -> nn.Module:
    """The full model with ``weights``, compressed to the mask of ``mask_record``: the filters the
    search kept, with the values they had before it shrank them."""
    arch = mask_record["arch"]
    full = build_model(arch, num_classes)
    load_pretrained(full, str(weights), arch)
    mask = mask_from_record(mask_record, arch=arch, scope=scope, source=str(weights))
    return compress_model(full.eval(), mask, scope, arch=arch).train()


def small_model_path(args: argparse.Namespace, scope: str) -> Path:
    registry = registry_file(args.registry)
    entry = resolve(args.baseline_model, registry)
    if entry.scope != scope:
        raise UserError(f"--baseline_model {args.baseline_model} was searched with scope "
                        f"{entry.scope}; use main_reduce_retrain_{entry.scope}.py")
    if args.pruning_threshold is None:
        return entry.small_model
    # As the original's retrain scripts: the file of that threshold in the search's folder.
    path = entry.experiment_dir / small_model_file(scope, args.pruning_threshold)
    if not path.is_file():
        saved = [file.name for file in saved_small_models(entry.experiment_dir)]
        raise UserError(f"--pruning_threshold {args.pruning_threshold:g}: the search behind "
                        f"{args.baseline_model} has no {path.name} in {entry.experiment_dir} "
                        f"(it has {', '.join(saved) or 'none'})")
    return path


def retrain_folder_name(args: argparse.Namespace, scope: str, arch: str) -> str:
    """As the original's two retrain scripts name their folders (each its own way)."""
    if scope == "all_conv":
        return (f"retrain_{args.baseline_model}_lr_{args.lr}_momentum_{args.momentum}"
                f"_wd_{args.weight_decay}_{timestamp()}")
    return f"retrain_{arch}_{args.baseline_model}_{timestamp()}"


def retrain(args: argparse.Namespace, ctx: DistContext, scope: str) -> None:
    if args.seed is not None:
        seed_everything(args.seed)
    start_logging(ctx)
    # Resolve before making a folder, so a wrong name leaves nothing behind.
    script = f"main_reduce_retrain_{scope}.py"
    resumed = read_run_info(args.resume, script) if args.resume else None
    source = Path(resumed["small_model"]) if resumed else small_model_path(args, scope)
    teacher_path = None if args.evaluate else teacher_file(args, resumed)
    starting_weights = (searchs_starting_weights(args, "--inherit start", "retrain the search's own weights")
                        if args.inherit == "start" and not args.resume else None)
    loaders = build_loaders(DataSettings.from_args(args), ctx)
    model, mask_record = load_small_model(source, scope, loaders.num_classes)
    arch = mask_record["arch"]  # the searched model's, whatever -a says
    if starting_weights is not None:
        model = cut_to_mask(starting_weights, mask_record, scope, loaders.num_classes)
        log.info(f"--inherit start: the search's mask on the weights it started from, {starting_weights}")
    if args.rescale_filters and not args.resume:  # a resumed run's checkpoint has rescaled weights
        factors = rescale_branch_filters(model)
        log.info(f"--rescale-filters: branch filters scaled to a fresh conv's norm, by a median factor of "
                 f"{statistics.median(factors.values()):.3g} (from {min(factors.values()):.3g} to "
                 f"{max(factors.values()):.3g} per conv)")
    teacher = None if teacher_path is None else load_teacher(teacher_path, arch, loaders.num_classes,
                                                             ctx.device, args.channels_last)
    folder = open_experiment(args, ctx, retrain_folder_name(args, scope, arch), script)
    model = place_model(model, ctx, args.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    run = start_run(args, ctx, folder, model, optimizer, loaders,
                    extra_checkpoint=compressed_model_fields(arch, scope, loaders.num_classes,
                                                             mask_record))
    if teacher is not None:
        run.criterion = DistillationLoss(teacher, args.distill_temperature, args.distill_weight,
                                         args.label_smoothing)
        run.criterion.watch(run.model)
        log.info(f"distilling from the unpruned {arch} in {teacher_path} (temperature "
                 f"{args.distill_temperature:g}, weight {args.distill_weight:g})")
    macs, params = count_macs_params(model, 224)
    log.info(f"compressed {arch} ({scope}) from {source}: {format_macs_params(macs, params)} at 224x224")
    if not args.resume:  # what compression cost, before any retraining
        evaluate_only(run, "inherited weights, before retraining")
    if args.evaluate:
        if args.resume:  # the retrained weights, not the inherited ones
            step = f" and {run.start_step} step(s)" if run.start_step else ""
            evaluate_only(run, f"retrained weights, after {run.start_epoch} epoch(s){step}")
        return
    if ctx.is_main and not args.resume:
        distill = {} if teacher_path is None else {"distill": distill_record(teacher_path, arch, args)}
        write_run_info(folder, args, script, {"scope": scope, "arch": arch, "small_model": str(source.resolve()),
                                              "macs": macs, "params": params, **distill})
        run.scalars.add("complexity/gmacs", macs / 1e9, 0)
        run.scalars.add("complexity/mparams", params / 1e6, 0)
    fit(run)
    log.info(f"retraining done: best top1 {run.best_acc1:.3f}; checkpoints in {folder}")

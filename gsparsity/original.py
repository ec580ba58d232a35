"""The unpruned model: evaluate it (``--pretrained --evaluate``) or train a baseline."""
from __future__ import annotations

import argparse
import logging

import torch

from .complexity import count_macs_params, format_macs_params
from .data import build_loaders
from .distributed import DistContext
from .experiment import open_experiment, start_logging, timestamp, write_run_info
from .models import build_model, load_pretrained
from .training import evaluate_only, fit, place_model, seed_everything, start_run

log = logging.getLogger("gsparsity")


def original(args: argparse.Namespace, ctx: DistContext) -> None:
    if args.seed is not None:
        seed_everything(args.seed)
    start_logging(ctx)
    # Everything that can refuse the input comes before the experiment folder is made.
    loaders = build_loaders(args, ctx)
    model = build_model(args.arch, loaders.num_classes)
    if args.pretrained and not args.resume:
        load_pretrained(model, args.pretrained, args.arch)
    folder = open_experiment(args, ctx, f"original_{args.arch}_{timestamp()}")
    model = place_model(model, args, ctx)
    macs, params = count_macs_params(model, 224)
    log.info(f"{args.arch}: {format_macs_params(macs, params)} at 224x224")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    run = start_run(args, ctx, folder, model, optimizer, loaders)
    if args.evaluate:
        evaluate_only(run)
        return
    if ctx.is_main and not args.resume:
        write_run_info(folder, args, "main_original.py", {"macs": macs, "params": params})
    fit(run)
    log.info(f"training done: best top1 {run.best_acc1:.3f}; use it with "
             f"--pretrained={folder / 'model_best.pth.tar'}")

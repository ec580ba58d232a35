"""The unpruned model: evaluate it (``--pretrained --evaluate``) or train a baseline."""
from __future__ import annotations

import argparse
import logging

import torch

from .complexity import count_macs_params, format_macs_params
from .distributed import DistContext
from .experiment import open_experiment, timestamp, write_run_info
from .training import data_and_starting_model, evaluate_only, fit, place_model, start_run

log = logging.getLogger("gsparsity")
SCRIPT = "main_original.py"


def original(args: argparse.Namespace, ctx: DistContext) -> None:
    loaders, model = data_and_starting_model(args, ctx)
    folder = open_experiment(args, ctx, f"original_{args.arch}_{timestamp()}", SCRIPT)
    model = place_model(model, ctx, args.channels_last)
    macs, params = count_macs_params(model, 224)
    log.info(f"{args.arch}: {format_macs_params(macs, params)} at 224x224")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    run = start_run(args, ctx, folder, model, optimizer, loaders)
    if args.evaluate:
        evaluate_only(run)
        return
    if ctx.is_main and not args.resume:
        write_run_info(folder, args, SCRIPT, {"macs": macs, "params": params})
    fit(run)
    log.info(f"training done: best top1 {run.best_acc1:.3f}; use it with "
             f"--pretrained={folder / 'model_best.pth.tar'}")

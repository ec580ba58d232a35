"""Adaptive BatchNorm: re-estimate a model's BatchNorm statistics on a few training images.

A search shrinks filters step by step, and the running statistics that BatchNorm keeps
trail the weights they normalise: evaluated with them, a compressed model can look
broken while its weights are fine (EagleEye, Li et al. 2020, ranks pruned candidates
this way). :func:`recalibrate_batchnorm` replaces the statistics by plain averages over
a fixed set of training images, so the figure says what the weights are worth.

The images are the same at every call (evenly spaced through the training set, each
with its own fixed augmentation seed), and the training loader's generator and the
global random state are not touched: a resumed run draws what an uninterrupted one does.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import sample_seed
from .distributed import DistContext, all_reduce_sum
from .engine import autocast, to_device

CALIBRATION_SEED = 1_234_567  # augmentation seed of the calibration images, fixed for every run


def calibration_loader(train_set: Dataset, images: int, batch_size: int, ctx: DistContext) -> DataLoader:
    """This process's share of ``images`` training images, the same ones at every call.

    ``train_set`` is the training loader's dataset, which takes ``(index, seed)`` keys
    (``data.SeededSamples``): each image gets its own fixed augmentation draw."""
    count = min(images, len(train_set))
    stride = len(train_set) / count
    chosen = [int(position * stride) for position in range(count)][ctx.rank::ctx.world_size]
    batch_size = max(batch_size, 1)
    if len(chosen) > 1 and len(chosen) % batch_size == 1:
        chosen = chosen[:-1]  # a last batch of one image: BatchNorm cannot average a 1x1 map over it
    keys = [(index, sample_seed(CALIBRATION_SEED, 0, index)) for index in chosen]
    # its own generator: iterating a loader draws a seed, which must not come from the global one
    return DataLoader(train_set, sampler=keys, batch_size=batch_size, num_workers=0, generator=torch.Generator())


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, ctx: DistContext, channels_last: bool = False,
                          amp: bool = False) -> int:
    """Replace every BatchNorm's running mean and variance by their average over ``loader``'s
    batches (averaged over processes too, so every rank ends with the same statistics).
    The weights are untouched; the model is left in eval mode. Returns the images seen."""
    layers = batchnorms(model)
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches, not an exponential one
    model.train()
    seen = 0
    try:
        for images, labels in loader:
            images, _ = to_device(images, labels, ctx.device, channels_last)
            with autocast(ctx.device, amp):
                model(images)
            seen += images.shape[0]
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    if ctx.world_size > 1:
        for layer in layers:
            for statistic in (layer.running_mean, layer.running_var):
                statistic.copy_(all_reduce_sum(statistic.clone()) / ctx.world_size)
    return int(all_reduce_sum(torch.tensor([seen], device=ctx.device)).item())

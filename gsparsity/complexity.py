"""How big and how costly a model is: multiply-accumulates per image and parameters.

MACs come from ptflops' ``aten`` backend, which intercepts the ATen operators run
by one forward pass and counts convolutions and matrix multiplies (BatchNorm,
ReLU, pooling and additions count as zero). It sees whatever the forward actually
runs, so the compressed blocks' ``index_add`` need no special hook. For reference,
torchvision's full ResNet-50 at 224x224 gives about 4.09 GMac and 25.56 M params.
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterator

import torch
from ptflops import get_model_complexity_info
from torch import nn

from .structure import unwrap


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode, then give every submodule back its own train/eval flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def count_macs_params(model: nn.Module, image_size: int = 224) -> tuple[int, int]:
    """(MACs for one 3 x image_size x image_size image, number of parameters) of ``model``.

    One forward pass in eval mode under no_grad, on the model's own device; the
    model's train/eval flags are restored afterwards. Parameters are every
    parameter's numel, trainable or not.
    """
    plain = unwrap(model)
    # ptflops hooks the children of the module it is given and never removes the
    # hooks: hand it a throw-away shell so that they land on the shell, not on ours.
    shell = nn.Sequential(nn.Sequential(plain))
    captured = io.StringIO()
    with torch.no_grad(), evaluation_mode(plain), contextlib.redirect_stdout(captured), \
            contextlib.redirect_stderr(captured):
        macs, _ = get_model_complexity_info(
            shell,
            (3, image_size, image_size),
            print_per_layer_stat=False,
            as_strings=False,
            backend="aten",
            ost=captured,
        )
    if macs is None:
        lines = captured.getvalue().strip().splitlines() or ["no message"]
        raise RuntimeError(f"ptflops could not count the MACs: {lines[-1]}")
    params = sum(parameter.numel() for parameter in plain.parameters())
    return int(macs), int(params)


def format_macs_params(macs: int, params: int) -> str:
    """E.g. "4.09 GMac, 25.56 M params" (units follow the magnitude)."""
    return f"{_scaled(macs, ('Mac', 'KMac', 'MMac', 'GMac'))}, {_scaled(params, ('', 'K', 'M', 'G'))} params"


def _scaled(value: int, units: tuple[str, str, str, str]) -> str:
    for exponent in (3, 2, 1):
        if abs(value) >= 1000**exponent:
            return f"{value / 1000**exponent:.2f} {units[exponent]}"
    return f"{value} {units[0]}".rstrip()

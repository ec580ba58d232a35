"""How big and how costly a model is: multiply-accumulates per image and parameters.

MACs are on the paper's scale: ptflops' module hooks, as the original counted them
(``get_model_complexity_info`` of ptflops 0.6.6): convolutions and fc, and also
BatchNorm (2 per element), ReLU and pooling (1 per element), each time the module
runs. Residual adds are no module and count nothing, in torchvision's blocks as in
``PrunedResidualBlock`` (``add_at_channels``) and ``ShortcutOnlyBlock``
(``residual_bias``). torchvision's ResNet-50 at 224x224: 4,121,925,096 MACs
(4.12 GMac, the figure of the original's ``flops_resnet50_original.txt``), 25.56 M params.

ptflops >= 0.7 also counts, by default, the functional calls that ``nn.ReLU``,
``nn.MaxPool2d`` and ``nn.AdaptiveAvgPool2d`` make inside their hooked modules, so it
counts those modules twice (ResNet-50: 4.13 GMac); 0.6.6 had no such counting, so it is
turned off here (``count_functional``).

Every count also carries its conv+fc share (``Macs.conv_fc``; ResNet-50: 4.09 GMac),
the scale of Torch-Pruning, fvcore and ptflops' aten backend, and of this project's
figures before it counted on the paper's scale.
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterator, Sequence

import torch
from ptflops import get_model_complexity_info
from torch import nn

from .structure import unwrap

CONV_FC = (nn.Conv2d, nn.Linear)  # the modules of the conv+fc figure
MAC_UNITS = ("Mac", "KMac", "MMac", "GMac")


class Macs(int):
    """MACs on the paper's scale (module docstring), carrying ``conv_fc``: the convs' and
    fc's MACs alone. An int, so that shares, sums and JSON take it as the paper's figure."""

    conv_fc: int

    def __new__(cls, total: int, conv_fc: int) -> "Macs":
        macs = super().__new__(cls, total)
        macs.conv_fc = int(conv_fc)
        return macs

    def __reduce__(self) -> tuple:  # pickling (broadcast_object) needs both figures
        return Macs, (int(self), self.conv_fc)


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


def count_macs_params(model: nn.Module, image_size: int = 224) -> tuple[Macs, int]:
    """(MACs for one 3 x image_size x image_size image, on the paper's scale and with their
    conv+fc share, number of parameters) of ``model``.

    Two forward passes in eval mode under no_grad, on the model's own device; the
    model's train/eval flags are restored afterwards. Parameters are every
    parameter's numel, trainable or not.
    """
    plain = unwrap(model)
    macs = Macs(count_macs(plain, image_size), count_macs(plain, image_size, counted=CONV_FC))
    return macs, sum(parameter.numel() for parameter in plain.parameters())


def count_macs(model: nn.Module, image_size: int = 224, counted: Sequence[type] | None = None) -> int:
    """MACs of ``model`` on the paper's scale, from one forward pass (a model on the meta
    device runs none: shapes are enough). ``counted``: only these module types count."""
    plain = unwrap(model)
    ignored = [] if counted is None else list({type(module) for module in plain.modules()} - set(counted))
    # ptflops hooks the children of the module it is given: hand it a throw-away shell so
    # that what it attaches lands on the shell, not on ours.
    shell = nn.Sequential(nn.Sequential(plain))
    captured = io.StringIO()
    with torch.no_grad(), evaluation_mode(plain), contextlib.redirect_stdout(captured), \
            contextlib.redirect_stderr(captured):
        macs, _ = get_model_complexity_info(
            shell,
            (3, image_size, image_size),
            print_per_layer_stat=False,
            as_strings=False,
            backend="pytorch",
            ignore_modules=ignored,
            backend_specific_config={"count_functional": False},  # as ptflops 0.6.6 (docstring)
            ost=captured,
        )
    if macs is None:
        lines = captured.getvalue().strip().splitlines() or ["no message"]
        raise RuntimeError(f"ptflops could not count the MACs: {lines[-1]}")
    return int(macs)


def format_macs_params(macs: int, params: int) -> str:
    """E.g. "4.12 GMac, of which conv+fc 4.09 GMac, 25.56 M params" (the conv+fc part only
    for a ``Macs``; units follow the magnitude)."""
    text = _scaled(macs, MAC_UNITS)
    if isinstance(macs, Macs):
        text += f", of which conv+fc {_scaled(macs.conv_fc, MAC_UNITS)}"
    return f"{text}, {_scaled(params, ('', 'K', 'M', 'G'))} params"


def _scaled(value: int, units: tuple[str, str, str, str]) -> str:
    for exponent in (3, 2, 1):
        if abs(value) >= 1000**exponent:
            return f"{value / 1000**exponent:.2f} {units[exponent]}"
    return f"{value} {units[0]}".rstrip()

"""The unpruned model and its starting weights (`--pretrained`).

No download ever happens: torchvision's IMAGENET1K_V1 weights are used only if
they already sit in the local torch cache; otherwise the run stops at once and
names the file to place there.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from .checkpoint import load_state_dict_file
from .errors import UserError

log = logging.getLogger("gsparsity")
TORCHVISION = "torchvision"  # --pretrained without a path
BATCH_COUNTER = ".num_batches_tracked"  # a BatchNorm buffer that old checkpoints lack


def build_model(arch: str, num_classes: int) -> nn.Module:
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def torchvision_cache_file(arch: str) -> Path:
    """Where torchvision keeps (would download) the IMAGENET1K_V1 weights of ``arch``."""
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def load_pretrained(model: nn.Module, spec: str, arch: str) -> None:
    """Load ``--pretrained`` weights into ``model`` in place.

    A classifier of another size (e.g. ImageNet weights on a 10-class data set) is
    left freshly initialised, with a warning; missing BatchNorm ``num_batches_tracked``
    counters keep the model's own; any other mismatch is an error.
    """
    if spec == TORCHVISION:
        path = torchvision_cache_file(arch)
        if not path.is_file():
            raise UserError(
                f"--pretrained: torchvision's {arch} IMAGENET1K_V1 weights are not in the local "
                f"cache; place the file at {path} or pass --pretrained=PATH (a state_dict or one "
                f"of our checkpoints)")
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--pretrained={spec}: no such file")
    expected = model.state_dict()
    state = _with_batch_counters(load_state_dict_file(path), expected)
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise UserError(f"--pretrained {path}: not a state_dict of {arch} "
                        f"({len(missing)} keys missing, {len(unexpected)} unexpected, e.g. {example!r})")
    mismatched = [key for key in expected if state[key].shape != expected[key].shape]
    classifier = {key for key in mismatched if key.startswith("fc.")}
    if set(mismatched) - classifier:
        key = sorted(set(mismatched) - classifier)[0]
        raise UserError(f"--pretrained {path}: not a state_dict of {arch} ({key!r} has shape "
                        f"{tuple(state[key].shape)}, expected {tuple(expected[key].shape)})")
    if classifier:
        log.warning(f"--pretrained {path}: its classifier has {state['fc.weight'].shape[0]} classes, "
                    f"the data {expected['fc.weight'].shape[0]}; the classifier starts fresh")
        state = {key: value for key, value in state.items() if key not in classifier}
    model.load_state_dict(state, strict=not classifier)
    log.info(f"loaded pretrained weights from {path}")


def _with_batch_counters(state: dict[str, torch.Tensor],
                         expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the BatchNorm ``num_batches_tracked`` counters it lacks taken from ``expected``.

    Files saved before BatchNorm had this buffer (e.g. torchvision's original ImageNet
    ResNets) lack it; ``nn.Module.load_state_dict`` fills it in the same way.
    """
    missing = {key: value for key, value in expected.items()
               if key.endswith(BATCH_COUNTER) and key not in state}
    return {**state, **missing}

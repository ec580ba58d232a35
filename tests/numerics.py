"""Comparing model outputs, for the tests."""
import torch
from torch import nn


def relative_deviation(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Largest |reference - other|, relative to the largest |reference|."""
    return ((reference - other).abs().max() / reference.abs().max()).item()


def eval_output(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)

"""Give the branch convs of a compressed model back the filter norms of a fresh model.

Every branch conv of a ResNet block feeds a BatchNorm, which makes its output blind to
the scale of each filter: ``c * w`` gives the same training-mode output as ``w``. The
group lasso of a search shrinks the surviving filters too, and SGD's step on a filter
is relative to its norm (its gradient scales as ``1 / ||w||``), so a retrain that starts
from filters shrunk a hundredfold takes steps a hundredfold too large on them. Rescaling
each filter to the norm that torchvision's initialisation gives a conv of its shape, and
its BatchNorm's running mean and variance with it, gives the retrain the step sizes of an
ordinary model. BatchNorm's ``eps`` damped the shrunk channels (their variance came close
to it); the BatchNorm weight takes that damping over, so the model computes exactly what it
did in eval mode, and in training mode as nearly as the batch's variance is the running one.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .structure import branch_chain, residual_blocks


def init_filter_norm(conv: nn.Conv2d) -> float:
    """The expected L2 norm of one filter under torchvision's ResNet initialisation
    (kaiming normal, mode fan_out, ReLU gain): std sqrt(2 / fan_out) over fan_in weights."""
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    fan_in = conv.in_channels // conv.groups * kernel
    fan_out = conv.out_channels * kernel
    return math.sqrt(2.0 / fan_out * fan_in)


@torch.no_grad()
def rescale_branch_filters(model: nn.Module) -> dict[str, float]:
    """Scale every branch conv's filters to :func:`init_filter_norm`, compensating its
    BatchNorm's running statistics. Returns, per conv, the median factor applied."""
    factors = {}
    for block_name, block in residual_blocks(model):
        for conv_name, bn_name in branch_chain(block):
            conv, bn = getattr(block, conv_name), getattr(block, bn_name)
            norms = conv.weight.flatten(1).norm(dim=1)
            scale = init_filter_norm(conv) / norms.clamp_min(torch.finfo(norms.dtype).tiny)
            scale = torch.where(norms > 0, scale, torch.ones_like(scale))  # a zero filter stays zero
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            # eps weighs less on the larger variance: gamma keeps the eval-mode output exact
            bn.weight.mul_(((scale.square() * bn.running_var + bn.eps) / (bn.running_var + bn.eps)).sqrt() / scale)
            bn.running_mean.mul_(scale)
            bn.running_var.mul_(scale.square())
            factors[f"{block_name}.{conv_name}"] = float(scale.median())
    return factors

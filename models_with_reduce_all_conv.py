"""Compressed torchvision ResNets, scope ``all_conv`` (every conv of each block's main branch).

``resnet50(mask, num_classes=1000)``, and likewise resnet18, resnet34, resnet101,
resnet152, wide_resnet50_2, wide_resnet101_2, resnext50_32x4d, resnext101_32x8d and
resnext101_64x4d, build the small model that keeps only the filters of ``mask``
(``gsparsity.pruned_resnet.build_pruned_resnet``).
"""
from gsparsity.pruned_resnet import ARCHS, scope_builders

SCOPE = "all_conv"

globals().update(scope_builders(SCOPE))
__all__ = list(ARCHS)

"""QARepVGG: Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach", AAAI 2024.

The paper traces RepVGG's INT8 collapse to its train-time block: BN on the identity branch
(on channels that are dead after the previous ReLU its variance is ~0, so |gamma|/sigma
explodes and the fused kernel gets huge centre weights) and the custom L2 on the
equivalent kernel. Its block keeps BN on the 3x3 branch only, drops it from the 1x1 and
identity branches, and normalizes the sum with one BN before the ReLU::

    relu(BN(BN3(conv3x3(x)) + conv1x1(x) [+ x]))

trained with plain L2 weight decay. BN after a sum of linear branches is still linear, so
``deploykit.fuse.reparameterize`` folds the block into one 3x3 conv with bias; the deploy
form has exactly RepVGG's layers and parameters. Stage layout, widths, groups and the
CIFAR variant are RepVGG's (``deploykit.models.repvgg``); module names follow RepVGG's
(``rbr_dense``, ``rbr_1x1``) with the post-sum BN as ``bn``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deploykit.models.registry import register_model
from deploykit.models.repvgg import BLOCKS_A, BLOCKS_B, RepVGG, conv_bn

__all__ = [
    "QARepVGGBlock",
    "qarepvgg_a0",
    "qarepvgg_a1",
    "qarepvgg_a2",
    "qarepvgg_b0",
    "qarepvgg_b1",
]

PAPER = "Chu et al. 2024, Make RepVGG Greater Again: A Quantization-aware Approach (AAAI)"


class QARepVGGBlock(nn.Module):
    """relu(BN(BN(conv3x3(x)) + conv1x1(x) [+ x])); identity only when in == out and stride 1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.has_identity = in_channels == out_channels and stride == 1
        self.rbr_dense = conv_bn(in_channels, out_channels, 3, stride, groups)
        self.rbr_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.nonlinearity = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.has_identity:
            out = out + x
        return self.nonlinearity(self.bn(out))


def _qarepvgg(blocks: tuple[int, ...], multipliers: tuple[float, float], num_classes: int, groups: int, cifar: bool,
              **kw: Any) -> RepVGG:
    return RepVGG(blocks, multipliers, num_classes, groups=groups, cifar=cifar, block=QARepVGGBlock, **kw)


# The deploy form is RepVGG's (same convs, same parameters); the paper gives no figures of its own here.
@register_model(family="qarepvgg", paper=PAPER)
def qarepvgg_a0(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepVGG:
    """QARepVGG-A0 (RepVGG-A0 layout, a=0.75, b=2.5)."""
    return _qarepvgg(BLOCKS_A, (0.75, 2.5), num_classes, 1, cifar, **kw)


@register_model(family="qarepvgg", paper=PAPER)
def qarepvgg_a1(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepVGG:
    """QARepVGG-A1 (a=1, b=2.5)."""
    return _qarepvgg(BLOCKS_A, (1.0, 2.5), num_classes, 1, cifar, **kw)


@register_model(family="qarepvgg", paper=PAPER)
def qarepvgg_a2(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepVGG:
    """QARepVGG-A2 (a=1.5, b=2.75)."""
    return _qarepvgg(BLOCKS_A, (1.5, 2.75), num_classes, 1, cifar, **kw)


@register_model(family="qarepvgg", paper=PAPER)
def qarepvgg_b0(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepVGG:
    """QARepVGG-B0 (a=1, b=2.5)."""
    return _qarepvgg(BLOCKS_B, (1.0, 2.5), num_classes, 1, cifar, **kw)


@register_model(family="qarepvgg", paper=PAPER)
def qarepvgg_b1(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepVGG:
    """QARepVGG-B1 (a=2, b=4)."""
    return _qarepvgg(BLOCKS_B, (2.0, 4.0), num_classes, 1, cifar, **kw)

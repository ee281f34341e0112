"""RepVGG: Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021.

The train-time block sums a 3x3 conv+BN, a 1x1 conv+BN and (when shapes allow) an identity
BN, then applies ReLU. The deploy form (one 3x3 conv with bias per block) is produced by the
generic ``deploykit.fuse.reparameterize``; this file only describes the train-time graph.
Module names follow the authors' code (``stage0``, ``rbr_dense``, ``rbr_1x1``,
``rbr_identity``, ``gap``, ``linear``) so their checkpoints load unchanged.

CIFAR variant (``cifar=True``, 32x32 inputs): stage0 and the first block of stage1 use
stride 1 instead of 2, so the stages run at 32, 32, 16, 8 and 4 pixels and the network
ends at 4x4 before global pooling.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deploykit.models.registry import register_model

__all__ = [
    "RepVGG",
    "RepVGGBlock",
    "vgg_plan",
    "repvgg_a0",
    "repvgg_a1",
    "repvgg_a2",
    "repvgg_b0",
    "repvgg_b1",
    "repvgg_b1g2",
    "repvgg_b1g4",
]

PAPER = "Ding et al. 2021, RepVGG: Making VGG-style ConvNets Great Again (CVPR)"

# Blocks per stage after stage0 (which is a single block).
BLOCKS_A = (2, 4, 14, 1)
BLOCKS_B = (4, 6, 16, 1)
# The paper applies groupwise convs to every other layer (stage0 is layer 0).
GROUPWISE_LAYERS = tuple(range(2, 27, 2))


def vgg_plan(
    num_blocks: tuple[int, ...], width_multipliers: tuple[float, float], cifar: bool, width: float = 1.0
) -> list[list[tuple[int, int, int]]]:
    """(in_channels, out_channels, stride) of every block, grouped by stage, stage0 first.

    Widths are min(64, 64a) for stage0, then 64a, 128a, 256a and 512b; the first block of
    every stage has stride 2 (CIFAR: stride 1 for stage0 and stage1). ``width`` scales both
    multipliers (small CIFAR training budgets).
    """
    a, b = width_multipliers[0] * width, width_multipliers[1] * width
    widths = (int(64 * a), int(128 * a), int(256 * a), int(512 * b))
    strides = (1, 1, 2, 2, 2) if cifar else (2, 2, 2, 2, 2)
    in_channels = min(64, int(64 * a))
    plan = [[(3, in_channels, strides[0])]]
    for width, blocks, stride in zip(widths, num_blocks, strides[1:]):
        stage = []
        for i in range(blocks):
            stage.append((in_channels, width, stride if i == 0 else 1))
            in_channels = width
        plan.append(stage)
    return plan


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int) -> nn.Sequential:
    """A bias-free conv followed directly by BN: the unit the fuser folds."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(out_channels))
    return seq


class RepVGGBlock(nn.Module):
    """relu(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)]); identity only when in == out and stride 1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        self.rbr_dense = conv_bn(in_channels, out_channels, 3, stride, groups)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, groups)
        self.nonlinearity = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)


class RepVGG(nn.Module):
    """Five stages of RepVGG blocks, global average pooling and a linear classifier.

    ``block``: the block class (QARepVGG reuses the layout with its own block).
    """

    def __init__(
        self,
        num_blocks: tuple[int, ...],
        width_multipliers: tuple[float, float],
        num_classes: int = 1000,
        groups: int = 1,
        cifar: bool = False,
        width: float = 1.0,
        block: type[nn.Module] = RepVGGBlock,
    ) -> None:
        super().__init__()
        self.default_input_size = 32 if cifar else 224
        plan = vgg_plan(num_blocks, width_multipliers, cifar, width)
        layer = 0
        stages: list[nn.Module] = []
        for stage_plan in plan:
            blocks = []
            for in_channels, out_channels, stride in stage_plan:
                g = groups if layer in GROUPWISE_LAYERS else 1
                blocks.append(block(in_channels, out_channels, stride, g))
                layer += 1
            stages.append(blocks[0] if len(stages) == 0 else nn.Sequential(*blocks))
        self.stage0, self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(plan[-1][-1][1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = torch.flatten(self.gap(x), 1)
        return self.linear(x)


# Paper figures (Table 4) are for the deploy form at 224x224, 1000 classes; "FLOPs" there are MACs.
@register_model(family="repvgg", paper=PAPER, paper_params=8.30e6, paper_macs=1.4e9)
def repvgg_a0(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepVGG:
    """RepVGG-A0 (a=0.75, b=2.5)."""
    return RepVGG(BLOCKS_A, (0.75, 2.5), num_classes, groups=1, cifar=cifar, **kw)


@register_model(family="repvgg", paper=PAPER, paper_params=12.78e6, paper_macs=2.4e9)
def repvgg_a1(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepVGG:
    """RepVGG-A1 (a=1, b=2.5)."""
    return RepVGG(BLOCKS_A, (1.0, 2.5), num_classes, groups=1, cifar=cifar, **kw)


@register_model(family="repvgg", paper=PAPER, paper_params=25.49e6, paper_macs=5.1e9)
def repvgg_a2(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepVGG:
    """RepVGG-A2 (a=1.5, b=2.75)."""
    return RepVGG(BLOCKS_A, (1.5, 2.75), num_classes, groups=1, cifar=cifar, **kw)


@register_model(family="repvgg", paper=PAPER, paper_params=14.33e6, paper_macs=3.1e9)
def repvgg_b0(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepVGG:
    """RepVGG-B0 (a=1, b=2.5)."""
    return RepVGG(BLOCKS_B, (1.0, 2.5), num_classes, groups=1, cifar=cifar, **kw)


@register_model(family="repvgg", paper=PAPER, paper_params=51.82e6, paper_macs=11.8e9)
def repvgg_b1(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepVGG:
    """RepVGG-B1 (a=2, b=4)."""
    return RepVGG(BLOCKS_B, (2.0, 4.0), num_classes, groups=1, cifar=cifar, **kw)


@register_model(family="repvgg", paper=PAPER, paper_params=41.36e6, paper_macs=8.8e9)
def repvgg_b1g2(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepVGG:
    """RepVGG-B1g2: B1 with 2 groups in every other layer."""
    return RepVGG(BLOCKS_B, (2.0, 4.0), num_classes, groups=2, cifar=cifar, **kw)


@register_model(family="repvgg", paper=PAPER, paper_params=36.12e6, paper_macs=7.3e9)
def repvgg_b1g4(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepVGG:
    """RepVGG-B1g4: B1 with 4 groups in every other layer."""
    return RepVGG(BLOCKS_B, (2.0, 4.0), num_classes, groups=4, cifar=cifar, **kw)

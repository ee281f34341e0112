"""C-GhostNet: Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020.

A Ghost module makes ceil(oup / 2) "intrinsic" channels with a 1x1 conv and as many "ghost"
channels from them with a cheap depthwise 3x3 conv, concatenates both and keeps the first
oup. Ghost bottlenecks stack two Ghost modules (stride-2 depthwise conv and an optional
squeeze-excite with a hard-sigmoid gate in between) around a shortcut. The layer table and
module names follow the authors' PyTorch code, so their checkpoints load unchanged.

CIFAR variant (``cifar=True``, 32x32 inputs): the stem conv and the first stride-2
bottleneck use stride 1, so the network ends at 4x4 before global pooling.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.models.registry import register_model

__all__ = ["GhostBottleneck", "GhostModule", "GhostNet", "ghostnet_050", "ghostnet_100", "ghostnet_130"]

PAPER = "Han et al. 2020, GhostNet: More Features from Cheap Operations (CVPR)"

# Per stage: (dw kernel, expansion channels, out channels, SE ratio, stride) of each bottleneck.
CFGS: tuple[tuple[tuple[int, int, int, float, int], ...], ...] = (
    ((3, 16, 16, 0, 1),),
    ((3, 48, 24, 0, 2),),
    ((3, 72, 24, 0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0, 2),),
    ((3, 200, 80, 0, 1), (3, 184, 80, 0, 1), (3, 184, 80, 0, 1), (3, 480, 112, 0.25, 1), (3, 672, 112, 0.25, 1)),
    ((5, 672, 160, 0.25, 2),),
    ((5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1)),
)


def make_divisible(value: float, divisor: int = 4) -> int:
    """Round to the nearest multiple of divisor, never more than 10% below value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class HardSigmoid(nn.Module):
    """relu6(x + 3) / 6, the SE gate of the authors' code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    """x * hard_sigmoid(conv(relu(conv(avgpool(x))))), reduced channels divisible by 4."""

    def __init__(self, channels: int, se_ratio: float = 0.25) -> None:
        super().__init__()
        reduced = make_divisible(channels * se_ratio, 4)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)
        self.gate = HardSigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.conv_expand(self.act1(self.conv_reduce(self.avg_pool(x))))
        return x * self.gate(scale)


class GhostModule(nn.Module):
    """cat(primary 1x1 conv-BN(-ReLU), cheap depthwise 3x3 conv-BN(-ReLU) of it)[:, :oup]."""

    def __init__(self, inp: int, oup: int, ratio: int = 2, dw_size: int = 3, relu: bool = True) -> None:
        super().__init__()
        self.oup = oup
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(init_channels),
            nn.ReLU() if relu else nn.Identity(),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels, bias=False),
            nn.BatchNorm2d(new_channels),
            nn.ReLU() if relu else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, : self.oup]


class GhostBottleneck(nn.Module):
    """Ghost module (ReLU) -> [stride-2 dw conv-BN] -> [SE] -> Ghost module (linear) + shortcut."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1, se_ratio: float = 0.0) -> None:
        super().__init__()
        pad = (dw_kernel_size - 1) // 2
        self.ghost1 = GhostModule(in_chs, mid_chs, relu=True)
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride, pad, groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        else:
            self.conv_dw = None
            self.bn_dw = None
        self.se = SqueezeExcite(mid_chs, se_ratio) if se_ratio > 0 else None
        self.ghost2 = GhostModule(mid_chs, out_chs, relu=False)
        if in_chs == out_chs and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride, pad, groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, 1, 0, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.ghost1(x)
        if self.conv_dw is not None:
            x = self.bn_dw(self.conv_dw(x))
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        return x + self.shortcut(residual)


class ConvBnAct(nn.Module):
    """conv (no bias) -> BN -> ReLU."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv(x)))


class GhostNet(nn.Module):
    """Stem, Ghost bottleneck stages, 1x1 conv to 960*width, pooling, 1x1 conv head (1280), classifier."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2, cifar: bool = False) -> None:
        super().__init__()
        self.default_input_size = 32 if cifar else 224
        channels = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(3, channels, 3, 1 if cifar else 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU()
        stages: list[nn.Module] = []
        first_downsample = True
        for cfg in CFGS:
            layers = []
            for kernel, expansion, out, se_ratio, stride in cfg:
                if cifar and stride == 2 and first_downsample:
                    stride, first_downsample = 1, False
                out_chs, mid_chs = make_divisible(out * width, 4), make_divisible(expansion * width, 4)
                layers.append(GhostBottleneck(channels, mid_chs, out_chs, kernel, stride, se_ratio))
                channels = out_chs
            stages.append(nn.Sequential(*layers))
        last = make_divisible(CFGS[-1][-1][1] * width, 4)
        stages.append(nn.Sequential(ConvBnAct(channels, last, 1)))
        self.blocks = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(last, 1280, 1, 1, 0, bias=True)
        self.act2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        x = self.act2(self.conv_head(self.global_pool(x)))
        return self.classifier(self.dropout(torch.flatten(x, 1)))


# Paper figures (Table 7): params and FLOPs (= MACs) at 224x224, 1000 classes.
@register_model(family="ghostnet", paper=PAPER, paper_params=2.6e6, paper_macs=42e6)
def ghostnet_050(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> GhostNet:
    """GhostNet 0.5x."""
    return GhostNet(num_classes, width=0.5, cifar=cifar, **kw)


@register_model(family="ghostnet", paper=PAPER, paper_params=5.2e6, paper_macs=141e6)
def ghostnet_100(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> GhostNet:
    """GhostNet 1.0x."""
    return GhostNet(num_classes, width=1.0, cifar=cifar, **kw)


@register_model(family="ghostnet", paper=PAPER, paper_params=7.3e6, paper_macs=226e6)
def ghostnet_130(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> GhostNet:
    """GhostNet 1.3x."""
    return GhostNet(num_classes, width=1.3, cifar=cifar, **kw)

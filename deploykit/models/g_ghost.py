"""G-GhostNet: Han et al., "GhostNets on Heterogeneous Devices via Cheap Operations", IJCV 2022.

G-Ghost RegNetX: a RegNetX whose deeper stages are G-Ghost stages. In such a stage the first
block (stride 2) makes ``planes`` channels; a chain of ordinary blocks then works on its
first ``raw_planes`` channels only, while the remaining ``cheap_planes`` channels come from
a cheap 1x1 conv-BN of the first block's output. A "mix" branch (global average pool of all
intermediate chain outputs -> 1x1 conv-BN-ReLU -> 1x1 conv-BN) is added to the cheap
features before a ReLU; the concatenation [chain output, cheap features] goes through the
stage's last block. ``raw_planes`` is rounded down to a multiple of 3/4 of the group width,
as in the authors' code, whose configs and module names this file follows.

Paper configs with published figures (authors' README): g_ghost_regnetx_032, _040, _080 and
_160. ``g_ghost_regnetx_002`` is the authors' smallest config, without a published figure;
it is here for fast tests.

CIFAR variant (``cifar=True``, 32x32 inputs): the stem and the first stage use stride 1, so
the network ends at 4x4 before global pooling.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deploykit.models.registry import register_model

__all__ = [
    "Bottleneck",
    "GGhostRegNet",
    "GGhostStage",
    "g_ghost_regnetx_002",
    "g_ghost_regnetx_032",
    "g_ghost_regnetx_040",
    "g_ghost_regnetx_080",
    "g_ghost_regnetx_160",
]

PAPER = "Han et al. 2022, GhostNets on Heterogeneous Devices via Cheap Operations (IJCV)"


def conv_bn(in_planes: int, out_planes: int, kernel_size: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class Bottleneck(nn.Module):
    """RegNetX block (bottleneck ratio 1): 1x1 conv-BN-ReLU, 3x3 group conv-BN-ReLU, 1x1 conv-BN, + shortcut, ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, group_width: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes // min(planes, group_width), bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = conv_bn(inplanes, planes, 1, stride) if stride != 1 or inplanes != planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class GGhostStage(nn.Module):
    """First block, a chain on the first raw_planes channels, cheap + mix features, last block."""

    def __init__(self, inplanes: int, planes: int, group_width: int, blocks: int, stride: int, cheap_ratio: float = 0.5) -> None:
        super().__init__()
        self.base = Bottleneck(inplanes, planes, stride, group_width)
        self.end = Bottleneck(planes, planes, 1, group_width)
        chain_group_width = int(group_width * 0.75)
        self.raw_planes = int(planes * (1 - cheap_ratio) / chain_group_width) * chain_group_width
        self.cheap_planes = cheap = planes - self.raw_planes
        self.merge = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(planes + self.raw_planes * (blocks - 2), cheap, 1, bias=False),
            nn.BatchNorm2d(cheap),
            nn.ReLU(),
            nn.Conv2d(cheap, cheap, 1, bias=False),
            nn.BatchNorm2d(cheap),
        )
        self.cheap = conv_bn(cheap, cheap, 1)
        self.cheap_relu = nn.ReLU()
        self.layers = nn.Sequential(
            *[Bottleneck(self.raw_planes, self.raw_planes, 1, chain_group_width) for _ in range(blocks - 2)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.base(x)
        chain = [x0]
        e = x0[:, : self.raw_planes]
        for layer in self.layers:
            e = layer(e)
            chain.append(e)
        mix = self.merge(torch.cat(chain, 1))
        c = self.cheap_relu(self.cheap(x0[:, self.raw_planes :]) + mix)
        return self.end(torch.cat((e, c), 1))


class GGhostRegNet(nn.Module):
    """3x3 stride-2 stem (32 ch), four stages (G-Ghost stages where a stage has > 2 blocks), pool, dropout, fc."""

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        widths: tuple[int, int, int, int],
        group_width: int,
        num_classes: int = 1000,
        dropout: float = 0.2,
        cifar: bool = False,
    ) -> None:
        super().__init__()
        self.default_input_size = 32 if cifar else 224
        stem = 32
        self.conv1 = nn.Conv2d(3, stem, 3, 1 if cifar else 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        inplanes = stem
        stages = []
        for i, (blocks, planes) in enumerate(zip(layers, widths)):
            stride = 1 if cifar and i == 0 else 2
            # As in the authors' code: stage 1 is always plain, stage 3 always G-Ghost.
            if i == 2 or (i in (1, 3) and blocks > 2):
                stages.append(GGhostStage(inplanes, planes, group_width, blocks, stride))
            else:
                stage = [Bottleneck(inplanes, planes, stride, group_width)]
                stage += [Bottleneck(planes, planes, 1, group_width) for _ in range(blocks - 1)]
                stages.append(nn.Sequential(*stage))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


@register_model(family="g_ghost", paper=PAPER)
def g_ghost_regnetx_002(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> GGhostRegNet:
    """G-Ghost RegNetX-200MF (authors' config, no published figures; small, for tests)."""
    return GGhostRegNet((1, 1, 4, 7), (24, 56, 152, 368), 8, num_classes, cifar=cifar, **kw)


# Figures from the authors' README: params and "FLOPs" (= MACs) at 224x224, 1000 classes.
@register_model(family="g_ghost", paper=PAPER, paper_params=10.5e6, paper_macs=1.8e9)
def g_ghost_regnetx_032(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> GGhostRegNet:
    """G-Ghost RegNetX-3.2GF."""
    return GGhostRegNet((2, 6, 15, 2), (96, 192, 432, 1008), 48, num_classes, cifar=cifar, **kw)


@register_model(family="g_ghost", paper=PAPER, paper_params=15.7e6, paper_macs=2.2e9)
def g_ghost_regnetx_040(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> GGhostRegNet:
    """G-Ghost RegNetX-4.0GF."""
    return GGhostRegNet((2, 5, 14, 2), (80, 240, 560, 1360), 40, num_classes, cifar=cifar, **kw)


@register_model(family="g_ghost", paper=PAPER, paper_params=24.6e6, paper_macs=4.2e9)
def g_ghost_regnetx_080(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> GGhostRegNet:
    """G-Ghost RegNetX-8.0GF."""
    return GGhostRegNet((2, 5, 15, 1), (80, 240, 720, 1920), 120, num_classes, cifar=cifar, **kw)


@register_model(family="g_ghost", paper=PAPER, paper_params=32.4e6, paper_macs=9.0e9)
def g_ghost_regnetx_160(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> GGhostRegNet:
    """G-Ghost RegNetX-16GF."""
    return GGhostRegNet((2, 6, 13, 1), (256, 512, 896, 2048), 128, num_classes, cifar=cifar, **kw)

"""Faithful re-creations of the structures that timm and torchvision models put in a traced graph.

Written here (not imported) so that the fuser's conformance tests run without timm or
torchvision. Each mirrors the forward() of its original line for line where it matters to
tracing: ``BatchNormAct2d`` (timm.layers.norm_act: ``_assert`` on ``x.ndim``, ``F.batch_norm``,
drop and act placeholders), ``FrozenBatchNorm2d`` (torchvision.ops.misc), ``MobileOneBlock``
(timm byobnet/fastvit: ``out = 0`` then ``out += branch`` over k branches, scale branch,
BN identity), ``RepVggBlock`` (timm byobnet: ``x += identity`` after drop-path), the
RepGhost module (BN-identity branch on the primary conv output), FastViT's ``RepMixer``
(``x + layer_scale(mixer(x) - norm(x))``) and ``RepCPE`` (``pe(x) + x``), and a torchvision
``BasicBlock`` with in-place ReLUs. ``EXPECTED`` holds what timm's own
``reparameterize_model`` reaches on the same structure: convs after, and 0 BatchNorm.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d: BN traced as F.batch_norm, then drop and act."""

    def __init__(self, channels: int, apply_act: bool = True) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, bn_training, 0.1, self.eps)
        return self.act(self.drop(x))


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: statistics as buffers, applied as x * scale + bias."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros), ("running_var", torch.ones)):
            self.register_buffer(name, init(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(1 - drop_prob)
    return x * keep / (1 - drop_prob)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.1) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, apply_act: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, apply_act=apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class MobileOneBlock(nn.Module):
    """k over-parameterized kxk branches, a 1x1 scale branch and a BN identity, summed from 0."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, branches: int = 4,
                 use_act: bool = True, use_scale: bool = True) -> None:
        super().__init__()
        self.identity = BatchNormAct2d(cin, apply_act=False) if cin == cout and stride == 1 else None
        self.conv_kxk = nn.ModuleList([ConvNormAct(cin, cout, k, stride, groups) for _ in range(branches)])
        self.conv_scale = ConvNormAct(cin, cout, 1, stride, groups) if k > 1 and use_scale else None
        self.se = nn.Identity()
        self.act = nn.ReLU() if use_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        for conv in self.conv_kxk:
            out += conv(x)
        return self.act(self.se(out))


class RepVggBlock(nn.Module):
    """timm byobnet.RepVggBlock: 1x1 + kxk, drop-path, ``x += identity``, in-place act."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.identity = BatchNormAct2d(cin, apply_act=False) if cin == cout and stride == 1 else None
        self.conv_kxk = ConvNormAct(cin, cout, 3, stride, groups)
        self.conv_1x1 = ConvNormAct(cin, cout, 1, stride, groups)
        self.attn = nn.Identity()
        self.drop_path = DropPath(0.1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)
            x += identity
        return self.act(self.attn(x))


class RepGhostModule(nn.Module):
    """timm repghost.RepGhostModule: cheap depthwise conv on the primary output plus a BN identity of it."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.primary_conv = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.cheap_operation = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, groups=cout, bias=False), nn.BatchNorm2d(cout))
        self.fusion_bn = nn.ModuleList([nn.BatchNorm2d(cout)])
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        for bn in self.fusion_bn:
            x2 = x2 + bn(x1)
        return self.relu(x2)


class LayerScale2d(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class RepMixer(nn.Module):
    """FastViT's token mixer: x + layer_scale(mixer(x) - norm(x)), all depthwise and linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = MobileOneBlock(dim, dim, 3, groups=dim, branches=0, use_act=False, use_scale=False)
        self.mixer = MobileOneBlock(dim, dim, 3, groups=dim, branches=1, use_act=False)
        self.layer_scale = LayerScale2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale(self.mixer(x) - self.norm(x))


class RepCPE(nn.Module):
    """FastViT's conditional positional encoding: a depthwise conv plus its input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pe = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pe(x) + x


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock: in-place ReLUs right after folded BNs."""

    def __init__(self, cin: int, cout: int, stride: int = 1, norm: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout)) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Head(nn.Module):
    def __init__(self, channels: int, num_classes: int = 10) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.mean((2, 3))))


def _net(*layers: nn.Module, channels: int) -> nn.Module:
    return nn.Sequential(*layers, Head(channels))


def mobileone_like() -> nn.Module:
    return _net(
        MobileOneBlock(3, 16, 3, stride=2, branches=1),
        MobileOneBlock(16, 16, 3, groups=16),  # depthwise kxk, k branches + scale + identity
        MobileOneBlock(16, 24, 1),  # pointwise: k 1x1 branches, no scale branch
        MobileOneBlock(24, 24, 1),
        channels=24,
    )


def repvgg_like() -> nn.Module:
    return _net(RepVggBlock(3, 16, 2), RepVggBlock(16, 16), RepVggBlock(16, 32, 2, groups=2), RepVggBlock(32, 32), channels=32)


def repghost_like() -> nn.Module:
    return _net(ConvNormAct(3, 16, 3, 2, apply_act=True), RepGhostModule(16, 24), RepGhostModule(24, 24), channels=24)


def fastvit_like() -> nn.Module:
    return _net(MobileOneBlock(3, 16, 3, stride=2, branches=1), RepCPE(16), RepMixer(16), RepMixer(16), channels=16)


def resnet_like() -> nn.Module:
    return _net(ConvNormAct(3, 16, 3, 2, apply_act=True), BasicBlock(16, 16), BasicBlock(16, 32, 2), channels=32)


def frozen_bn_resnet_like() -> nn.Module:
    return _net(BasicBlock(3, 16, 2, norm=FrozenBatchNorm2d), BasicBlock(16, 16, norm=FrozenBatchNorm2d), channels=16)


# name -> (factory, convs after timm's own reparameterization of the same structure)
PATTERNS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "mobileone_like": (mobileone_like, 4),
    "repvgg_like": (repvgg_like, 4),
    "repghost_like": (repghost_like, 5),  # stem + (primary + fused cheap) x 2
    "fastvit_like": (fastvit_like, 4),  # stem, RepCPE, 2 RepMixers: one depthwise conv each
    "resnet_like": (resnet_like, 6),  # stem, 2 + 2 + downsample: residuals around ReLU stay
    "frozen_bn_resnet_like": (frozen_bn_resnet_like, 5),
}

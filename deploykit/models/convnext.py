"""ConvNeXt: Liu et al., "A ConvNet for the 2020s", CVPR 2022.

Block: depthwise 7x7 conv, LayerNorm, pointwise MLP (4x, GELU), layer scale, residual.
The MLP comes in two exactly equivalent layouts, chosen with ``mlp=``:

- ``"linear"`` (the authors' code): permute to NHWC, channels-last ``nn.LayerNorm``,
  ``nn.Linear`` x2, gamma of shape (C,), permute back;
- ``"conv1x1"``: stays NCHW; LayerNorm over the channel dim written as mean/var over dim 1,
  1x1 ``nn.Conv2d`` x2, gamma of shape (C, 1, 1). No permutes, so runtimes without a fast
  transpose (and the conv-centric fusers/quantizers) see a plain conv graph.

``convert_convnext_weights`` turns a checkpoint of one layout into the other. Module names
follow the authors' code, so their checkpoints load into ``mlp="linear"`` models.

Sizes: tiny is from the ConvNeXt paper; atto, femto, pico and nano are the small variants
designed by Ross Wightman (timm) and published in ConvNeXt V2 (Woo et al. 2023). The registry's
paper figures are the V2 ones for all five: V2 blocks use GRN instead of layer scale, which
changes the parameter count by < 0.5% and the MACs not at all.

CIFAR variant (``cifar=True``, 32x32 inputs): the stem patchifies with a 2x2 stride-2 conv
instead of 4x4 stride 4, so the stages run at 16, 8, 4 and 2 pixels.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deploykit.errors import DeployError
from deploykit.models.registry import register_model

__all__ = [
    "Block",
    "ConvNeXt",
    "LayerNorm2d",
    "convert_convnext_weights",
    "convnext_atto",
    "convnext_femto",
    "convnext_pico",
    "convnext_nano",
    "convnext_tiny",
]

PAPER = "Liu et al. 2022, A ConvNet for the 2020s (CVPR); figures from Woo et al. 2023, ConvNeXt V2 (CVPR)"
MLP_LAYOUTS = ("linear", "conv1x1")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of an NCHW tensor (mean/var over dim 1, biased variance)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class DropPath(nn.Module):
    """Stochastic depth per sample; the identity at eval time."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.rate
        mask = torch.floor(keep + torch.rand_like(x[:, :1, :1, :1]))
        return x * mask / keep


class Block(nn.Module):
    """x + drop_path(gamma * MLP(norm(dwconv7x7(x)))) in the ``linear`` or ``conv1x1`` layout."""

    def __init__(self, dim: int, mlp: str = "linear", drop_path: float = 0.0, layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.channels_last = mlp == "linear"
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        if self.channels_last:
            self.norm: nn.Module = nn.LayerNorm(dim, eps=1e-6)
            self.pwconv1: nn.Module = nn.Linear(dim, 4 * dim)
            self.pwconv2: nn.Module = nn.Linear(4 * dim, dim)
            gamma_shape: tuple[int, ...] = (dim,)
        else:
            self.norm = LayerNorm2d(dim, eps=1e-6)
            self.pwconv1 = nn.Conv2d(dim, 4 * dim, 1)
            self.pwconv2 = nn.Conv2d(4 * dim, dim, 1)
            gamma_shape = (dim, 1, 1)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(torch.full(gamma_shape, layer_scale_init_value)) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class ConvNeXt(nn.Module):
    """Patchify stem, four stages separated by LN + 2x2 stride-2 downsampling, LN + linear head."""

    def __init__(
        self,
        depths: tuple[int, ...],
        dims: tuple[int, ...],
        num_classes: int = 1000,
        mlp: str = "linear",
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        cifar: bool = False,
    ) -> None:
        super().__init__()
        if mlp not in MLP_LAYOUTS:
            raise DeployError(f"ConvNeXt mlp must be one of {', '.join(MLP_LAYOUTS)}, not {mlp!r}")
        self.default_input_size = 32 if cifar else 224
        patch = 2 if cifar else 4
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], patch, patch), LayerNorm2d(dims[0]))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist() if drop_path_rate > 0 else [0.0] * sum(depths)
        self.stages = nn.ModuleList()
        start = 0
        for dim, depth in zip(dims, depths):
            blocks = [Block(dim, mlp, rates[start + j], layer_scale_init_value) for j in range(depth)]
            self.stages.append(nn.Sequential(*blocks))
            start += depth
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.head(self.norm(x.mean((-2, -1))))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def convert_convnext_weights(state_dict: dict[str, torch.Tensor], to: str) -> dict[str, torch.Tensor]:
    """Convert a ConvNeXt state dict between the ``linear`` and ``conv1x1`` MLP layouts.

    Only the block MLP weights (Linear (O, I) <-> 1x1 conv (O, I, 1, 1)) and layer-scale
    gammas ((C,) <-> (C, 1, 1)) change shape; everything else is copied as is. Converting a
    checkpoint that is already in the target layout returns it unchanged.
    """
    if to not in MLP_LAYOUTS:
        raise DeployError(f"convert_convnext_weights: to must be one of {', '.join(MLP_LAYOUTS)}, not {to!r}")
    out = {}
    for key, value in state_dict.items():
        leaf = key.rsplit(".", 2)
        is_mlp_weight = len(leaf) == 3 and leaf[1] in ("pwconv1", "pwconv2") and leaf[2] == "weight"
        is_gamma = key.endswith(".gamma") and key.startswith("stages.")
        if is_mlp_weight or is_gamma:
            linear_dim = 2 if is_mlp_weight else 1
            if to == "conv1x1" and value.dim() == linear_dim:
                value = value[..., None, None]
            elif to == "linear" and value.dim() == linear_dim + 2:
                value = value[..., 0, 0]
        out[key] = value
    return out


@register_model(family="convnext", paper=PAPER, paper_params=3.7e6, paper_macs=0.55e9)
def convnext_atto(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> ConvNeXt:
    """ConvNeXt-Atto (dims 40-320, depths 2-2-6-2); kw: mlp, drop_path_rate, layer_scale_init_value."""
    return ConvNeXt((2, 2, 6, 2), (40, 80, 160, 320), num_classes, cifar=cifar, **kw)


@register_model(family="convnext", paper=PAPER, paper_params=5.2e6, paper_macs=0.78e9)
def convnext_femto(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> ConvNeXt:
    """ConvNeXt-Femto (dims 48-384, depths 2-2-6-2)."""
    return ConvNeXt((2, 2, 6, 2), (48, 96, 192, 384), num_classes, cifar=cifar, **kw)


@register_model(family="convnext", paper=PAPER, paper_params=9.1e6, paper_macs=1.37e9)
def convnext_pico(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> ConvNeXt:
    """ConvNeXt-Pico (dims 64-512, depths 2-2-6-2)."""
    return ConvNeXt((2, 2, 6, 2), (64, 128, 256, 512), num_classes, cifar=cifar, **kw)


@register_model(family="convnext", paper=PAPER, paper_params=15.6e6, paper_macs=2.45e9)
def convnext_nano(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> ConvNeXt:
    """ConvNeXt-Nano (dims 80-640, depths 2-2-8-2)."""
    return ConvNeXt((2, 2, 8, 2), (80, 160, 320, 640), num_classes, cifar=cifar, **kw)


@register_model(family="convnext", paper=PAPER, paper_params=28.6e6, paper_macs=4.47e9)
def convnext_tiny(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> ConvNeXt:
    """ConvNeXt-T (dims 96-768, depths 3-3-9-3)."""
    return ConvNeXt((3, 3, 9, 3), (96, 192, 384, 768), num_classes, cifar=cifar, **kw)

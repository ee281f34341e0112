"""RepOpt-VGG: Ding et al., "Re-parameterizing Your Optimizers rather than Architectures", ICLR 2023.

Three forms share the RepVGG stage layout (``vgg_plan``) and module names, so scales and
weights move between them by block name:

- ``target``: the plain model, conv3x3 -> BN -> ReLU per block, trained with ``RepOptimizer``.
- ``hs`` (hyper-search): ``relu(BN(s * conv3x3(x) + t * conv1x1(x) [+ g * x]))`` with
  trainable per-channel scales; its trained scales parameterize the optimizer.
- ``csla`` (constant-scale linear addition): the same graph with s and t frozen as buffers.
  Plain SGD on it equals ``RepOptimizer`` on the target model (tests/test_repopt.py). As in
  the authors' code the BN sits after the sum, so it maps one-to-one onto the target's BN.

Scale initialisation follows the authors' code: 1 for stage0 and for the first block of
every stage, sqrt(2 / i) for the block with 0-based index i >= 1 inside its stage (so the
second block starts at sqrt(2), the third at 1, ...); identity scales start at 1.

As in the authors' code the identity scale g stays trainable in the CSLA form: it is a
per-channel weight on the identity, and that weight is what the "+1" at the identity
positions of the gradient mask stands for. With it, weight decay on the merged kernel is
also exactly equivalent (decay of s*W3 + t*W1 + g*I is decay of each branch).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.errors import DeployError
from deploykit.models.registry import register_model
from deploykit.models.repvgg import BLOCKS_A, BLOCKS_B, vgg_plan

__all__ = [
    "LinearAddBlock",
    "PlainBlock",
    "RepOptVGG",
    "RepOptimizer",
    "extract_scales",
    "grad_masks",
    "initialize_from_scales",
    "merge_kernel",
]

PAPER = "Ding et al. 2023, Re-parameterizing Your Optimizers rather than Architectures (ICLR)"
MODES = ("target", "hs", "csla")


class PlainBlock(nn.Module):
    """conv3x3 (no bias) -> BN -> ReLU: the target block, nothing to fuse."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class LinearAddBlock(nn.Module):
    """relu(BN(s * conv3x3(x) + t * conv1x1(x) [+ g * x])) with per-channel scales of shape (1, C, 1, 1).

    ``constant=True`` (CSLA) stores s and t as buffers; the identity scale g stays a parameter.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, scale_init: float = 1.0, constant: bool = False) -> None:
        super().__init__()
        self.conv3x3 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.conv1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)
        init = torch.full((1, out_channels, 1, 1), float(scale_init))
        if constant:
            self.register_buffer("scale_3x3", init.clone())
            self.register_buffer("scale_1x1", init.clone())
        else:
            self.scale_3x3 = nn.Parameter(init.clone())
            self.scale_1x1 = nn.Parameter(init.clone())
        has_identity = in_channels == out_channels and stride == 1
        self.scale_identity = nn.Parameter(torch.ones(1, out_channels, 1, 1)) if has_identity else None
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scale_3x3 * self.conv3x3(x) + self.scale_1x1 * self.conv1x1(x)
        if self.scale_identity is not None:
            out = out + self.scale_identity * x
        return self.relu(self.bn(out))


class RepOptVGG(nn.Module):
    """RepVGG's stage layout built from target, hyper-search or CSLA blocks."""

    def __init__(
        self,
        num_blocks: tuple[int, ...],
        width_multipliers: tuple[float, float],
        num_classes: int = 1000,
        mode: str = "target",
        cifar: bool = False,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise DeployError(f"RepOpt-VGG mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.default_input_size = 32 if cifar else 224
        stages: list[nn.Module] = []
        for stage_plan in vgg_plan(num_blocks, width_multipliers, cifar, width):
            blocks = []
            for i, (in_channels, out_channels, stride) in enumerate(stage_plan):
                if mode == "target":
                    blocks.append(PlainBlock(in_channels, out_channels, stride))
                else:
                    scale_init = 1.0 if i == 0 else math.sqrt(2.0 / i)
                    blocks.append(LinearAddBlock(in_channels, out_channels, stride, scale_init, constant=mode == "csla"))
            stages.append(blocks[0] if len(stages) == 0 else nn.Sequential(*blocks))
        self.stage0, self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(stage_plan[-1][1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = torch.flatten(self.gap(x), 1)
        return self.linear(x)


def _blocks(model: nn.Module, kind: type[nn.Module]) -> dict[str, nn.Module]:
    found = {name: m for name, m in model.named_modules() if isinstance(m, kind)}
    if not found:
        raise DeployError(f"{type(model).__name__} has no RepOpt-VGG {kind.__name__}s; expected a RepOptVGG model")
    return found


def extract_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-block scales of a hyper-search (or CSLA) model as a flat {name: (C,) tensor} dict.

    Keys are ``<block>.scale_3x3``, ``<block>.scale_1x1`` and, for blocks with an identity,
    ``<block>.scale_identity``; the dict can be saved with ``safetensors.torch.save_file``.
    """
    scales = {}
    for name, block in _blocks(model, LinearAddBlock).items():
        for key in ("scale_3x3", "scale_1x1", "scale_identity"):
            value = getattr(block, key)
            if value is not None:
                scales[f"{name}.{key}"] = value.detach().reshape(-1).cpu().clone()
    return scales


def _block_scales(scales: dict[str, torch.Tensor], name: str, channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The (s, t, g) of block ``name``, checked against the block's output channels."""
    try:
        found = scales[f"{name}.scale_3x3"], scales[f"{name}.scale_1x1"], scales.get(f"{name}.scale_identity")
    except KeyError as err:
        raise DeployError(f"no scales for block {name!r}; were they extracted from a model of the same size?") from err
    for scale in found:
        if scale is not None and scale.numel() != channels:
            raise DeployError(
                f"scales for block {name!r} have {scale.numel()} channels but the model has {channels}; "
                "were they extracted from a model of the same size?"
            )
    return found


def merge_kernel(w3: torch.Tensor, w1: torch.Tensor, s: torch.Tensor, t: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """The 3x3 kernel equal to s*conv3x3 + t*conv1x1 [+ g*identity]: W' = s W3 + t pad(W1) [+ g I]."""
    s, t = s.reshape(-1, 1, 1, 1).to(w3), t.reshape(-1, 1, 1, 1).to(w3)
    kernel = w3 * s + F.pad(w1, [1, 1, 1, 1]) * t
    if g is not None:
        channels = kernel.shape[0]
        eye = torch.eye(channels, dtype=w3.dtype, device=w3.device).reshape(channels, channels, 1, 1)
        kernel = kernel + F.pad(eye * g.reshape(-1, 1, 1, 1).to(w3), [1, 1, 1, 1])
    return kernel


def grad_masks(model: nn.Module, scales: dict[str, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
    """Gradient multipliers of every 3x3 kernel of a target model (the paper's Grad Mult).

    M = s^2 everywhere (per output channel), + t^2 at the kernel centre, + 1 at [c, c, 1, 1]
    when the block has an identity: for y = s*conv(x, W3) SGD moves s*W3 by -lr * s^2 * dL/dW'.
    """
    masks = {}
    for name, block in _blocks(model, PlainBlock).items():
        weight = block.conv.weight
        s, t, g = _block_scales(scales, name, weight.shape[0])
        mask = (s.reshape(-1, 1, 1, 1) ** 2).expand_as(weight).clone().to(weight)
        mask[:, :, 1, 1] += (t.reshape(-1, 1) ** 2).to(weight)
        if g is not None:
            idx = torch.arange(weight.shape[0])
            mask[idx, idx, 1, 1] += 1.0
        masks[weight] = mask
    return masks


@torch.no_grad()
def initialize_from_scales(model: nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """Re-initialize each target kernel as the merged kernel of a freshly initialized CSLA block.

    W' = s * W (the current 3x3 init) + t * pad(W1) (a default-initialized 1x1 conv) + g * I.
    """
    for name, block in _blocks(model, PlainBlock).items():
        conv = block.conv
        s, t, g = _block_scales(scales, name, conv.out_channels)
        w1 = torch.empty(conv.out_channels, conv.in_channels, 1, 1, dtype=conv.weight.dtype, device=conv.weight.device)
        nn.init.kaiming_uniform_(w1, a=math.sqrt(5))  # nn.Conv2d's default initialisation
        conv.weight.copy_(merge_kernel(conv.weight, w1, s, t, g))


class RepOptimizer(torch.optim.SGD):
    """SGD (Nesterov momentum by default) whose 3x3-kernel gradients are multiplied by ``grad_masks``.

    ``step`` multiplies those ``.grad`` tensors in place, then runs torch's SGD, which adds
    weight decay after the mask: the update direction is g * M + wd * W, as in the authors'
    RepOptimizerSGD. Training the target model this way equals plain SGD (same lr, momentum,
    Nesterov and weight decay) on the CSLA model with the same scales.
    """

    def __init__(
        self,
        model: nn.Module,
        scales: dict[str, torch.Tensor],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        params: Iterable[Any] | None = None,
    ) -> None:
        # params: parameters or param groups to optimize (e.g. to exempt BN from decay); default all.
        params = model.parameters() if params is None else params
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.grad_masks = grad_masks(model, scales)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for param, mask in self.grad_masks.items():
            if param.grad is not None:
                param.grad.mul_(mask.to(param.grad))
        super().step()
        return loss


@register_model(family="repopt", paper=PAPER)
def repopt_vgg_a0(num_classes: int = 1000, cifar: bool = False, mode: str = "target", **kw: Any) -> RepOptVGG:
    """RepOpt-VGG-A0 target (plain) model; ``mode="hs"`` or ``"csla"`` builds the other forms."""
    return RepOptVGG(BLOCKS_A, (0.75, 2.5), num_classes, mode=mode, cifar=cifar, **kw)


@register_model(family="repopt", paper=PAPER)
def repopt_vgg_a1(num_classes: int = 1000, cifar: bool = False, mode: str = "target", **kw: Any) -> RepOptVGG:
    """RepOpt-VGG-A1 target (plain) model."""
    return RepOptVGG(BLOCKS_A, (1.0, 2.5), num_classes, mode=mode, cifar=cifar, **kw)


@register_model(family="repopt", paper=PAPER)
def repopt_vgg_a2(num_classes: int = 1000, cifar: bool = False, mode: str = "target", **kw: Any) -> RepOptVGG:
    """RepOpt-VGG-A2 target (plain) model."""
    return RepOptVGG(BLOCKS_A, (1.5, 2.75), num_classes, mode=mode, cifar=cifar, **kw)


@register_model(family="repopt", paper=PAPER)
def repopt_vgg_b0(num_classes: int = 1000, cifar: bool = False, mode: str = "target", **kw: Any) -> RepOptVGG:
    """RepOpt-VGG-B0 target (plain) model."""
    return RepOptVGG(BLOCKS_B, (1.0, 2.5), num_classes, mode=mode, cifar=cifar, **kw)


@register_model(family="repopt", paper=PAPER)
def repopt_vgg_b1(num_classes: int = 1000, cifar: bool = False, mode: str = "target", **kw: Any) -> RepOptVGG:
    """RepOpt-VGG-B1 target (plain) model."""
    return RepOptVGG(BLOCKS_B, (2.0, 4.0), num_classes, mode=mode, cifar=cifar, **kw)


@register_model(family="repopt", paper=PAPER)
def repopt_vgg_a0_hs(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepOptVGG:
    """RepOpt-VGG-A0 hyper-search model (trainable scales)."""
    return RepOptVGG(BLOCKS_A, (0.75, 2.5), num_classes, mode="hs", cifar=cifar, **kw)


@register_model(family="repopt", paper=PAPER)
def repopt_vgg_a1_hs(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepOptVGG:
    """RepOpt-VGG-A1 hyper-search model (trainable scales)."""
    return RepOptVGG(BLOCKS_A, (1.0, 2.5), num_classes, mode="hs", cifar=cifar, **kw)


@register_model(family="repopt", paper=PAPER)
def repopt_vgg_a2_hs(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepOptVGG:
    """RepOpt-VGG-A2 hyper-search model (trainable scales)."""
    return RepOptVGG(BLOCKS_A, (1.5, 2.75), num_classes, mode="hs", cifar=cifar, **kw)


@register_model(family="repopt", paper=PAPER)
def repopt_vgg_b0_hs(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepOptVGG:
    """RepOpt-VGG-B0 hyper-search model (trainable scales)."""
    return RepOptVGG(BLOCKS_B, (1.0, 2.5), num_classes, mode="hs", cifar=cifar, **kw)


@register_model(family="repopt", paper=PAPER)
def repopt_vgg_b1_hs(num_classes: int = 1000, cifar: bool = False, **kw: Any) -> RepOptVGG:
    """RepOpt-VGG-B1 hyper-search model (trainable scales)."""
    return RepOptVGG(BLOCKS_B, (2.0, 4.0), num_classes, mode="hs", cifar=cifar, **kw)

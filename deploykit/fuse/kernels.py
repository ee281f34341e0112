"""Kernel algebra for re-parameterization: the one Conv+BN fold and friends.

Everything here works on float64 copies so that a chain of folds and merges loses no
precision before the final cast to the model's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn


@dataclass
class ConvTerm:
    """An affine map ``conv(input, weight, bias)`` of one graph node, in float64."""

    input: fx.Node
    weight: torch.Tensor  # [out, in // groups, kh, kw] (conv) or [out, in] (linear)
    bias: torch.Tensor  # [out]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    linear: bool = False
    sources: list[str] = field(default_factory=list)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * (1 if self.linear else self.groups)


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BN as y = x * scale + shift, per channel."""
    return affine_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def affine_scale_shift(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BN statistics as y = x * scale + shift, per channel, in float64."""
    var, mean = var.detach().double(), mean.detach().double()
    gamma = weight.detach().double() if weight is not None else torch.ones_like(var)
    beta = bias.detach().double() if bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + eps)
    return scale, beta - mean * scale


def negated(term: ConvTerm) -> ConvTerm:
    return replace(term, weight=-term.weight, bias=-term.bias)


def scale_term(term: ConvTerm, scale: torch.Tensor, shift: torch.Tensor | None, source: str) -> ConvTerm:
    """Apply a per-output-channel affine map ``y * scale + shift`` after the term."""
    view = (-1,) + (1,) * (term.weight.dim() - 1)
    weight = term.weight * scale.reshape(view)
    bias = term.bias * scale + (shift if shift is not None else 0.0)
    return replace(term, weight=weight, bias=bias, sources=[*term.sources, source])


def conv_term(node: fx.Node, conv: nn.Conv2d, name: str) -> ConvTerm | None:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
    return ConvTerm(
        input=node.args[0],
        weight=conv.weight.detach().to(torch.float64, copy=True),
        bias=bias.clone(),
        stride=tuple(conv.stride),
        padding=tuple(conv.padding),
        dilation=tuple(conv.dilation),
        groups=conv.groups,
        sources=[name],
    )


def linear_term(node: fx.Node, linear: nn.Linear, name: str) -> ConvTerm:
    bias = linear.bias.detach().double() if linear.bias is not None else torch.zeros(linear.out_features, dtype=torch.float64)
    return ConvTerm(
        input=node.args[0], weight=linear.weight.detach().to(torch.float64, copy=True), bias=bias.clone(), linear=True, sources=[name]
    )


def channelwise_term(input_node: fx.Node, scale: torch.Tensor, shift: torch.Tensor, source: str) -> ConvTerm:
    """``x * scale + shift`` per channel as a depthwise 1x1 conv (identity when scale=1, shift=0)."""
    channels = scale.numel()
    return ConvTerm(
        input=input_node,
        weight=scale.reshape(channels, 1, 1, 1).clone(),
        bias=shift.clone(),
        groups=channels,
        sources=[source],
    )


def _regroup(term: ConvTerm, groups: int) -> torch.Tensor:
    """The term's kernel rewritten for fewer groups (``groups`` divides ``term.groups``): block-diagonal."""
    if groups == term.groups:
        return term.weight
    out_ch, in_per_group, kh, kw = term.weight.shape
    in_ch = in_per_group * term.groups
    new_in_per_group = in_ch // groups
    out_per_old, out_per_new = out_ch // term.groups, out_ch // groups
    weight = term.weight.new_zeros(out_ch, new_in_per_group, kh, kw)
    for o in range(out_ch):
        first_in = (o // out_per_old) * in_per_group - (o // out_per_new) * new_in_per_group
        weight[o, first_in : first_in + in_per_group] = term.weight[o]
    return weight


def _centre_offset(term: ConvTerm) -> tuple[float, float] | None:
    kh, kw = term.weight.shape[2:]
    if kh % 2 == 0 or kw % 2 == 0:
        return None
    return (term.padding[0] - (kh - 1) / 2, term.padding[1] - (kw - 1) / 2)


def merge_reason(a: ConvTerm, b: ConvTerm) -> str | None:
    """Why two parallel terms cannot be summed into one, or None when they can."""
    if a.input is not b.input:
        return f"branches read different inputs ({a.input.name} vs {b.input.name}): a non-linear op inside a branch"
    if a.linear != b.linear:
        return "a linear and a convolution branch"
    if a.out_channels != b.out_channels or a.in_channels != b.in_channels:
        return "branches have different channel counts"
    if a.linear:
        return None
    if a.stride != b.stride:
        return "branches have different strides"
    if a.dilation != (1, 1) or b.dilation != (1, 1):
        return "dilated branches"
    offset_a, offset_b = _centre_offset(a), _centre_offset(b)
    if offset_a is None or offset_b is None or offset_a != offset_b:
        return "kernels are not centre-aligned (padding differs)"
    return None


def cost(term: ConvTerm) -> int:
    """Multiply-adds per output position: out * in / groups * kh * kw."""
    return int(term.weight.numel())


def merged_cost(a: ConvTerm, b: ConvTerm) -> int:
    if a.linear:
        return cost(a)
    groups = math.gcd(a.groups, b.groups)
    kh, kw = max(a.weight.shape[2], b.weight.shape[2]), max(a.weight.shape[3], b.weight.shape[3])
    return a.out_channels * (a.in_channels // groups) * kh * kw


def merge_terms(a: ConvTerm, b: ConvTerm) -> ConvTerm:
    """The single term equal to ``a + b`` (call ``merge_reason`` first)."""
    if a.linear:
        return replace(a, weight=a.weight + b.weight, bias=a.bias + b.bias, sources=a.sources + b.sources)
    groups = math.gcd(a.groups, b.groups)
    wa, wb = _regroup(a, groups), _regroup(b, groups)
    kh = max(wa.shape[2], wb.shape[2])
    kw = max(wa.shape[3], wb.shape[3])

    def pad(w: torch.Tensor) -> torch.Tensor:
        dh, dw = (kh - w.shape[2]) // 2, (kw - w.shape[3]) // 2
        return torch.nn.functional.pad(w, (dw, dw, dh, dh))

    offset = _centre_offset(a)
    padding = (int(offset[0] + (kh - 1) / 2), int(offset[1] + (kw - 1) / 2))
    return replace(
        a,
        weight=pad(wa) + pad(wb),
        bias=a.bias + b.bias,
        padding=padding,
        groups=groups,
        sources=a.sources + b.sources,
    )


def to_module(term: ConvTerm, dtype: torch.dtype) -> nn.Module:
    """Materialize a term as a plain nn.Conv2d / nn.Linear with bias."""
    if term.linear:
        module: nn.Module = nn.Linear(term.weight.shape[1], term.out_channels, bias=True)
    else:
        module = nn.Conv2d(
            term.in_channels,
            term.out_channels,
            kernel_size=tuple(term.weight.shape[2:]),
            stride=term.stride,
            padding=term.padding,
            dilation=term.dilation,
            groups=term.groups,
            bias=True,
        )
    with torch.no_grad():
        module.weight.copy_(term.weight.to(dtype))
        module.bias.copy_(term.bias.to(dtype))
    return module

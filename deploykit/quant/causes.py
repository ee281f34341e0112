"""Which known cause of an INT8 collapse applies to a layer (QARepVGG paper, Chu et al. 2024).

Per fused Conv/Linear, mapped to the train-time modules folded into it:

- BN |gamma| / sigma extremes (sigma = sqrt(running_var + eps)) of every BN folded in, with the
  module and the channels: an identity-branch BN over a dead channel has sigma ~ sqrt(eps),
  and |gamma|/sigma reached 692 and 1477 in the paper's RepVGG-A0;
- dead input channels (never non-zero on the calibration set) and the fused-kernel weights
  that multiply them: how much they widen their output channels' ranges;
- the per-output-channel weight range spread (max / median absmax): a per-tensor scale wastes
  the int8 grid on most channels.

``amplified`` (the rest of the network multiplies this layer's error) needs the logits and is
added by ``deploykit.quant.analyze``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deploykit.quant.dead_channels import dead_inputs, input_weights

BN_RATIO_EXTREME = 100.0  # |gamma|/sigma above this: a BN over a (near) constant channel
DEAD_INFLATION = 2.0  # dead-input weights at least double some output channel's range
RANGE_SPREAD_WIDE = 8.0  # max / median channel absmax: 3 of 8 bits lost to most channels
TOP_CHANNELS = 3
LIST_CHANNELS = 16
CAUSES = {
    # Set by deploykit.quant.analyze, which measures it (the layer's int8 output vs the logits).
    "amplified": "the layers after it amplify its int8 error",
    "bn_scale": "extreme BN |gamma|/sigma folded into the kernel",
    "dead_weights": "weights on always-zero input channels set the int8 range",
    "range_spread": "output channels' weight ranges differ widely",
}


@dataclass
class LayerCauses:
    bn_max_ratio: float | None = None
    bn_max_module: str | None = None
    bn_max_channels: list[int] = field(default_factory=list)  # the largest ratios first
    bn_min_ratio: float | None = None
    bn_min_module: str | None = None
    bn_min_channels: list[int] = field(default_factory=list)
    dead_inputs: int = 0
    dead_channels: list[int] = field(default_factory=list)  # the first LIST_CHANNELS
    dead_weight_absmax: float | None = None  # max |w| over weights multiplying dead inputs
    live_weight_absmax: float | None = None
    dead_range_inflation: float = 1.0  # max over output channels: absmax all weights / absmax live ones (inf: no live)
    dead_inflated_outputs: int = 0  # output channels whose range a dead-input weight sets
    range_spread: float = 1.0
    causes: list[str] = field(default_factory=list)


def _bn_ratio(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    gamma = bn.weight.detach().double().abs() if bn.weight is not None else torch.ones_like(bn.running_var.double())
    return gamma / (bn.running_var.double() + bn.eps).sqrt()


def _bn_extremes(sources: list[str], train_modules: dict[str, nn.Module], out: LayerCauses) -> None:
    for source in sources:
        if not source.startswith("bn:"):
            continue
        bn = train_modules.get(source[3:])
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
            continue
        ratio = _bn_ratio(bn)
        top = torch.argsort(ratio, descending=True)[:TOP_CHANNELS].tolist()
        low = torch.argsort(ratio)[:TOP_CHANNELS].tolist()
        if out.bn_max_ratio is None or float(ratio.max()) > out.bn_max_ratio:
            out.bn_max_ratio, out.bn_max_module, out.bn_max_channels = float(ratio.max()), source[3:], top
        if out.bn_min_ratio is None or float(ratio.min()) < out.bn_min_ratio:
            out.bn_min_ratio, out.bn_min_module, out.bn_min_channels = float(ratio.min()), source[3:], low


def _dead_figures(module: nn.Module, dead: torch.Tensor, out: LayerCauses) -> None:
    out.dead_inputs = int(dead.sum())
    out.dead_channels = torch.nonzero(dead).flatten()[:LIST_CHANNELS].tolist()
    if not out.dead_inputs:
        return
    weight = module.weight.detach().double().abs()
    on_dead = input_weights(module, dead)
    live = weight.masked_fill(on_dead, 0.0).reshape(weight.shape[0], -1).amax(1)
    full = weight.reshape(weight.shape[0], -1).amax(1)
    out.dead_weight_absmax = float(weight[on_dead].max())
    out.live_weight_absmax = float(live.max())
    # An output channel whose live weights are all zero gets its whole range from dead inputs: inf.
    inflation = torch.where(live > 0, full / live.clamp_min(torch.finfo(torch.float64).tiny),
                            torch.where(full > 0, torch.inf, 1.0))
    out.dead_range_inflation = float(inflation.max())
    out.dead_inflated_outputs = int((full > live).sum())


def layer_causes(
    model: nn.Module, calibration: Any, layers: dict[str, nn.Module], *, sources: dict[str, list[str]] | None = None,
    train_model: nn.Module | None = None, batch_size: int = 64,
) -> dict[str, LayerCauses]:
    """The cause figures of every layer in ``layers`` (modules of ``model``)."""
    dead = dead_inputs(model, calibration, batch_size=batch_size)
    train_modules = dict(train_model.named_modules()) if train_model is not None else {}
    found = {}
    for name, module in layers.items():
        out = LayerCauses()
        _bn_extremes((sources or {}).get(name, []), train_modules, out)
        if name in dead:
            _dead_figures(module, dead[name], out)
        absmax = module.weight.detach().double().abs().reshape(module.weight.shape[0], -1).amax(1)
        out.range_spread = float(absmax.max() / absmax.median().clamp_min(1e-300))
        if out.bn_max_ratio is not None and out.bn_max_ratio >= BN_RATIO_EXTREME:
            out.causes.append("bn_scale")
        if out.dead_range_inflation >= DEAD_INFLATION:
            out.causes.append("dead_weights")
        if out.range_spread >= RANGE_SPREAD_WIDE:
            out.causes.append("range_spread")
        found[name] = out
    return found

"""PyTorch fake quantization: the reference INT8 model, written as plain tensor math.

The scheme is the one ONNX Runtime's default static QDQ uses, so the reference and the
ORT rows of a report measure the same arithmetic:

- weights: signed int8, symmetric (zero point 0), range [-127, 127], scale = max|w| / 127,
  one scale per output channel (``per_channel=True``) or one per tensor;
- activations: the *input* of every Conv/Linear, unsigned uint8, asymmetric, per tensor,
  range = [min, max] over the calibration data (always including 0), MinMax calibration;
- biases, ReLU, pooling and the residual-free graph stay in float (their int32/requantize
  effects are orders of magnitude below the int8 rounding above).

``fake_quantize(model, ranges, layers=...)`` quantizes any subset of layers, which is how
``deploykit.quant.analyze`` measures one layer at a time and how mixed precision is scored.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from deploykit.errors import DeployError

WEIGHT_QMAX = 127  # symmetric int8 weights: [-127, 127]
ACT_LEVELS = 255  # uint8 activations: [0, 255]
QUANTIZABLE = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class ActRange:
    """Observed [low, high] of a tensor over the calibration data (0 always inside)."""

    low: float
    high: float

    @property
    def scale(self) -> float:
        return max(self.high - self.low, 1e-12) / ACT_LEVELS

    @property
    def zero_point(self) -> int:
        return int(round(-self.low / self.scale))


def weight_scale(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """max|w| / 127, per output channel (dim 0) or for the whole tensor, broadcastable to ``weight``."""
    w = weight.detach()
    if per_channel:
        absmax = w.abs().reshape(w.shape[0], -1).amax(1).reshape(-1, *([1] * (w.dim() - 1)))
    else:
        absmax = w.abs().amax().reshape([1] * w.dim())
    return absmax.clamp_min(1e-12) / WEIGHT_QMAX


def fake_quant_weight(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    scale = weight_scale(weight, per_channel)
    return (weight / scale).round().clamp(-WEIGHT_QMAX, WEIGHT_QMAX) * scale


def fake_quant_activation(x: torch.Tensor, act_range: ActRange) -> torch.Tensor:
    scale, zero_point = act_range.scale, act_range.zero_point
    return ((x / scale).round() + zero_point).clamp(0, ACT_LEVELS).sub(zero_point) * scale


def sqnr_db(reference: Any, quantized: Any) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum ref^2 / sum (ref - q)^2) in dB (inf if exact)."""
    ref = torch.as_tensor(np.asarray(reference) if not isinstance(reference, torch.Tensor) else reference).double()
    got = torch.as_tensor(np.asarray(quantized) if not isinstance(quantized, torch.Tensor) else quantized).double()
    noise = float(((ref - got) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d and Linear by module name, in definition order."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)}
    if not layers:
        raise DeployError(f"{type(model).__name__} has no Conv2d or Linear layers to quantize")
    return layers


def as_batches(inputs: Any, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        data = inputs
    else:
        data = torch.as_tensor(np.ascontiguousarray(inputs, dtype=np.float32))
    for start in range(0, len(data), batch_size):
        yield data[start : start + batch_size]


@torch.no_grad()
def observe_inputs(
    model: nn.Module, layers: dict[str, nn.Module], observe: Callable[[str], Callable[..., None]],
    inputs: Any, batch_size: int,
) -> None:
    """Run ``inputs`` through ``model`` (eval mode) with ``observe(name)`` as each layer's pre-hook."""
    handles = [m.register_forward_pre_hook(observe(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in as_batches(inputs, batch_size):
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


@torch.no_grad()
def calibrate_ranges(model: nn.Module, inputs: Any, *, batch_size: int = 64) -> dict[str, ActRange]:
    """MinMax range of each quantizable layer's input over ``inputs`` (N, C, H, W)."""
    if len(inputs) == 0:
        raise DeployError("calibration needs at least one sample; got 0")
    low: dict[str, float] = {}
    high: dict[str, float] = {}

    def observe(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            low[name] = min(low.get(name, 0.0), float(x.min()))
            high[name] = max(high.get(name, 0.0), float(x.max()))

        return hook

    observe_inputs(model, quantizable_layers(model), observe, inputs, batch_size)
    return {name: ActRange(low[name], high[name]) for name in low}


class FakeQuantLayer(nn.Module):
    """A Conv2d/Linear with fake-quantized weights and, when given a range, input."""

    def __init__(self, layer: nn.Module, act_range: ActRange | None, *, per_channel: bool, weights: bool) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer)
        if weights:
            with torch.no_grad():
                self.layer.weight.copy_(fake_quant_weight(layer.weight, per_channel))
        self.act_range = act_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x if self.act_range is None else fake_quant_activation(x, self.act_range))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def fake_quantize(
    model: nn.Module,
    ranges: dict[str, ActRange],
    *,
    layers: Iterable[str] | None = None,
    per_channel: bool = True,
    weights: bool = True,
    activations: bool = True,
) -> nn.Module:
    """A copy of ``model`` (eval mode) with ``layers`` (default: all) fake-quantized."""
    quantized = copy.deepcopy(model).eval()
    names = list(quantizable_layers(model)) if layers is None else list(layers)
    found = quantizable_layers(quantized)
    for name in names:
        if name not in found:
            raise DeployError(f"{name!r} is not a Conv2d/Linear of the model; layers: {', '.join(list(found)[:8])}...")
        act_range = ranges.get(name) if activations else None
        if activations and act_range is None:
            raise DeployError(f"no calibrated input range for layer {name!r}")
        set_submodule(quantized, name, FakeQuantLayer(found[name], act_range, per_channel=per_channel, weights=weights))
    return quantized


@torch.no_grad()
def predict(model: nn.Module, inputs: Any, *, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on ``inputs``, batched."""
    model.eval()
    return torch.cat([model(batch) for batch in as_batches(inputs, batch_size)])


def reference_top1(
    model: nn.Module,
    calibration: Any,
    data: Any,
    preprocessing: Any,
    *,
    split: str | None = "test",
    limit: int | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Top-1 on a labeled split of the FP32 model and of its fake-quantized INT8 references
    (per-tensor and per-channel weights), calibrated on ``calibration``: the report's PyTorch rows."""
    from deploykit.calib.sources import labeled_subset

    source, labels, indices = labeled_subset(data, split, limit, seed=0)
    ranges = calibrate_ranges(model, calibration)
    models = {
        "fp32": model.eval(),
        "int8_per_tensor": fake_quantize(model, ranges, per_channel=False),
        "int8_per_channel": fake_quantize(model, ranges, per_channel=True),
    }
    correct = dict.fromkeys(models, 0)
    for chunk, tensors in source.iter_load(indices, preprocessing, batch_size):
        for key, candidate in models.items():
            correct[key] += int((predict(candidate, tensors).argmax(1).numpy() == labels[chunk]).sum())
    return {"data": source.description, "count": len(indices),
            "top1": {key: hits / len(indices) for key, hits in correct.items()},
            "scheme": "int8 symmetric weights [-127, 127], uint8 asymmetric per-tensor layer inputs, MinMax"}

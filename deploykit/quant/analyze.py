"""Per-layer quantization diagnosis of a (fused) PyTorch model.

For every Conv2d/Linear:

- weight statistics: std overall, and for 3x3 kernels std at the centre and at the 8
  surrounding positions (the RepOptimizers paper, Sec. 4.3: structural re-parameterization
  piles the 1x1 and identity branches onto the centre, so the centre's spread dwarfs the
  rest and one int8 scale cannot serve both); per-output-channel absmax spread
  (max / median, max / min), kurtosis (Pearson; Gaussian = 3) and max|w| / std;
- weight SQNR, FP32 vs int8 fake-quant, per tensor and per channel (averaged over output
  channels in dB, so channels crushed by a shared scale show);
- input-activation SQNR and per-input-channel range spread over the calibration data;
- one layer at a time (everything else FP32): the layer's output SQNR, the largest shift of
  an output channel's mean (in that channel's std: what bias correction removes), the SQNR
  of the model's logits and the top-1 drop on labeled held-out samples; the logit SQNR below
  the layer's output SQNR (per output channel, averaged in dB, so channels a shared scale
  crushes count) is the error gain of the layers after it: 20 dB or more means the rest of
  the network amplifies small errors, and no fix of the layer's own weights brings it back;
- the whole model with every Conv/Linear input and weight rounded to bf16 (8 significant bits,
  no int8 at all): when that alone ruins the logits, the model cannot bear reduced precision
  and the cause is the network, not the int8 scheme.

The layers are ranked by logit SQNR (the damage one layer does alone) and each gets the fix
its figures point to. The arithmetic is ``deploykit.quant.fakequant``'s (ORT's default
scheme), so the ranking transfers to the backends.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from deploykit.errors import DeployError
from deploykit.quant.causes import LayerCauses, layer_causes
from deploykit.quant.fakequant import (
    ActRange, FakeQuantLayer, calibrate_ranges, fake_quant_activation, fake_quant_weight, fake_quantize,
    observe_inputs, predict, quantizable_layers, set_submodule, sqnr_db,
)

# Thresholds of the suggestions. Uniform int8 on a Gaussian with max/std = 4 gives ~41 dB;
# below 30 dB the rounding noise is ~3% of the signal.
WEIGHT_SQNR_OK_DB = 30.0
PER_CHANNEL_GAIN_DB = 6.0  # per-channel scales must buy at least one bit to be the fix
ACT_SPREAD_EQUALIZE = 8.0  # input channels whose ranges differ this much waste the int8 grid
BIAS_SHIFT_CORRECT = 0.05  # an output mean moved by 5% of its std: bias correction removes it
LOGIT_SQNR_OK_DB = 30.0  # a layer that alone keeps the logits above this (and top-1) does no real damage
AMPLIFIED_GAIN_DB = 20.0  # the logits 100x (power) noisier than the layer's own output: the network amplifies
BF16_OK_DB = 20.0  # bf16 rounds ~19 dB finer than int8: below this, int8 of the model has nothing left
FIXES = {
    "zero_dead": "zero the weights on always-zero input channels (exact)",
    "per_channel": "per-channel weight scales",
    "equalize": "cross-layer equalization with the previous layer",
    "bias_correction": "bias correction",
    "keep_fp": "keep in FP (mixed precision)",
    "none": "none needed",
}


@dataclass
class KernelStats:
    """Std (population) of 3x3 kernels, overall / centre / surrounding positions."""

    std: float
    std_centre: float
    std_surround: float

    @staticmethod
    def of(weights: list[torch.Tensor]) -> KernelStats | None:
        kernels = [w.detach().double() for w in weights if w.dim() == 4 and tuple(w.shape[2:]) == (3, 3)]
        if not kernels:
            return None
        flat = torch.cat([k.reshape(-1) for k in kernels])
        centre = torch.cat([k[:, :, 1, 1].reshape(-1) for k in kernels])
        mask = torch.ones(3, 3, dtype=torch.bool)
        mask[1, 1] = False
        surround = torch.cat([k[:, :, mask].reshape(-1) for k in kernels])
        return KernelStats(*(float(v.std(correction=0)) for v in (flat, centre, surround)))


@dataclass
class LayerReport:
    name: str  # module name in the analyzed model
    kind: str
    shape: list[int]
    sources: list[str]  # train-time modules fused into this layer ([] when unknown or unfused)
    kernel: KernelStats | None
    std: float
    kurtosis: float
    max_over_std: float
    range_spread: float  # per-output-channel absmax: max / median
    range_ratio: float  # max / min
    weight_sqnr_tensor_db: float
    weight_sqnr_channel_db: float
    act_range: list[float]
    act_sqnr_db: float
    act_channel_spread: float  # per-input-channel absmax of the input: max / median
    output_sqnr_db: float = math.nan
    bias_shift: float = math.nan
    logit_sqnr_db: float = math.nan
    output_channel_sqnr_db: float = math.nan  # per output channel, averaged in dB (capped at +-100)
    error_gain_db: float = math.nan  # output_channel_sqnr_db - logit_sqnr_db: what the layers after it add
    top1_drop: float | None = None  # points, this layer alone quantized
    previous: str | None = None  # the layer feeding this one through a ReLU (CLE partner), if any
    fixes: list[str] = field(default_factory=list)
    causes: LayerCauses | None = None  # BN |gamma|/sigma, dead inputs, range spread (deploykit.quant.causes)

    @property
    def fix(self) -> str:
        return self.fixes[0] if self.fixes else "none"


@dataclass
class Analysis:
    model: str
    per_channel: bool  # weight scheme of the one-layer-at-a-time sweep
    calibration: dict[str, Any]
    samples: int  # held-out samples the sweep is measured on
    labeled: bool
    kernels_deploy: KernelStats | None  # every 3x3 kernel of the analyzed model, pooled
    kernels_train: KernelStats | None  # the 3x3 conv weights before fusion (when given)
    fp32_top1: float | None
    int8_top1: dict[str, float | None]  # the whole model fake-quantized: per_tensor / per_channel
    int8_logit_sqnr_db: dict[str, float]
    bf16_logit_sqnr_db: float  # every Conv/Linear input and weight rounded to bf16, nothing in int8
    layers: list[LayerReport]
    ranking: list[str]  # layer names, most damaging first
    reference: dict[str, Any] | None = None  # fakequant.reference_top1 on a test split, when measured

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, layer in zip(data["layers"], self.layers):
            row["fix"] = layer.fix
            row["fix_text"] = FIXES[layer.fix]
        return _finite(data)


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _weight_figures(weight: torch.Tensor) -> dict[str, float]:
    w = weight.detach().double()
    flat = w.reshape(-1)
    std = float(flat.std(correction=0))
    centred = flat - flat.mean()
    kurtosis = float((centred**4).mean() / max(float((centred**2).mean()) ** 2, 1e-300))
    absmax = w.abs().reshape(w.shape[0], -1).amax(1)
    median = float(absmax.median())
    return {
        "std": std,
        "kurtosis": kurtosis,
        "max_over_std": float(flat.abs().max()) / max(std, 1e-300),
        "range_spread": float(absmax.max()) / max(median, 1e-300),
        "range_ratio": float(absmax.max()) / max(float(absmax.min()), 1e-300),
        "weight_sqnr_tensor_db": _channel_mean_sqnr(w, fake_quant_weight(w, per_channel=False)),
        "weight_sqnr_channel_db": _channel_mean_sqnr(w, fake_quant_weight(w, per_channel=True)),
    }


def _channel_mean_sqnr(weight: torch.Tensor, quantized: torch.Tensor) -> float:
    """SQNR of each output channel, averaged in dB: a channel that a shared scale rounds to zero
    counts as much as the large channel that set the scale (a whole-tensor SQNR hides it).
    Exact channels are capped at 100 dB so one of them cannot make the mean infinite."""
    values = [min(sqnr_db(w, q), 100.0) for w, q in zip(weight, quantized)]
    return float(np.mean(values))


@torch.no_grad()
def _activation_figures(
    model: nn.Module, inputs: Any, ranges: dict[str, ActRange], batch_size: int
) -> dict[str, dict[str, float]]:
    """Input-activation SQNR and per-input-channel spread of each layer, over ``inputs``."""
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    channel_max: dict[str, torch.Tensor] = {}

    def observe(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].double()
            q = fake_quant_activation(x, ranges[name])
            signal[name] = signal.get(name, 0.0) + float((x**2).sum())
            noise[name] = noise.get(name, 0.0) + float(((x - q) ** 2).sum())
            dims = [d for d in range(x.dim()) if d != 1]
            peak = x.abs().amax(dim=dims)
            channel_max[name] = torch.maximum(channel_max[name], peak) if name in channel_max else peak

        return hook

    observe_inputs(model, quantizable_layers(model), observe, inputs, batch_size)
    figures = {}
    for name in signal:
        peak = channel_max[name]
        snr = math.inf if noise[name] == 0 else 10 * math.log10(max(signal[name], 1e-300) / noise[name])
        figures[name] = {"act_sqnr_db": snr, "act_channel_spread": float(peak.max()) / max(float(peak.median()), 1e-12)}
    return figures


class _Probe(FakeQuantLayer):
    """A fake-quantized layer that also measures its own output against the float layer's."""

    def __init__(self, layer: nn.Module, act_range: ActRange, *, per_channel: bool) -> None:
        super().__init__(layer, act_range, per_channel=per_channel, weights=True)
        self.float_layer = layer
        self.signal = self.noise = 0.0
        self.channel_noise: torch.Tensor | None = None
        self.sum_fp: torch.Tensor | None = None
        self.sum_q: torch.Tensor | None = None
        self.sumsq_fp: torch.Tensor | None = None
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        ref = self.float_layer(x).double()
        q = out.double()
        self.signal += float((ref**2).sum())
        self.noise += float(((ref - q) ** 2).sum())
        dims = [d for d in range(ref.dim()) if d != 1]
        n = ref.numel() // ref.shape[1]
        s_fp, s_q, ss_fp = ref.sum(dims), q.sum(dims), (ref**2).sum(dims)
        noise = ((ref - q) ** 2).sum(dims)
        self.channel_noise = noise if self.channel_noise is None else self.channel_noise + noise
        self.sum_fp = s_fp if self.sum_fp is None else self.sum_fp + s_fp
        self.sum_q = s_q if self.sum_q is None else self.sum_q + s_q
        self.sumsq_fp = ss_fp if self.sumsq_fp is None else self.sumsq_fp + ss_fp
        self.count += n
        return out

    def figures(self) -> dict[str, float]:
        mean_fp, mean_q = self.sum_fp / self.count, self.sum_q / self.count
        std_fp = (self.sumsq_fp / self.count - mean_fp**2).clamp_min(0).sqrt().clamp_min(1e-12)
        snr = math.inf if self.noise == 0 else 10 * math.log10(max(self.signal, 1e-300) / self.noise)
        exact = self.channel_noise == 0
        per_channel = 10 * torch.log10(self.sumsq_fp.clamp_min(1e-300) / self.channel_noise.clamp_min(1e-300))
        per_channel = torch.where(exact, 100.0, per_channel).clamp(-100.0, 100.0)
        return {"output_sqnr_db": snr, "output_channel_sqnr_db": float(per_channel.mean()),
                "bias_shift": float(((mean_q - mean_fp).abs() / std_fp).max())}


def _rounded(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` whose Conv2d/Linear weights and inputs are rounded to ``dtype`` (computed in float32)."""
    rounded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for layer in quantizable_layers(rounded).values():
            layer.weight.copy_(layer.weight.to(dtype).float())
            layer.register_forward_pre_hook(lambda _, args: (args[0].to(dtype).float(), *args[1:]))
    return rounded


def _top1(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float((logits.argmax(1).numpy() == labels).mean())


def _previous_layers(model: nn.Module) -> dict[str, str]:
    """For each conv fed by another conv through one ReLU: the feeding conv (the CLE pairs)."""
    from deploykit.quant.equalize import conv_relu_conv_pairs

    try:
        return {second: first for first, second in conv_relu_conv_pairs(model)}
    except DeployError:
        return {}


def _suggest(layer: LayerReport) -> list[str]:
    fixes = []
    if layer.causes is not None and "amplified" in layer.causes.causes:
        fixes.append("keep_fp")  # a few dB more at its own output cannot offset the gain after it
    if layer.causes is not None and "dead_weights" in layer.causes.causes:
        fixes.append("zero_dead")
    if (layer.weight_sqnr_tensor_db < WEIGHT_SQNR_OK_DB
            and layer.weight_sqnr_channel_db - layer.weight_sqnr_tensor_db >= PER_CHANNEL_GAIN_DB):
        fixes.append("per_channel")
    if layer.previous is not None and layer.act_channel_spread >= ACT_SPREAD_EQUALIZE:
        fixes.append("equalize")
    if layer.bias_shift >= BIAS_SHIFT_CORRECT:
        fixes.append("bias_correction")
    if (layer.logit_sqnr_db < LOGIT_SQNR_OK_DB or (layer.top1_drop or 0.0) > 0.0) and "keep_fp" not in fixes:
        fixes.append("keep_fp")  # the fallback when the fixes above do not recover it
    return fixes or ["none"]


def analyze(
    model: nn.Module,
    calibration: Any,
    evaluation: Any,
    *,
    labels: np.ndarray | None = None,
    per_channel: bool = True,
    sources: dict[str, list[str]] | None = None,
    train_model: nn.Module | None = None,
    name: str = "model",
    calibration_info: dict[str, Any] | None = None,
    batch_size: int = 64,
) -> Analysis:
    """Diagnose ``model`` (eval mode, fused): ranges from ``calibration``, figures on ``evaluation``.

    ``labels`` (of ``evaluation``) turn the per-layer damage into top-1 drops; without them
    the drop is measured against the FP32 model's own predictions.
    """
    model = model.eval()
    if len(evaluation) == 0:
        raise DeployError("analysis needs evaluation samples; got 0")
    ranges = calibrate_ranges(model, calibration, batch_size=batch_size)
    layers = quantizable_layers(model)
    fp_logits = predict(model, evaluation)
    reference = labels if labels is not None else fp_logits.argmax(1).numpy()
    fp_top1 = _top1(fp_logits, reference)
    acts = _activation_figures(model, evaluation, ranges, batch_size)
    previous = _previous_layers(model)
    causes = layer_causes(model, calibration, layers, sources=sources, train_model=train_model, batch_size=batch_size)
    reports = []
    for layer_name, layer in layers.items():
        kind = "linear" if isinstance(layer, nn.Linear) else f"conv{layer.kernel_size[0]}x{layer.kernel_size[1]}"
        figures = _weight_figures(layer.weight)
        report = LayerReport(
            name=layer_name, kind=kind, shape=list(layer.weight.shape), sources=(sources or {}).get(layer_name, []),
            kernel=KernelStats.of([layer.weight]), act_range=[ranges[layer_name].low, ranges[layer_name].high],
            previous=previous.get(layer_name), causes=causes[layer_name], **figures, **acts[layer_name],
        )
        probed = fake_quantize(model, ranges, layers=[], per_channel=per_channel)
        probe = _Probe(layer, ranges[layer_name], per_channel=per_channel)
        set_submodule(probed, layer_name, probe)
        logits = predict(probed, evaluation)
        report.logit_sqnr_db = sqnr_db(fp_logits, logits)
        report.top1_drop = 100.0 * (fp_top1 - _top1(logits, reference))
        for key, value in probe.figures().items():
            setattr(report, key, value)
        report.error_gain_db = report.output_channel_sqnr_db - report.logit_sqnr_db
        if report.error_gain_db >= AMPLIFIED_GAIN_DB and report.logit_sqnr_db < LOGIT_SQNR_OK_DB:
            report.causes.causes.insert(0, "amplified")
        report.fixes = _suggest(report)
        reports.append(report)
    int8_top1: dict[str, float | None] = {}
    int8_sqnr: dict[str, float] = {}
    for scheme, channel in (("per_tensor", False), ("per_channel", True)):
        logits = predict(fake_quantize(model, ranges, per_channel=channel), evaluation)
        int8_top1[scheme] = _top1(logits, reference) if labels is not None else None
        int8_sqnr[scheme] = sqnr_db(fp_logits, logits)
    bf16_sqnr = sqnr_db(fp_logits, predict(_rounded(model, torch.bfloat16), evaluation))
    ranking = [r.name for r in sorted(reports, key=lambda r: (r.logit_sqnr_db, -(r.top1_drop or 0.0)))]
    train_kernels = None
    if train_model is not None:
        train_kernels = KernelStats.of([m.weight for m in train_model.modules() if isinstance(m, nn.Conv2d)])
    return Analysis(
        model=name, per_channel=per_channel, calibration=calibration_info or {"count": len(calibration)},
        samples=len(evaluation), labeled=labels is not None,
        kernels_deploy=KernelStats.of([m.weight for m in layers.values()]), kernels_train=train_kernels,
        fp32_top1=fp_top1 if labels is not None else None, int8_top1=int8_top1, int8_logit_sqnr_db=int8_sqnr,
        bf16_logit_sqnr_db=bf16_sqnr, layers=reports, ranking=ranking,
    )

"""Writes an ``Analysis`` as files: analysis.json, analysis.md, weights.png, activations.png.

Renders what ``deploykit.quant.analyze`` measured; computes nothing new except the histogram
samples (the weights and one batch of layer inputs of the layers shown).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from deploykit.files import atomic_dir
from deploykit.quant.analyze import BF16_OK_DB, FIXES, Analysis
from deploykit.quant.causes import CAUSES

# Quoted from the RepOptimizers paper (Ding et al., ICLR 2023; ImageNet-trained B1 models):
# std of 3x3 kernels overall / centre / surrounding. Shown beside ours, never mixed with them.
PAPER_KERNEL_STD = {
    "RepVGG-B1, fused (paper)": (0.0236, 0.0500, 0.0177),
    "RepVGG-B1, 3x3 branch before addition (paper)": (0.0176, 0.0175, 0.0177),
    "RepOpt-VGG-B1 (paper)": (0.0066, 0.0151, 0.0045),
}
HISTOGRAM_LAYERS = 8
HISTOGRAM_SAMPLES = 256


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def to_markdown(analysis: Analysis, *, top: int = 10) -> str:
    """The analysis as Markdown: headline figures, kernel statistics, ranked layers, all layers."""
    by_name = {layer.name: layer for layer in analysis.layers}
    scheme = "per-channel" if analysis.per_channel else "per-tensor"
    calib = analysis.calibration
    lines = [
        f"# Quantization analysis: {analysis.model}",
        "",
        f"Calibration: {calib.get('count')} samples from {calib.get('source', '-')} (seed {calib.get('seed', '-')}, "
        f"sha256 {str(calib.get('sha256', '-'))[:12]}). Figures on {analysis.samples} held-out "
        f"{'labeled ' if analysis.labeled else ''}samples. INT8 = PyTorch fake quantization "
        "(int8 symmetric weights, uint8 asymmetric per-tensor inputs of every Conv/Linear, MinMax).",
        "",
        "| model | top-1 (%) | logit SQNR (dB) |",
        "|---|---:|---:|",
        f"| FP32 | {_pct(analysis.fp32_top1)} | |",
        f"| INT8 fake-quant, per-tensor weights | {_pct(analysis.int8_top1.get('per_tensor'))} | "
        f"{_num(analysis.int8_logit_sqnr_db.get('per_tensor'), 1)} |",
        f"| INT8 fake-quant, per-channel weights | {_pct(analysis.int8_top1.get('per_channel'))} | "
        f"{_num(analysis.int8_logit_sqnr_db.get('per_channel'), 1)} |",
        f"| bf16 rounding of every Conv/Linear input and weight, no int8 | | {_num(analysis.bf16_logit_sqnr_db, 1)} |",
    ]
    if analysis.bf16_logit_sqnr_db < BF16_OK_DB:
        lines += ["", f"**The model itself does not bear reduced precision**: rounding to bf16 alone leaves the logits at "
                  f"{_num(analysis.bf16_logit_sqnr_db, 1)} dB SQNR (below {BF16_OK_DB:.0f} dB; bf16 rounds ~19 dB finer than int8). The layers after "
                  "a small error amplify it; no int8 scheme or weight fix can hold such a model: keep it in float, or "
                  "fix the network (its normalization statistics, its training)."]
    if analysis.reference:
        ref = analysis.reference
        lines += ["", f"On {ref['count']} images of {ref['data']}: FP32 {_pct(ref['top1']['fp32'])}%, "
                  f"INT8 per-tensor {_pct(ref['top1']['int8_per_tensor'])}%, "
                  f"INT8 per-channel {_pct(ref['top1']['int8_per_channel'])}% top-1."]
    lines += [
        "",
        "## 3x3 kernel statistics (std of all 3x3 kernels pooled)",
        "",
        "| kernels | std overall | std centre | std surrounding | centre / surrounding |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [("this model, deploy form (BN folded, branches merged)", analysis.kernels_deploy),
            ("this model, train-form 3x3 convs (before fusion)", analysis.kernels_train)]
    for label, k in rows:
        if k is not None:
            lines.append(f"| {label} | {k.std:.4f} | {k.std_centre:.4f} | {k.std_surround:.4f} | "
                         f"{k.std_centre / max(k.std_surround, 1e-12):.2f} |")
    for label, (std, centre, surround) in PAPER_KERNEL_STD.items():
        lines.append(f"| {label} | {std:.4f} | {centre:.4f} | {surround:.4f} | {centre / surround:.2f} |")
    lines += [
        "",
        f"## Layers that hurt most (each quantized alone, {scheme} weights)",
        "",
        "| rank | layer | fused from | logit SQNR (dB) | output SQNR per channel (dB) | error gain after it (dB) "
        "| top-1 drop (pts) | weight SQNR tensor / channel (dB) "
        "| input SQNR (dB) | input channel spread | bias shift | cause | suggested fix |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for rank, name in enumerate(analysis.ranking[:top], 1):
        layer = by_name[name]
        # BNs folded into a conv are implied; an identity branch (a BN alone) is named.
        kept = [s for s in layer.sources if not s.startswith("bn:") or "identity" in s]
        sources = ", ".join(s.split(":", 1)[-1] for s in kept) or "-"
        fix = FIXES[layer.fix] + (f" ({layer.previous})" if layer.fix == "equalize" and layer.previous else "")
        lines.append(
            f"| {rank} | `{name}` | {sources} | {_num(layer.logit_sqnr_db, 1)} | {_num(layer.output_channel_sqnr_db, 1)} | "
            f"{_num(layer.error_gain_db, 1)} | {_num(layer.top1_drop)} | "
            f"{_num(layer.weight_sqnr_tensor_db, 1)} / {_num(layer.weight_sqnr_channel_db, 1)} | "
            f"{_num(layer.act_sqnr_db, 1)} | {_num(layer.act_channel_spread, 1)} | {_num(layer.bias_shift, 3)} | "
            f"{_causes(layer)} | {fix} |"
        )
    lines += _causes_table(analysis)
    lines += [
        "",
        "## Weight statistics, every layer",
        "",
        "| layer | kind | shape | std | std centre | std surrounding | range spread (max/median) | "
        "range ratio (max/min) | kurtosis | max/std |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layer in analysis.layers:
        k = layer.kernel
        lines.append(
            f"| `{layer.name}` | {layer.kind} | {'x'.join(map(str, layer.shape))} | {layer.std:.4f} | "
            f"{_num(k.std_centre if k else None, 4)} | {_num(k.std_surround if k else None, 4)} | "
            f"{_num(layer.range_spread, 1)} | {_num(layer.range_ratio, 1)} | {_num(layer.kurtosis, 1)} | "
            f"{_num(layer.max_over_std, 1)} |"
        )
    lines += ["", "Histograms: `weights.png` and `activations.png` (the ranked layers above).", ""]
    return "\n".join(lines)


def _causes(layer: Any) -> str:
    found = layer.causes.causes if layer.causes is not None else []
    return "; ".join(CAUSES[c] for c in found) or "-"


def _channels(channels: list[int]) -> str:
    return ", ".join(map(str, channels)) or "-"


def _causes_table(analysis: Analysis) -> list[str]:
    """BN |gamma|/sigma extremes, dead input channels and their weights, range spread: every layer."""
    lines = [
        "",
        "## Causes, every layer",
        "",
        "BN |gamma|/sigma of every BN folded into the layer (sigma = sqrt(running var + eps); the QARepVGG "
        "paper saw 692 and 1477 in RepVGG-A0). Dead inputs: input channels exactly 0 on every calibration "
        "sample; the weights on them do nothing in FP32 but widen the int8 range of their output channel "
        "by the inflation shown.",
        "",
        "| layer | max \|gamma\|/sigma (BN: channels) | min \|gamma\|/sigma (BN: channels) | dead inputs "
        "(channels) | max \|w\| on dead / live inputs | range inflation (outputs) | channel range spread | cause |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for layer in analysis.layers:
        c = layer.causes
        if c is None:
            continue
        high = f"{_num(c.bn_max_ratio, 1)} (`{c.bn_max_module}`: {_channels(c.bn_max_channels)})" if c.bn_max_module else "-"
        low = f"{_num(c.bn_min_ratio, 3)} (`{c.bn_min_module}`: {_channels(c.bn_min_channels)})" if c.bn_min_module else "-"
        more = "..." if c.dead_inputs > len(c.dead_channels) else ""
        dead = f"{c.dead_inputs} ({_channels(c.dead_channels)}{more})" if c.dead_inputs else "0"
        weights = f"{_num(c.dead_weight_absmax, 3)} / {_num(c.live_weight_absmax, 3)}" if c.dead_inputs else "-"
        inflation = f"{_num(c.dead_range_inflation, 1)} ({c.dead_inflated_outputs})" if c.dead_inputs else "-"
        lines.append(f"| `{layer.name}` | {high} | {low} | {dead} | {weights} | {inflation} | "
                     f"{_num(c.range_spread, 1)} | {_causes(layer)} |")
    return lines


def _histograms(model: Any, names: list[str], inputs: Any, weights_png: Path, activations_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from deploykit.quant.fakequant import as_batches

    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(
        lambda m, args, n=n: captured.__setitem__(n, args[0].detach().reshape(-1))) for n in names]
    try:
        with torch.no_grad():
            model.eval()(next(iter(as_batches(inputs[:HISTOGRAM_SAMPLES], HISTOGRAM_SAMPLES))))
    finally:
        for handle in handles:
            handle.remove()
    for path, values, xlabel in (
        (weights_png, {n: modules[n].weight.detach().reshape(-1) for n in names}, "weight"),
        (activations_png, captured, "input activation"),
    ):
        cols = min(4, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            ax.hist(values[name].numpy(), bins=101, log=True, color="#3b6ea5")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def write_analysis(analysis: Analysis, out: Path, *, model: Any = None, inputs: Any = None, force: bool = False,
                   top: int = 10) -> Path:
    """Write the analysis into ``out`` (atomically); histograms when ``model`` and ``inputs`` are given."""
    with atomic_dir(Path(out), force=force) as tmp:
        (tmp / "analysis.json").write_text(json.dumps(analysis.to_dict(), indent=2) + "\n")
        (tmp / "analysis.md").write_text(to_markdown(analysis, top=top))
        if model is not None and inputs is not None:
            shown = analysis.ranking[:HISTOGRAM_LAYERS]
            _histograms(model, shown, inputs, tmp / "weights.png", tmp / "activations.png")
    return Path(out)

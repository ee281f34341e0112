"""Renders reports/quantization-repvgg-vs-repopt.md from what scripts/quant_report.sh measured.

Reads only the JSON the pipeline wrote under WORK (train.json, pipeline.json, build.json,
eval JSON, analysis.json, latency JSON); a missing file shows as "not measured", never as a
number. The only figures computed here are differences of measured ones (drops) and the
drop chart. Layout of WORK (scripts/quant_report.sh)::

    train/repvgg/            deploykit train          train/repopt/{hs,target}/, pipeline.json
    build/<m>-<scheme>/      deploykit build          eval/<m>-<scheme>.json   deploykit eval --json
    analysis/<m>/            deploykit analyze        maxdrop/<m>-<target>/    build --max-drop
    latency/<m>-<target>.json                         deploykit bench --artifact DIR ... --results

    python -m deploykit.report.quant_study WORK --script scripts/quant_report.sh --out REPORT.md
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.report.analysis import PAPER_KERNEL_STD

MODELS = {"repvgg": "RepVGG-A0 (fused)", "repopt": "RepOpt-VGG-A0", "qarepvgg": "QARepVGG-A0 (fused)"}
# The kept checkpoint of each run (deploykit train --keep-every), below WORK/train/.
KEPT = {"repvgg": "repvgg/checkpoints", "repopt": "repopt/target/checkpoints", "qarepvgg": "qarepvgg/checkpoints"}
TREND_SCHEMES = (("torch-fp32", "PyTorch FP32"), ("onnxruntime-int8-tensor", "ORT INT8 per-tensor"),
                 ("onnxruntime-int8-channel", "ORT INT8 per-channel"))
SCHEMES = [  # (eval/build name, backend, scheme)
    ("onnxruntime-fp32", "onnxruntime", "FP32"),
    ("onnxruntime-int8-tensor", "onnxruntime", "INT8 per-tensor weights"),
    ("onnxruntime-int8-channel", "onnxruntime", "INT8 per-channel weights"),
    ("openvino-fp32", "openvino", "FP32"),
    ("openvino-int8", "openvino", "INT8 (NNCF PTQ)"),
    ("mnn-fp32", "mnn", "FP32"),
    ("mnn-int8", "mnn", "INT8 (MNN quantizer, EMA)"),
    ("tensorrt-int8-qdq", "tensorrt (Q/DQ ONNX run on onnxruntime; no engine)",
     "INT8 explicit Q/DQ, symmetric, per-channel weights"),
]
TARGETS = ("onnxruntime", "openvino", "mnn")
NOT_MEASURED = "not measured"


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _pct(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{100 * value:.2f}"


def _drop(fp32: float | None, int8: float | None) -> str:
    return "-" if fp32 is None or int8 is None else f"{100 * (fp32 - int8):+.2f}"


def _top1(work: Path, name: str) -> float | None:
    data = _load(work / "eval" / f"{name}.json")
    return None if data is None else data["top1"]


def _device(work: Path) -> list[str]:
    """Machine and tool versions, as the builds recorded them."""
    for path in sorted(work.glob("build/*/build.json")):
        meta = _load(path) or {}
        device, versions = meta.get("device"), meta.get("versions")
        if device and versions:
            cores = device.get("usable_cores") or device.get("logical_cores")
            return [f"Device: {device.get('cpu')} ({device.get('arch')}, {', '.join(device.get('isa', []))}), "
                    f"{cores} cores, {device.get('memory_bytes', 0) / 2**30:.0f} GiB, {device.get('os')}; "
                    f"no GPU used. Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}.", ""]
    return [f"Device: {NOT_MEASURED}.", ""]


def _training(work: Path) -> list[str]:
    lines = ["## Training", "", "| model | stage | epochs | images | time (min) | s / epoch | val top-1 (%) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    runs = [("repvgg", "SGD", work / "train/repvgg/train.json"),
            ("repopt", "hyper-search (trainable scales)", work / "train/repopt/hs/train.json"),
            ("repopt", "target, RepOptimizer", work / "train/repopt/target/train.json"),
            ("qarepvgg", "SGD (plain L2)", work / "train/qarepvgg/train.json")]
    settings = None
    for model, stage, path in runs:
        summary = _load(path)
        if summary is None:
            lines.append(f"| {MODELS[model]} | {stage} | {NOT_MEASURED} | | | | |")
            continue
        settings = settings or summary
        lines.append(f"| {MODELS[model]} | {stage} | {len(summary['history'])} | {summary['data']['train_images']} | "
                     f"{summary['train_seconds'] / 60:.1f} | {summary['seconds_per_epoch']:.0f} | "
                     f"{_pct(summary['final_val_top1'])} |")
    pipeline = _load(work / "train/repopt/pipeline.json")
    if pipeline:
        lines += ["", f"RepOpt-VGG in total (hyper-search + target): {pipeline['total_train_seconds'] / 60:.1f} min."]
    if settings:
        c, spec = settings["config"], settings["model"]
        schedule = ("one-cycle (linear up to the peak, down to 0)" if c.get("schedule") == "onecycle"
                    else f"cosine to 0 with {c['warmup_epochs']} warmup epoch(s)")
        fast = [f"autocast {settings['precision']}" if settings.get("precision", "fp32") != "fp32" else "",
                f"EMA of the weights (decay {c['ema']}), validated and saved" if c.get("ema") else "",
                "validation on each image and its mirror image" if c.get("tta_flip") else ""]
        lines += ["", f"Recipe (every model): width multiplier {spec.get('width', 1.0)} on the A0 layout, "
                  f"batch {c['batch_size']}, SGD Nesterov momentum {c['momentum']}, lr {c['lr']} {schedule}, "
                  f"weight decay {c['weight_decay']} (conv/linear weights"
                  f"{'; RepVGG: on the equivalent kernel, the official custom L2' if c.get('custom_l2') else ''}), "
                  f"label smoothing {c['label_smoothing']}, {settings['augmentation']}, seed {c['seed']}, "
                  f"{c['threads']} threads, torch {settings['torch']}"
                  + "".join(f", {x}" for x in fast if x) + f". Validation: {settings['data']['val']} "
                  f"({settings['data']['val_images']} images; the top-1 column above, with the mirror images "
                  "when so validated — the test-split tables below use plain images)."]
    return lines + [""]


def _accuracy(work: Path) -> tuple[list[str], dict[str, dict[str, float | None]]]:
    lines = ["## Top-1 on the CIFAR-10 test split", "",
             "| model | backend | scheme | top-1 (%) | drop vs PyTorch FP32 (points) |", "|---|---|---|---:|---:|"]
    table: dict[str, dict[str, float | None]] = {}
    calibration = None
    for model, label in MODELS.items():
        fp32 = _top1(work, f"{model}-torch-fp32")
        table[model] = {"fp32": fp32}
        lines.append(f"| {label} | PyTorch | FP32 | {_pct(fp32)} | |")
        reference = (_load(work / f"analysis/{model}/analysis.json") or {}).get("reference")
        for key, scheme in (("int8_per_tensor", "INT8 fake-quant, per-tensor weights"),
                            ("int8_per_channel", "INT8 fake-quant, per-channel weights")):
            value = reference["top1"][key] if reference else None
            table[model][f"torch-{key}"] = value
            lines.append(f"| {label} | PyTorch reference | {scheme} | {_pct(value)} | {_drop(fp32, value)} |")
        for name, backend, scheme in SCHEMES:
            value = _top1(work, f"{model}-{name}")
            table[model][name] = value
            lines.append(f"| {label} | {backend} | {scheme} | {_pct(value)} | {_drop(fp32, value)} |")
            build = _load(work / "build" / f"{model}-{name}" / "build.json")
            calibration = calibration or (build or {}).get("calibration")
    if calibration:
        lines += ["", f"Calibration (every INT8 row): {calibration['count']} images from {calibration['source']}, "
                  f"seed {calibration['seed']}, sha256 {calibration['sha256'][:16]}…; "
                  "the same tensors for each backend."]
    return lines + [""], table


def _kernels(work: Path) -> list[str]:
    lines = ["## 3x3 kernel statistics next to the paper's", "",
             "| kernels | std overall | std centre | std surrounding | centre / surrounding |",
             "|---|---:|---:|---:|---:|"]
    for model, label in MODELS.items():
        analysis = _load(work / f"analysis/{model}/analysis.json")
        if analysis is None:
            lines.append(f"| {label} | {NOT_MEASURED} | | | |")
            continue
        for key, form in (("kernels_deploy", "deploy form (BN folded, branches merged)"),
                          ("kernels_train", "train-form 3x3 convs")):
            k = analysis.get(key)
            if k:
                lines.append(f"| {label}, {form} | {k['std']:.4f} | {k['std_centre']:.4f} | {k['std_surround']:.4f} | "
                             f"{k['std_centre'] / k['std_surround']:.2f} |")
    for label, (std, centre, surround) in PAPER_KERNEL_STD.items():
        lines.append(f"| {label} | {std:.4f} | {centre:.4f} | {surround:.4f} | {centre / surround:.2f} |")
    return lines + ["", "Ours: CIFAR-10, A0 layout at reduced width, std over all 3x3 kernels of the model pooled; "
                    "the paper: ImageNet-trained B1.", ""]


def _copy_analysis(work: Path, folder: Path) -> dict[str, list[str]]:
    """The per-model analysis files beside the report (WORK is not committed); returns relative paths."""
    copied: dict[str, list[str]] = {}
    for model in MODELS:
        for name in ("analysis.md", "weights.png", "activations.png"):
            src = work / f"analysis/{model}/{name}"
            if src.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                dst = folder / f"{model}-{name}"
                shutil.copyfile(src, dst)
                copied.setdefault(model, []).append(f"{folder.name}/{dst.name}")
    return copied


def _diagnosis(work: Path, copied: dict[str, list[str]], top: int = 5) -> list[str]:
    lines = ["## Diagnosis: the layers that hurt most", ""]
    for model, label in MODELS.items():
        analysis = _load(work / f"analysis/{model}/analysis.json")
        if analysis is None:
            lines += [f"{label}: {NOT_MEASURED}.", ""]
            continue
        scheme = "per-channel" if analysis["per_channel"] else "per-tensor"
        layers = {layer["name"]: layer for layer in analysis["layers"]}
        files = ", ".join(f"[{Path(f).name}]({f})" for f in copied.get(model, []))
        lines += [f"**{label}** (each layer quantized alone, {scheme} weights; full analysis and histograms: "
                  f"{files or NOT_MEASURED}):", "",
                  "| rank | layer | logit SQNR (dB) | top-1 drop (pts) | weight SQNR tensor / channel (dB) | fix |",
                  "|---:|---|---:|---:|---:|---|"]
        for rank, name in enumerate(analysis["ranking"][:top], 1):
            layer = layers[name]
            lines.append(f"| {rank} | `{name}` | {float(layer['logit_sqnr_db']):.1f} | {layer['top1_drop']:.2f} | "
                         f"{float(layer['weight_sqnr_tensor_db']):.1f} / "
                         f"{float(layer['weight_sqnr_channel_db']):.1f} | "
                         f"{layer['fix_text']} |")
        lines.append("")
    return lines


def _max_drop(work: Path, table: dict[str, dict[str, float | None]]) -> list[str]:
    lines = ["## The max-drop fix", "",
             "| model | backend | plain INT8 (%) | max-drop INT8 (%) | FP32 (%) | gap closed | recipe "
             "| latency FP32 / INT8 / max-drop (ms) [round range] |", "|---|---|---:|---:|---:|---:|---|---|"]
    plain_name = {"onnxruntime": "onnxruntime-int8-tensor", "openvino": "openvino-int8", "mnn": "mnn-int8"}
    for model, label in MODELS.items():
        fp32 = table[model].get("fp32")
        for target in TARGETS:
            plain, fixed = table[model].get(plain_name[target]), _top1(work, f"{model}-maxdrop-{target}")
            build = _load(work / f"maxdrop/{model}-{target}/build.json") or {}
            found = build.get("max_drop") or {}
            recipe = found.get("recipe") or {}
            parts = [k for k in ("equalize", "bias_correction") if recipe.get(k)]
            if recipe.get("float_layers"):
                parts.append(f"float: {', '.join(recipe['float_layers'])}")
            steps = [s["step"] for s in found.get("steps", []) if s.get("adopted")]
            if steps:
                parts.append(f"adopted steps: {' → '.join(steps)}")
            control = (build.get("backend") or {}).get("accuracy_control")
            if control:  # OpenVINO: NNCF's own loop, which reverts the worst layers to float
                parts.append(f"NNCF quantize_with_accuracy_control, max_drop {control['max_drop']} "
                             f"on {control['samples']} held-out images")
            failed = work / f"maxdrop/{model}-{target}.failed"
            if not build and failed.is_file():
                parts.append(f"no recipe within budget ({failed.read_text().strip() or 'see the build log'})")
            recipe_text = ", ".join(parts) or NOT_MEASURED
            gap = "-"
            budget = found.get("max_drop_points") or (100 * control["max_drop"] if control else None)
            if None not in (fp32, plain) and budget is not None and 100 * (fp32 - plain) <= budget:
                gap = "none to close (plain INT8 within budget)"
            elif None not in (fp32, plain, fixed) and fp32 - plain > 0:
                gap = f"{100 * (fixed - plain) / (fp32 - plain):.0f}%"
            rows = _load(work / f"latency/{model}-{target}.json") or []
            latency = {Path(row["artifact"]).resolve(): row for row in rows}
            ms = [latency.get((work / d).resolve()) for d in (f"build/{model}-{target}-fp32",
                                                              f"build/{model}-{plain_name[target]}",
                                                              f"maxdrop/{model}-{target}")]
            ms_text = " / ".join("-" if row is None else
                                 f"{row['median_ms']:.3f} [{min(row['round_medians_ms']):.3f}, "
                                 f"{max(row['round_medians_ms']):.3f}]" for row in ms)
            fixed_text = "none within budget" if not build and failed.is_file() else _pct(fixed)
            lines.append(f"| {label} | {target} | {_pct(plain)} | {fixed_text} | {_pct(fp32)} | {gap} | "
                         f"{recipe_text} | {ms_text} |")
    return lines + ["", "Recipes are chosen on held-out training images (the test split is not used to choose); "
                    "gap closed = (max-drop - plain) / (FP32 - plain). Latency: batch 1, 2 threads, median of "
                    "interleaved rounds with the range of the round medians; at these sub-millisecond latencies "
                    "differences inside the ranges are noise.", ""]


NOISE_POINTS = 1.0  # differences of top-1 drops below this are not called a difference (10,000 test images)
PAPER_DROPS = {"repvgg": (78.4, 54.55), "repopt": (78.47, 75.89)}  # RepOptimizers paper, B1, ImageNet PTQ
PAPER_QA_DROPS = {"repvgg": (72.4, 52.2), "qarepvgg": (72.2, 70.4)}  # QARepVGG paper (AAAI 2024), A0, ImageNet PTQ


def _summary(work: Path, table: dict[str, dict[str, float | None]]) -> list[str]:
    """The verdict on the paper's claim, computed from the measured drops (never typed)."""
    lines = ["## Summary", ""]
    fp32 = {m: table[m].get("fp32") for m in ("repvgg", "repopt")}  # the paper's claim compares these two
    if None in fp32.values():
        return lines + _partial_summary(table) + [""]
    qa = table.get("qarepvgg", {}).get("fp32")  # the third model, beside the two the claim compares
    every = [*fp32.values(), *([qa] if qa is not None else [])]
    lines.append(f"- FP32 top-1: {MODELS['repvgg']} {_pct(fp32['repvgg'])}%, {MODELS['repopt']} "
                 f"{_pct(fp32['repopt'])}%" + (f", {MODELS['qarepvgg']} {_pct(qa)}%" if qa is not None else "")
                 + f" (the issue aims at ≥ 90% for {'all three' if qa is not None else 'both'}"
                 f"{'; reached' if min(every) >= 0.90 else '; not reached with this budget'}).")
    paper = {m: f"{a:.2f} → {b:.2f} ({a - b:+.2f})" for m, (a, b) in PAPER_DROPS.items()}
    lines.append(f"- The paper (B1, ImageNet, INT8 PTQ): RepVGG {paper['repvgg']}, RepOpt-VGG {paper['repopt']}.")
    if qa is not None:
        paper = {m: f"{a:.2f} → {b:.2f} ({a - b:+.2f})" for m, (a, b) in PAPER_QA_DROPS.items()}
        lines.append(f"- The QARepVGG paper (A0, ImageNet, INT8 PTQ): RepVGG {paper['repvgg']}, "
                     f"QARepVGG {paper['qarepvgg']}.")
    verdicts = []
    schemes = [(n, b, sc) for n, b, sc in SCHEMES if not n.endswith("-fp32")]
    schemes = [("torch-int8_per_tensor", "PyTorch reference", "fake-quant per-tensor"),
               ("torch-int8_per_channel", "PyTorch reference", "fake-quant per-channel"), *schemes]
    for name, backend, scheme in schemes:
        a, b = table["repvgg"].get(name), table["repopt"].get(name)
        if a is None or b is None:
            continue
        drop_a, drop_b = 100 * (fp32["repvgg"] - a), 100 * (fp32["repopt"] - b)
        if drop_a - drop_b >= NOISE_POINTS:
            verdict = "RepVGG loses more"
        elif drop_b - drop_a >= NOISE_POINTS:
            verdict = "RepOpt-VGG loses more"
        else:
            verdict = f"no difference beyond {NOISE_POINTS:.0f} point"
        verdicts.append(verdict)
        c = table.get("qarepvgg", {}).get(name)
        third = f", QARepVGG {100 * (qa - c):+.2f}" if qa is not None and c is not None else ""
        lines.append(f"- {backend}, {scheme}: drop RepVGG {drop_a:+.2f}, RepOpt-VGG {drop_b:+.2f}{third} points: "
                     f"{verdict}.")
    if verdicts:
        held = sum(v == "RepVGG loses more" for v in verdicts)
        if held == 0:
            lines += ["", f"The paper's accuracy pattern (RepVGG loses far more top-1 than RepOpt-VGG) does not appear "
                      f"in any of the {len(verdicts)} INT8 schemes measured here (CIFAR-10, A0 layout at reduced "
                      "width, the training budget above); whether it appears after longer training is not measured."]
        else:
            lines += ["", f"The paper's accuracy pattern (RepVGG quantizes worse than RepOpt-VGG) appears in {held} "
                      f"of {len(verdicts)} INT8 schemes measured here."]
    lines += _mechanism(work)
    return lines + [""]


def _partial_summary(table: dict[str, dict[str, float | None]]) -> list[str]:
    """Without both RepVGG and RepOpt-VGG there is no verdict on the claim; say what was measured."""
    missing = " and ".join(MODELS[m] for m in ("repvgg", "repopt") if table[m].get("fp32") is None)
    lines = [f"No verdict on RepVGG vs RepOpt-VGG: {missing} {NOT_MEASURED}."]
    schemes = [(n, b, sc) for n, b, sc in SCHEMES if not n.endswith("-fp32")]
    for model, label in MODELS.items():
        fp32 = table[model].get("fp32")
        if fp32 is None:
            continue
        drops = {f"{b} {sc}": 100 * (fp32 - table[model][n]) for n, b, sc in schemes if table[model].get(n) is not None}
        if not drops:
            continue
        worst = max(drops, key=drops.get)
        over = [k for k, d in drops.items() if d > NOISE_POINTS]
        lines.append(f"- {label}: FP32 top-1 {_pct(fp32)}% (the issue aims at ≥ 90%"
                     f"{'; reached' if fp32 >= 0.90 else '; not reached with this budget'}); worst INT8 drop "
                     f"{drops[worst]:+.2f} points ({worst}); "
                     + (f"{len(over)} of {len(drops)} schemes lose more than {NOISE_POINTS:.0f} point: {', '.join(over)}."
                        if over else f"no scheme of {len(drops)} loses more than {NOISE_POINTS:.0f} point: "
                        "no INT8 collapse at this accuracy."))
    return lines


MECHANISM = [  # (analysis layer key, label): medians over the model's layers
    ("kurtosis", "weight kurtosis"), ("max_over_std", "weight max / std"),
    ("weight_sqnr_tensor_db", "weight SQNR, per-tensor (dB)"), ("weight_sqnr_channel_db", "weight SQNR, per-channel (dB)"),
    ("act_sqnr_db", "input-activation SQNR (dB)"),
]


def _named_fix(work: Path, table: dict[str, dict[str, float | None]]) -> list[str]:
    """deploykit build --int8-fix repvgg (no budget): top-1 per backend (eval/MODEL-fix-TARGET.json)."""
    rows = []
    for model, label in MODELS.items():
        fp32 = table.get(model, {}).get("fp32")
        for target in TARGETS:
            value = _top1(work, f"{model}-fix-{target}")
            if value is not None:
                rows.append(f"| {label} | {target} | {_pct(value)} | {_drop(fp32, value)} |")
    if not rows:
        return []
    return ["## The named fix, no budget (`--int8-fix repvgg`)", "",
            "Weights on always-zero input channels zeroed (exact on the calibration set), per-channel weights, "
            "cross-layer equalization, bias correction.", "",
            "| model | backend | top-1 (%) | drop vs PyTorch FP32 (points) |", "|---|---|---:|---:|", *rows, ""]


def _trend(work: Path) -> list[str]:
    """Top-1 of every kept checkpoint (eval/MODEL-epoch-NNN-SCHEME.json): how the INT8 drop grows with training."""
    rows = []
    for model, label in MODELS.items():
        for kept in sorted((work / "train" / KEPT[model]).glob("epoch-*.safetensors")):
            epoch = kept.stem
            values = [_top1(work, f"{model}-{epoch}-{name}") for name, _ in TREND_SCHEMES]
            fp32 = values[0]
            cells = [_pct(fp32)] + [f"{_pct(v)} ({_drop(fp32, v)})" for v in values[1:]]
            rows.append(f"| {label} | {int(epoch.split('-')[1])} | {' | '.join(cells)} |")
    if not rows:
        return []
    header = " | ".join(f"{text} (%)" if i == 0 else f"{text} (%, drop)" for i, (_, text) in enumerate(TREND_SCHEMES))
    return ["## The INT8 drop over training (kept checkpoints, CIFAR-10 test split)", "",
            f"| model | epoch | {header} |", "|---|---:|" + "---:|" * len(TREND_SCHEMES), *rows, ""]


def _mechanism(work: Path) -> list[str]:
    """Weight statistics behind the drops: medians over layers, and the whole model's INT8 logit SQNR."""
    loaded = {m: _load(work / f"analysis/{m}/analysis.json") for m in MODELS}
    analyses = {m: a for m, a in loaded.items() if a is not None}
    if "repvgg" not in analyses or "repopt" not in analyses:
        return []
    lines = ["", "What the diagnosis measures behind these drops (`deploykit analyze`, median over the "
             "model's conv/linear layers; logit SQNR: the whole model fake-quantized):", "",
             f"| statistic | {' | '.join(MODELS[m] for m in analyses)} |", "|---|---:|---:|"]
    for key, label in MECHANISM:
        cells = []
        for analysis in analyses.values():
            values = [float(layer[key]) for layer in analysis["layers"] if layer.get(key) is not None]
            cells.append(f"{float(np.median(values)):.2f}" if values else NOT_MEASURED)
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines[4] = "|---|" + "---:|" * len(analyses)
    for scheme in ("per_tensor", "per_channel"):
        cells = [f"{float(a['int8_logit_sqnr_db'][scheme]):.1f}" for a in analyses.values()]
        lines.append(f"| INT8 logit SQNR, {scheme.replace('_', '-')} weights (dB) | {' | '.join(cells)} |")
    gap = float(analyses["repopt"]["int8_logit_sqnr_db"]["per_tensor"]) - float(
        analyses["repvgg"]["int8_logit_sqnr_db"]["per_tensor"])
    if gap >= 3.0:
        lines += ["", f"RepVGG's INT8 logits are {gap:.1f} dB noisier than RepOpt-VGG's (per-tensor weights): the "
                  "mechanism the paper names (heavy-tailed fused kernels) is present here, whatever the top-1 "
                  "drops above show."]
    elif gap <= -3.0:
        lines += ["", f"RepOpt-VGG's INT8 logits are {-gap:.1f} dB noisier than RepVGG's (per-tensor weights): "
                  "the opposite of the paper's mechanism."]
    else:
        lines += ["", f"The two models' INT8 logit SQNR differ by {gap:+.1f} dB (per-tensor weights): no clear "
                  "difference in quantization noise."]
    return lines


def _chart(table: dict[str, dict[str, float | None]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _, _ in SCHEMES if not n.endswith("-fp32")]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    drawn = False
    width = 0.8 / len(MODELS)
    for k, (model, label) in enumerate(MODELS.items()):
        offset = (k - (len(MODELS) - 1) / 2) * width
        fp32 = table[model].get("fp32")
        drops = [100 * (fp32 - table[model][n]) if fp32 is not None and table[model].get(n) is not None else 0.0
                 for n in names]
        drawn |= any(drops)
        ax.bar([i + offset for i in range(len(names))], drops, width=width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylabel("top-1 drop (points)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def render(work: Path, out: Path, script: Path | None, *, command: str | None = None,
           shipped: list[str] = ()) -> str:
    accuracy, table = _accuracy(work)
    command = command or f"bash {script or 'scripts/quant_report.sh'}"
    chart = out.with_suffix(".png")
    lines = ["# Quantization: RepVGG, RepOpt-VGG and QARepVGG on CIFAR-10, INT8 on every CPU backend", "",
             f"Generated by `{command}` from the measurements in `{work}`; "
             "every number below was measured by that run on this machine.", ""]
    lines += _device(work) + _summary(work, table) + _training(work) + accuracy
    if _chart(table, chart):
        lines += [f"![top-1 drop per scheme]({chart.name})", ""]
    copied = _copy_analysis(work, out.with_suffix(""))
    lines += _trend(work) + _kernels(work) + _diagnosis(work, copied) + _max_drop(work, table)
    lines += _named_fix(work, table)
    lines += ["## Checkpoints", "", f"`{command}` regenerates them "
              f"(`{work}/train/repvgg/model.safetensors`, `{work}/train/repopt/target/model.safetensors`, "
              f"`{work}/train/qarepvgg/model.safetensors`; kept epochs in their `checkpoints/`)"
              + (f"; shipped in the repository: {', '.join(f'`{x}`' for x in shipped)}." if shipped else
                 "; none is shipped."), ""]
    if script is not None and script.is_file():
        lines += ["## Commands", "", "```bash", script.read_text().rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploykit.report.quant_study", description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--script", type=Path, default=None)
    parser.add_argument("--command", default=None, help="the command line that ran the study (default: bash SCRIPT)")
    parser.add_argument("--shipped", action="append", default=[], help="a checkpoint kept in the repository")
    args = parser.parse_args(argv)
    if not args.work.is_dir():
        print(f"error: {args.work} does not exist; run scripts/quant_report.sh first", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = render(args.work, args.out, args.script, command=args.command, shipped=args.shipped)
    from deploykit.files import atomic_file

    with atomic_file(args.out, force=True) as tmp:
        tmp.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The INT8 case of issue #13 that needs no training: timm's mobileone_s4 (seeded weights, random
BatchNorm statistics: scripts/cases/mobileone_s4.py), fused by `deploykit build`, quantized to
INT8 on ONNX Runtime and OpenVINO plain and with each named fix (`--int8-fix`), and diagnosed by
`deploykit analyze`; writes a Markdown report of what each step measured.

Every step is a `deploykit` command (printed in the report) run in a subprocess; each writes
into --work and is skipped when its output exists, so an interrupted run resumes. Figures are
the builds' own verification against the FP32 model (cosine of the logits, top-1 agreement on
held-out calibration-data images): an untrained model has no accuracy to measure.

timm must import: run it with a Python that has timm (README: *Models from timm and torchvision*),
the deploykit checkout on PYTHONPATH:

    PYTHONPATH=$PWD /path/to/timm-env/bin/python scripts/mobileone_case.py \
        --calib ../shared/data/cifar10-jpeg.tar.gz --out reports/mobileone-int8.md
    python scripts/mobileone_case.py --model repvgg_a0 --calib ../shared/data/cifar10-jpeg.tar.gz \
        --calib-samples 32 --verify-samples 16 --analyze-samples 16 --work /tmp/mc --out /tmp/mc.md  # smoke run
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = f"{HERE / 'cases' / 'mobileone_s4.py'}:mobileone_s4"
TARGETS = ("onnxruntime", "openvino")
VARIANTS = (("fp32", None), ("int8", None), ("int8", "zero-dead"), ("int8", "repvgg"))


def _run(argv: list[str], log: Path) -> None:
    """Run one deploykit command; its output goes to ``log``."""
    with log.open("w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(argv)}\n" + "\n".join(tail))


def _shown(argv: list[str]) -> str:
    """The command as a user types it (``deploykit`` for ``python -m deploykit``, paths relative)."""
    words = ["deploykit", *argv[3:]]
    cwd = str(Path.cwd()) + "/"
    return shlex.join(w.replace(cwd, "") for w in words)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="Default: timm mobileone_s4 with random BN statistics.")
    parser.add_argument("--calib", required=True, help="Calibration images (CIFAR-10 tree or .tar.gz).")
    parser.add_argument("--calib-samples", type=int, default=300)
    parser.add_argument("--verify-samples", type=int, default=200)
    parser.add_argument("--analyze-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/mobileone-case"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dk = [sys.executable, "-m", "deploykit"]
    common = ["--calib", args.calib, "--calib-samples", str(args.calib_samples), "--seed", str(args.seed)]
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    commands, rows = [], []
    for target in TARGETS:
        for precision, fix in VARIANTS:
            name = f"{target}-{precision}" + (f"-{fix}" if fix else "")
            out = args.work / "build" / name
            argv = [*dk, "build", args.model, "--target", target, "--precision", precision, *common,
                    "--verify-samples", str(args.verify_samples), "--threads", str(args.threads),
                    *(["--int8-fix", fix] if fix else []), "--out", str(out)]
            commands.append(_shown(argv))
            if not (out / "build.json").is_file():
                print(f"{name} ...", file=sys.stderr, flush=True)
                _run(argv, args.work / "logs" / f"{name}.log")
            meta = json.loads((out / "build.json").read_text())
            rows.append((target, precision, fix, meta))
    analysis = args.work / "analysis"
    argv = [*dk, "analyze", args.model, *common, "--verify-samples", str(args.analyze_samples), "--top", "8",
            "--out", str(analysis)]
    commands.append(_shown(argv))
    if not (analysis / "analysis.json").is_file():
        print("analyze ...", file=sys.stderr, flush=True)
        _run(argv, args.work / "logs" / "analyze.log")
    report = render(rows, json.loads((analysis / "analysis.json").read_text()), commands, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(report)
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _times(value: float | str) -> str:
    """A range inflation as the report writes it; JSON holds inf as the string "inf"."""
    if float(value) == float("inf"):
        return "inf (some channels have weights only on dead inputs)"
    return f"{float(value):.1f}x"


def _fix_steps(meta: dict) -> str:
    fix = meta.get("int8_fix") or {}
    parts = []
    for step in fix.get("steps", []):
        if step["step"] == "zero_dead":
            layers = step.get("layers") or {}
            parts.append(f"zeroed {step.get('weights_zeroed', '?')} weights on {sum(layers.values())} dead inputs "
                         f"of {len(layers)} layers")
        elif step["step"] == "equalize":
            parts.append(f"equalized {step.get('pairs', '?')} pairs")
        elif step["step"] == "per_channel":
            parts.append("per-channel" + (f" ({step['note']})" if step.get("note") else ""))
        elif step["step"] == "bias_correction":
            parts.append("bias correction" + (" (backend)" if "options" in step else " (PyTorch)"))
    return "; ".join(parts) or "-"


def render(rows: list, analysis: dict, commands: list[str], args: argparse.Namespace) -> str:
    first = rows[0][3]
    device, versions = first.get("device", {}), first.get("versions", {})
    lines = [
        "# INT8 of timm's mobileone_s4 (random BN statistics): diagnosis and fix",
        "",
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} on {device.get('cpu', '?')} "
        f"(ISA: {', '.join(device.get('isa', [])) or '?'}), {args.threads} threads; "
        + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".",
        "",
        (f"Model: `{args.model.replace(str(Path.cwd()) + '/', '')}` (timm, pretrained=False, seeded weights, every "
         "BatchNorm with random statistics; fused by deploykit before export). Calibration: " if args.model == MODEL
         else f"Model: `{args.model}` (not the case this script is for: a smoke run). Calibration: ")
        +
        f"{args.calib_samples} images of `{args.calib}` (seed {args.seed}), resized by the model's recipe. "
        f"Figures: each build's verification against the FP32 PyTorch model on {args.verify_samples} held-out "
        "images (the model is untrained: agreement with FP32, not accuracy).",
        "",
        "| target | precision | fix | logit cosine mean | cosine min | top-1 agreement (%) | what the fix did | build s |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for target, precision, fix, meta in rows:
        v = meta.get("verification", {})
        lines.append(f"| {target} | {precision} | {fix or '-'} | {v.get('cosine_mean', float('nan')):.4f} | "
                     f"{v.get('cosine_min', float('nan')):.4f} | {100 * v.get('top1_agreement', float('nan')):.1f} | "
                     f"{_fix_steps(meta) if fix else '-'} | {meta.get('build_seconds', float('nan')):.0f} |")
    sqnr = analysis.get("int8_logit_sqnr_db", {})
    lines += ["", "## What `deploykit analyze` names", "",
              f"PyTorch fake-quant INT8 logit SQNR: per-tensor {sqnr.get('per_tensor', float('nan')):.1f} dB, "
              f"per-channel {sqnr.get('per_channel', float('nan')):.1f} dB ({analysis.get('samples', '?')} samples).",
              "", "| rank | layer | logit SQNR alone (dB) | cause | suggested fix |", "|---:|---|---:|---|---|"]
    layers = {layer["name"]: layer for layer in analysis.get("layers", [])}
    for rank, name in enumerate(analysis.get("ranking", [])[:8], 1):
        layer = layers.get(name, {})
        c = layer.get("causes") or {}
        found = []
        for cause in c.get("causes", []):
            if cause == "bn_scale":
                found.append(f"BN |gamma|/sigma {c['bn_max_ratio']:.0f} (`{c['bn_max_module']}`)")
            elif cause == "dead_weights":
                found.append(f"{c['dead_inputs']} dead inputs widen {c['dead_inflated_outputs']} output ranges "
                             f"up to {_times(c['dead_range_inflation'])}")
            elif cause == "range_spread":
                found.append(f"output-channel weight range spread {c['range_spread']:.0f}x")
            else:
                found.append(cause)
        causes = "; ".join(found) or "-"
        lines.append(f"| {rank} | `{name}` | {layer.get('logit_sqnr_db', float('nan')):.1f} | {causes} | "
                     f"{layer.get('fix_text') or layer.get('fix') or '-'} |")
    lines += ["", "## Commands", "", "```bash", *commands, "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the CPU targets and write ``reports/cpu-targets.md``.

    python -m deploykit.bench_cpu_targets [--model repvgg_a0] [--rounds 5] [--threads 2]
        [--calib DATA] [--out reports/cpu-targets.md]

Builds (through ``deploykit.build``, so every artifact is verified) FP32/FP16/INT8 on ONNX
Runtime, OpenVINO and MNN plus PyTorch eager, then times them batch 1 in interleaved rounds
(round ``r`` times every configuration once, in an order rotated each round, so drift hits all
alike) and reports medians with 95% bootstrap intervals (deploykit.bench.stats), INT8/FP32
ratios paired by round, build time, artifact size and verification figures. Run it on a quiet
machine: other load widens the intervals (flagged as unstable).
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DeployError

logger = logging.getLogger(__name__)

DEFAULT_PLAN = {"onnxruntime": ("fp32", "fp16", "int8"), "openvino": ("fp32", "fp16", "int8"),
                "mnn": ("fp32", "fp16", "int8"), "torch": ("fp32",)}
# Measured by the issue's author on a smaller RepVGG, on a CPU with AVX2 and without VNNI.
ISSUE_INT8_RATIOS = {"onnxruntime": 0.96, "openvino": 0.85, "mnn": 0.82}


@dataclass
class Entry:
    target: str
    precision: str
    build: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    runner: Any = None
    rounds: list[np.ndarray] = field(default_factory=list)
    iterations: int = 0
    summary: Any = None

    @property
    def label(self) -> str:
        return f"{self.target} {self.precision}"


def _build_all(args: argparse.Namespace, plan: dict[str, tuple[str, ...]]) -> list[Entry]:
    from deploykit.build import BuildRequest, build
    from deploykit.export import export_onnx
    from deploykit.fuse import reparameterize
    from deploykit.loading import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model, num_classes=args.num_classes, cifar=args.cifar or None)
    size = loaded.input_size
    onnx_path = work / "model.onnx"  # fused and exported once; the ONNX targets build from it
    fused = loaded.model
    if loaded.form != "deploy":
        fused = reparameterize(loaded.model, input_shape=(2, 3, size, size)).model
    export_onnx(fused, onnx_path, input_size=size, batch=1, force=True)
    entries = []
    for target, precisions in plan.items():
        for precision in precisions:
            entry = Entry(target, precision)
            model = args.model if target == "torch" else str(onnx_path)
            request = BuildRequest(
                model=model, target=target, precision=precision, out=work / f"{target}-{precision}", force=True,
                threads=args.threads, calib=args.calib, calib_samples=args.calib_samples,
                num_classes=args.num_classes, cifar=args.cifar or None,
            )
            logger.info("building %s", entry.label)
            try:
                result = build(request)
                entry.build = result.meta
            except DeployError as err:
                entry.error = str(err)
                logger.warning("%s: %s", entry.label, err)
            entries.append(entry)
    return entries


def _time_all(entries: list[Entry], args: argparse.Namespace) -> None:
    from deploykit.backends.base import Artifact, get_backend
    from deploykit.bench.stats import summarize
    from deploykit.bench.timing import host_timer, iterations_per_round, time_round, warm_up

    live = [e for e in entries if e.error is None]
    for entry in live:
        artifact = Artifact.open(Path(args.work) / f"{entry.target}-{entry.precision}")
        entry.runner = get_backend(entry.target).load(artifact, threads=args.threads)
    size = live[0].build["inputs"][0]["shape"][-1] if live else 224
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    measures = {}
    for entry in live:
        measure = host_timer(entry.runner, x)
        warm = warm_up(measure, max_time_s=args.warmup_seconds)
        entry.iterations = iterations_per_round(warm.per_iteration_s, args.round_seconds)
        measures[entry.label] = measure
    for r in range(args.rounds):
        order = live[r % len(live):] + live[: r % len(live)] if live else []
        for entry in order:
            entry.rounds.append(time_round(measures[entry.label], entry.iterations))
        logger.info("round %d/%d done", r + 1, args.rounds)
    for entry in live:
        entry.summary = summarize(entry.rounds)


def _fmt_ms(summary: Any) -> tuple[str, str]:
    return f"{summary.median_ms:.2f}", f"{summary.ci_low_ms:.2f}-{summary.ci_high_ms:.2f}"


def render(entries: list[Entry], args: argparse.Namespace, started: float) -> str:
    """The report as markdown; computes nothing but ratios of the measured rounds."""
    from deploykit.device import device_fingerprint, tool_versions
    from deploykit.bench.stats import ratio_of_medians

    device, versions = device_fingerprint(), tool_versions()
    calibration = args.calib or "synthetic (seeded random tensors): INT8 speed is representative, INT8 agreement is not"
    if args.calib_samples:
        calibration += f", {args.calib_samples} samples"
    isa = set(device["isa"])
    vnni = {"AVX512-VNNI", "AVX-VNNI"} & isa
    lines = [
        "# CPU targets: latency, size and agreement",
        "",
        f"Generated by `{' '.join(['python -m deploykit.bench_cpu_targets', *sys.argv[1:]])}`"
        f" on {dt.date.today().isoformat()} "
        f"({time.perf_counter() - started:.0f} s).",
        "",
        f"- Model: `{args.model}`{' (CIFAR form)' if args.cifar else ''}, batch 1, {args.threads} threads, "
        "deploy (fused) form.",
        f"- Machine: {device['cpu']} ({device['arch']}, {device['logical_cores']} logical cores); "
        f"ISA: {', '.join(device['isa']) or 'unknown'}.",
        f"- INT8 kernels: {'VNNI present (' + ', '.join(sorted(vnni)) + ')' if vnni else 'no VNNI'}"
        f"{'' if vnni else (': AVX2 int8 dot products (vpmaddubsw) only' if 'AVX2' in isa else '')}.",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}.",
        f"- Timing: {args.rounds} interleaved rounds of >= {args.round_seconds:g} s per configuration; "
        "median of round medians, 95% percentile-bootstrap interval over rounds.",
        f"- Calibration: {calibration}.",
        "",
        "| target | precision | median ms | 95% CI | p90 ms | build s | size MB | cosine (mean) | top-1 agree | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in entries:
        if e.error:
            lines.append(f"| {e.target} | {e.precision} | - | - | - | - | - | - | - | build failed: {e.error} |")
            continue
        v = e.build["verification"]
        median, ci = _fmt_ms(e.summary)
        note = "unstable: " + "; ".join(e.summary.unstable_reasons) if e.summary.unstable else ""
        lines.append(
            f"| {e.target} | {e.precision} | {median} | {ci} | {e.summary.p90_ms:.2f} | {e.build['build_seconds']:.1f} "
            f"| {e.build['size_bytes'] / 1e6:.2f} | {v['cosine_mean']:.5f} | {v['top1_agreement']:.3f} | {note} |"
        )
    by_key = {(e.target, e.precision): e for e in entries if e.error is None}
    lines += ["", "## INT8 / FP32 latency", "",
              "Paired by round (same round, back to back). Issue's figures: a smaller RepVGG on an AVX2 CPU "
              "without VNNI.", "",
              "| target | INT8/FP32 | 95% CI | issue's figure |", "|---|---:|---:|---:|"]
    for target, issue in ISSUE_INT8_RATIOS.items():
        int8, fp32 = by_key.get((target, "int8")), by_key.get((target, "fp32"))
        if int8 is None or fp32 is None:
            lines.append(f"| {target} | - | - | {issue:.2f} |")
            continue
        ratio = ratio_of_medians([np.median(r) for r in int8.rounds], [np.median(r) for r in fp32.rounds])
        lines.append(f"| {target} | {ratio.ratio:.2f} | {ratio.ci_low:.2f}-{ratio.ci_high:.2f} | {issue:.2f} |")
    lines += ["", "Verification figures compare each artifact with the reference on held-out inputs "
              "(PyTorch for `torch`, ONNX Runtime FP32 on the exported model for the others); see each "
              "artifact's build.json under the work directory.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploykit.bench_cpu_targets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="repvgg_a0")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--cifar", action="store_true", help="the model's CIFAR (32x32) form")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=2.0)
    parser.add_argument("--warmup-seconds", type=float, default=10.0)
    parser.add_argument("--calib", default=None, help="calibration data (default: synthetic, with a warning)")
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--targets", default=",".join(DEFAULT_PLAN), help="comma-separated subset")
    parser.add_argument("--work", default="build/bench-cpu-targets", help="where the artifacts are built")
    parser.add_argument("--out", default="reports/cpu-targets.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from deploykit.files import atomic_file

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(DEFAULT_PLAN))
    if unknown:
        raise SystemExit(f"error: unknown targets {', '.join(unknown)}; choose from {', '.join(DEFAULT_PLAN)}")
    started = time.perf_counter()
    entries = _build_all(args, {t: DEFAULT_PLAN[t] for t in wanted})
    _time_all(entries, args)
    report = render(entries, args, started)
    out = Path(args.out)
    with atomic_file(out, force=True) as tmp:
        tmp.write_text(report)
    print(report)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

"""ONNX Runtime INT8 on x86 CPUs without VNNI: how much u8s8 saturation costs a trained model,
and what each remedy costs in accuracy and latency, measured on this CPU.

On x86 without VNNI (AVX2-only cores), ORT's u8s8 kernels add pairs of u8 x s8 products into
a saturating int16; per-channel int8 weights use the full range in every channel, so the sums
overflow. deploykit now runs ORT INT8 with ``session.x64quantprecision`` (backend option
``x64_quant_precision``, default on). This script builds the trained RepVGG-A0 of the
repository for ORT INT8 through the CLI with deploykit's default and with each variant
`deploykit advise` builds beside it on such a CPU (``Backend.variants``; one calibration set:
--calib-samples images of the train split, the recipe's seed), then on this CPU:

- top-1 on the CIFAR-10 test split of each artifact, and of the FP32 checkpoint;
- the same Q/DQ files evaluated with every graph optimization off (DequantizeLinear, then a
  float convolution: the arithmetic the file describes, no integer kernel) on --dq-limit test
  images, beside the integer kernels on the same images: the gap is the kernels' own error;
- latency (batch 1, 2 threads) with deploykit's harness, the artifacts interleaved per round.

    python scripts/ort_x86_saturation.py --data ../shared/data/cifar10-jpeg.tar.gz \
        --out reports/ort-int8-x86-saturation.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CKPT = "checkpoints/repvgg_a0-cifar10-w0.5.safetensors"
FP32 = "FP32 (ORT, for comparison)"
DEFAULT = "per-channel, exact (x64_quant_precision on: deploykit's default)"
SATURATING = "int16 sums"  # the variant that is the default's kernels without the setting


def variants() -> dict[str, tuple[str, ...]]:
    """Row name -> --option values: deploykit's default, then the variants `deploykit advise` builds beside it
    on x86 without VNNI (the backend's own list, asked for such a CPU so the rows are the same on any CPU),
    then FP32 for the latency context."""
    from deploykit.backends.base import get_backend
    from deploykit.precision import X86_FLAGS
    from deploykit.report.advice import option_values

    offered = get_backend("onnxruntime").variants("int8", frozenset(X86_FLAGS))
    rows = {DEFAULT: ("x64_quant_precision=true",)}
    rows.update({name: tuple(option_values(options)) for name, options in offered.items()})
    rows[FP32] = ()
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.split(" (")[0]).strip("-").replace("--", "-")


def build(args: argparse.Namespace, name: str, options: tuple[str, ...]) -> tuple[Path, str]:
    out = args.work / _slug(name)
    argv = [sys.executable, "-m", "deploykit", "build", args.ckpt, "--target", "onnxruntime"]
    argv += ["--precision", "fp32"] if name == FP32 else [
        "--precision", "int8", "--calib", args.data, "--calib-samples", str(args.calib_samples)]
    for option in options:
        argv += ["--option", option]
    argv += ["--out", str(out), "--force"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    # exit 3: the build's verification warned or its gate failed; the artifact is what is measured
    if done.returncode not in (0, 3) or not (out / "build.json").is_file():
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(argv)}\n{done.stderr[-2000:]}")
    return out, shlex.join(["deploykit", *(w.replace(f"{Path.cwd()}/", "") for w in argv[3:])])


def dq_float_runner(artifact_dir: Path, threads: int):
    """The artifact's Q/DQ model with graph optimizations off: no fusion into integer kernels."""
    from deploykit.backends.base import run_in_batches
    from deploykit.backends.onnxruntime import session
    from deploykit.onnxio import fixed_batch, onnx_io

    path = artifact_dir / "model.onnx"
    runner = session(path, threads=threads, level="disabled", config={})
    name = runner.get_inputs()[0].name
    return lambda x: run_in_batches(lambda b: runner.run(None, {name: b})[0], x, fixed_batch(onnx_io(path)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10 tree or .tar.gz (train/ and test/).")
    parser.add_argument("--ckpt", default=CKPT)
    parser.add_argument("--calib-samples", type=int, default=300)
    parser.add_argument("--dq-limit", type=int, default=2000, help="Test images of the kernel-vs-Q/DQ check.")
    parser.add_argument("--limit", type=int, default=None, help="Test images of the top-1 column (default all).")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "ort-x86")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import os

    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    from deploykit.backends.base import get_backend
    from deploykit.bench.artifacts import artifact_latency
    from deploykit.bench.stats import bootstrap_median_ci
    from deploykit.device import describe_cpu, device_fingerprint
    from deploykit.evaluate import Evaluable, evaluate, open_evaluable
    from deploykit.files import atomic_file
    from deploykit.precision import cpu_flags, int8_dot_note
    from deploykit.resolve import open_artifact

    args.work.mkdir(parents=True, exist_ok=True)
    device = device_fingerprint()
    fp32 = evaluate(open_evaluable(args.ckpt, threads=2), args.data, split="test", limit=args.limit)
    rows, commands = [], []
    for name, options in variants().items():
        out, command = build(args, name, options)
        commands.append(command)
        artifact = open_artifact(out)
        kernels = get_backend("onnxruntime").load(artifact, threads=2)
        pre = artifact.record.preprocessing
        top1 = evaluate(Evaluable(kernels, pre, name), args.data, split="test", limit=args.limit)
        on_kernels = on_qdq = None
        if name != FP32:
            on_kernels = evaluate(Evaluable(kernels, pre, name), args.data, split="test", limit=args.dq_limit)
            on_qdq = evaluate(Evaluable(dq_float_runner(out, 2), pre, name), args.data, split="test", limit=args.dq_limit)
        rows.append({"name": name, "dir": out, "top1": top1, "kernels": on_kernels, "qdq": on_qdq,
                     "verification": artifact.record.verification or {}})
    latency = artifact_latency([row["dir"] for row in rows], threads=2, rounds=args.rounds)
    for row, timing in zip(rows, latency):
        row["latency"] = timing
        low, high = bootstrap_median_ci(timing["round_medians_ms"])
        row["ci"] = (low, high)

    def pct(value: float) -> str:
        return f"{100 * value:.2f}%"

    lines = [
        "# ONNX Runtime INT8 on an x86 CPU without VNNI: u8s8 saturation, measured",
        "",
        f"Device: {describe_cpu(device)} ({device['arch']}; ISA: {', '.join(device['isa']) or '-'}), "
        f"{device['usable_cores']} cores; {int8_dot_note(cpu_flags(), True) or 'not x86'}.",
        f"onnxruntime {onnxruntime.__version__}; model: the trained RepVGG-A0 of the repository (`{args.ckpt}`, CIFAR-10, "
        f"width 0.5); calibration: {args.calib_samples} train-split images (the cifar10 recipe's seed), the same for every row.",
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"`{shlex.join(['python', 'scripts/ort_x86_saturation.py', *sys.argv[1:]])}`.",
        "",
        f"FP32 (PyTorch, the checkpoint): top-1 {pct(fp32.top1)} on {fp32.count} test images.",
        "",
        "| ORT artifact (name as in `deploykit advise`) | top-1 (test) | drop (points) | integer kernels / Q/DQ as written, "
        f"seeded subset of {rows[0]['kernels'].count} test images | latency ms, median [95% CI] | vs first row |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, high = row["ci"]
        kernels_vs_qdq = f"{pct(row['kernels'].top1)} / {pct(row['qdq'].top1)}" if row["kernels"] else "-"
        lines.append(
            f"| {row['name']} | {pct(row['top1'].top1)} | {100 * (fp32.top1 - row['top1'].top1):.2f} | "
            f"{kernels_vs_qdq} | {row['latency']['median_ms']:.3f} "
            f"[{low:.3f}, {high:.3f}] | {row['latency']['median_ms'] / latency[0]['median_ms']:.2f}x |")
    on, off = rows[0], next(r for r in rows if r["name"] == SATURATING)
    int8_rows = [r for r in rows if r["name"] != FP32]
    within = [r for r in int8_rows if 100 * (fp32.top1 - r["top1"].top1) <= 1.0]
    fastest = min(within, key=lambda r: r["latency"]["median_ms"]) if within else None
    lost = 100 * (off["qdq"].top1 - off["kernels"].top1)
    lines += [
        "",
        "## Finding",
        "",
        f"- Without the setting, the integer kernels compute {pct(off['kernels'].top1)} where the same file's Q/DQ "
        f"arithmetic computes {pct(off['qdq'].top1)} on the same images: the kernels lose {lost:.2f} points by "
        f"themselves (u8s8 saturation), and the test-split drop is {100 * (fp32.top1 - off['top1'].top1):.2f} points.",
        f"- With it (deploykit's default), kernels and Q/DQ give {pct(on['kernels'].top1)} / {pct(on['qdq'].top1)} "
        f"and the drop is {100 * (fp32.top1 - on['top1'].top1):.2f} points, at "
        f"{on['latency']['median_ms'] / off['latency']['median_ms']:.2f}x the latency of the saturating kernels "
        f"({on['latency']['median_ms'] / rows[-1]['latency']['median_ms']:.2f}x ORT FP32's).",
        (f"- The fastest INT8 row within 1 point of FP32 here: {fastest['name']} "
         f"({fastest['latency']['median_ms']:.3f} ms, drop {100 * (fp32.top1 - fastest['top1'].top1):.2f} points)."
         if fastest else "- No INT8 row is within 1 point of FP32 here."),
        *[f"- {r['name']}: the saturating kernels {'agree with' if abs(r['kernels'].top1 - r['qdq'].top1) < 0.001 else 'differ from'} "
          f"the file's Q/DQ arithmetic ({pct(r['kernels'].top1)} / {pct(r['qdq'].top1)})." for r in int8_rows[1:]],
        "- Which is fastest within a budget depends on the model and the CPU: deploykit's default keeps the "
        "arithmetic exact, and `deploykit advise` builds, scores and times the other rows as variants so the "
        "budget decides; the options of each row are the ones in its command below.",
    ]
    lines += [
        "",
        f"Latency: batch 1, 2 threads, {args.rounds} interleaved rounds of ~0.5 s each after warm-up "
        "(deploykit.bench.artifacts, the `deploykit bench --artifact` harness); bootstrap 95% CI of the median of the round medians.",
        "The integer-kernel vs Q/DQ column runs the same file twice: once as deploykit loads it, once with every ORT graph "
        "optimization off, where DequantizeLinear feeds a float convolution and no integer kernel runs. Where the two "
        "differ, the kernels do not compute what the Q/DQ graph says.",
        "",
        "Commands (builds):",
        "",
        *[f"    {c}" for c in commands],
        "",
    ]
    with atomic_file(args.out, force=True) as tmp:
        tmp.write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

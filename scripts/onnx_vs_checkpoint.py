"""`deploykit advise` on a user's own ONNX export vs on the PyTorch checkpoint it came from, measured here.

What a user often has is not the checkpoint but their own ``torch.onnx.export`` of the model as
trained: for RepVGG, the multi-branch graph (3x3 + 1x1 + identity-BN branches, the exporter folds
each conv's BN but leaves the branches). deploykit cannot re-parameterize an ONNX graph, so
``deploykit advise model.onnx`` measures the targets on it as given; on the checkpoint it fuses first.
This script, on this CPU:

- exports the trained RepVGG-A0 of the repository as such a user would (TorchScript exporter,
  opset 17, symbolic batch; ``--ckpt`` to use another);
- runs ``deploykit advise`` on the file and on the checkpoint (same data, budget, samples, rounds);
- times the matching fp32 and int8 artifacts of both in one interleaved run (the advise runs are
  separate processes, so their latencies are compared only within a run);
- where a target's INT8 collapses on the file but not on the checkpoint, builds it again on two
  edits of the file that rule causes in or out (identity BN as an equal 1x1 conv; batch fixed to 1).

    python scripts/onnx_vs_checkpoint.py --data data/cifar10 --out reports/advise-onnx-vs-checkpoint.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CKPT = "checkpoints/repvgg_a0-cifar10-w0.5.safetensors"
COLLAPSE_POINTS = 10.0  # an INT8 drop this large on the file, and not on the checkpoint, gets the probes


def export_as_a_user_would(ckpt: str, path: Path) -> None:
    """torch.onnx.export of the model as loaded (train form)."""
    import warnings

    import torch

    from deploykit.loading import load_model

    loaded = load_model(ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(loaded.model.eval(), torch.randn(1, 3, loaded.input_size, loaded.input_size), str(path),
                          dynamo=False, opset_version=17, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})


def identity_bn_as_conv(src: Path, dst: Path) -> None:
    """Every BatchNormalization node replaced by the 1x1 convolution computing the same (diagonal weights)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            nodes.append(node)
            continue
        gamma, beta, mean, var = (values[name] for name in node.input[1:5])
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        weight = np.zeros((len(scale), len(scale), 1, 1), np.float32)
        weight[np.arange(len(scale)), np.arange(len(scale)), 0, 0] = scale
        names = (f"{node.output[0]}.w", f"{node.output[0]}.b")
        graph.initializer.extend([numpy_helper.from_array(weight, names[0]),
                                  numpy_helper.from_array((beta - mean * scale).astype(np.float32), names[1])])
        nodes.append(helper.make_node("Conv", [node.input[0], *names], [node.output[0]]))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def fixed_batch(src: Path, dst: Path) -> None:
    import onnx

    model = onnx.load(str(src))
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 1
    onnx.save(model, str(dst))


def deploykit(argv: list[str]) -> str:
    """Run a deploykit command; exit 3 (no row within budget / verification warned) is a result, not a failure."""
    done = subprocess.run([sys.executable, "-m", "deploykit", *argv], capture_output=True, text=True, check=False)
    if done.returncode not in (0, 3):
        raise SystemExit(f"failed ({done.returncode}): deploykit {shlex.join(argv)}\n{done.stderr[-2000:]}")
    return shlex.join(["deploykit", *(word.replace(f"{Path.cwd()}/", "") for word in argv)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10 tree or .tar.gz (train/ and test/).")
    parser.add_argument("--ckpt", default=CKPT)
    parser.add_argument("--calib-samples", type=int, default=300)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "onnx-vs-checkpoint")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import collections

    import onnx

    from deploykit.bench.artifacts import artifact_latency
    from deploykit.bench.stats import bootstrap_median_ci
    from deploykit.device import describe_cpu, device_fingerprint, tool_versions
    from deploykit.files import atomic_file

    started = dt.datetime.now(dt.timezone.utc)
    args.work.mkdir(parents=True, exist_ok=True)
    user_onnx = args.work / "user-export.onnx"
    if not user_onnx.is_file():  # kept: a rerun reuses advise's cached builds (they are keyed on the file's mtime)
        export_as_a_user_would(args.ckpt, user_onnx)
    ops = collections.Counter(node.op_type for node in onnx.load(str(user_onnx)).graph.node)
    common = ["--calib", args.data, "--calib-samples", str(args.calib_samples), "-p", "fp32", "-p", "int8",
              "--eval-samples", str(args.eval_samples), "--rounds", str(args.rounds), "--max-drop", "1.0"]
    advice, commands = {}, []
    for name, model in (("file", str(user_onnx)), ("checkpoint", args.ckpt)):
        work = args.work / f"advise-{name}"
        commands.append(deploykit(["advise", model, *common, "--work", str(work)]))
        advice[name] = json.loads((work / "advice.json").read_text())

    def key(row: dict) -> tuple:
        return row["target"], row["precision"], row["variant"]

    rows = {name: {key(r): r for r in data["candidates"] if not r["anchor"] and r["path"] and not r["error"]}
            for name, data in advice.items()}
    shared = [k for k in rows["file"] if k in rows["checkpoint"]]
    pairs = [(name, k) for k in shared for name in ("file", "checkpoint")]  # one interleaved run, side by side
    paths = [Path(rows[name][k]["path"]) for name, k in pairs]
    latency = dict(zip(pairs, artifact_latency(paths, threads=2, rounds=args.rounds)))

    probes = []
    for k in shared:
        file_drop, ckpt_drop = rows["file"][k]["drop_points"], rows["checkpoint"][k]["drop_points"]
        if k[1] != "int8" or k[2] or file_drop is None or file_drop < COLLAPSE_POINTS or ckpt_drop >= COLLAPSE_POINTS:
            continue
        as_built = json.loads((Path(rows["file"][k]["path"]) / "build.json").read_text())["verification"]
        probes.append((k[0], "none (as exported)", as_built))
        for label, edit in (("identity BN as an equal 1x1 conv", identity_bn_as_conv), ("batch fixed to 1", fixed_batch)):
            edited = args.work / f"user-export-{edit.__name__}.onnx"
            edit(user_onnx, edited)
            out = args.work / f"probe-{k[0]}-{edit.__name__}"
            commands.append(deploykit(["build", str(edited), "-t", k[0], "-p", "int8", "--calib", args.data,
                                       "--calib-samples", str(args.calib_samples), "--out", str(out), "--force"]))
            verified = json.loads((out / "build.json").read_text())["verification"]
            probes.append((k[0], label, verified))

    device = device_fingerprint()
    versions = tool_versions()

    def cell(name: str, k: tuple) -> str:
        r = rows[name][k]
        return f"{100 * r['top1']:.2f}% ({r['drop_points']:+.2f})"

    def ms(name: str, k: tuple) -> str:
        t = latency[name, k]
        low, high = bootstrap_median_ci(t["round_medians_ms"])
        return f"{t['median_ms']:.3f} [{low:.3f}, {high:.3f}]"

    chosen = {name: data["chosen"] for name, data in advice.items()}
    lines = [
        "# `deploykit advise` on a user's own ONNX export vs on the checkpoint it came from",
        "",
        f"Device: {describe_cpu(device)} ({device['arch']}; ISA: {', '.join(device['isa']) or '-'}), "
        f"{device['usable_cores']} cores, 2 threads, batch 1. Versions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".",
        f"Measured {started:%Y-%m-%d %H:%M} UTC by `{shlex.join(['python', 'scripts/onnx_vs_checkpoint.py', *sys.argv[1:]])}` "
        f"in {(dt.datetime.now(dt.timezone.utc) - started).total_seconds() / 60:.1f} min.",
        "",
        f"The file: `torch.onnx.export` (TorchScript exporter, opset 17, symbolic batch) of `{args.ckpt}` as loaded, "
        "the multi-branch train form: " + ", ".join(f"{n} {op}" for op, n in sorted(ops.items())) + ". "
        "The checkpoint: the same weights, which deploykit fuses (one 3x3 conv per block) before export.",
        f"Accuracy: top-1 on {args.eval_samples} held-out CIFAR-10 test images (advise's seeded subset), drop in points "
        f"vs each run's baseline (ONNX Runtime FP32 on the file: {100 * advice['file']['baseline']['top1']:.2f}%; "
        f"PyTorch eager on the checkpoint: {100 * advice['checkpoint']['baseline']['top1']:.2f}%). "
        f"Calibration: {args.calib_samples} train-split images, the same for every INT8 row.",
        "",
        f"Chosen by advise (from its own timing rounds, not the run below) on the file: "
        f"**{chosen['file']['label'] if chosen['file'] else 'none'}**; on the checkpoint: "
        f"**{chosen['checkpoint']['label'] if chosen['checkpoint'] else 'none'}**.",
        "",
        "| target | precision | variant | top-1 (drop), file | top-1 (drop), checkpoint | ms, file | ms, checkpoint | file / checkpoint |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in sorted(shared, key=lambda k: latency["checkpoint", k]["median_ms"]):
        ratio = latency["file", k]["median_ms"] / latency["checkpoint", k]["median_ms"]
        lines.append(f"| {k[0]} | {k[1]} | {k[2] or '-'} | {cell('file', k)} | {cell('checkpoint', k)} | "
                     f"{ms('file', k)} | {ms('checkpoint', k)} | {ratio:.2f}x |")
    lines += [
        "",
        f"Latency: the {len(paths)} artifacts above in one interleaved run ({args.rounds} rounds of ~0.5 s after "
        "warm-up, `deploykit.bench.artifacts`, the `deploykit bench --artifact` harness), median of round medians "
        "with its bootstrap 95% interval. advise's own tables (its timing, the rows it rejected and why) are in "
        "the advice.md of each run's work folder.",
    ]
    if probes:
        lines += ["", "## INT8 that collapses on the file, not on the checkpoint", "",
                  "Each probe builds the target's INT8 again from an edit of the file that computes the same function; "
                  "the verification is deploykit's (64 held-out train-split images vs ONNX Runtime FP32 on the edited file).",
                  "", "| target | file edited | mean cosine vs FP32 | top-1 agreement |", "|---|---|---:|---:|"]
        lines += [f"| {target} | {label} | {v['cosine_mean']:.4f} | {v['top1_agreement']:.4f} |"
                  for target, label, v in probes]
    lines += ["", "Commands:", "", *[f"    {c}" for c in commands], ""]
    with atomic_file(args.out, force=True) as tmp:
        tmp.write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

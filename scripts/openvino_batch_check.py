"""OpenVINO latency of a symbolic-batch model vs the same model reshaped to batch 1.

deploykit exports a checkpoint with a fixed batch of 1; a user's ONNX export usually has a
symbolic batch, which `deploykit build FILE.onnx` keeps (the artifact accepts any batch). This
times, in one process with deploykit's harness (``deploykit.bench.timing``: warm-up, interleaved
rounds) and deploykit's OpenVINO compile settings (``backends.openvino.compile_model``: explicit
threads, one stream, latency hint, the artifact's arithmetic), at batch 1:

- the OpenVINO artifact built from the file (its batch as the file has it),
- the same model reshaped to [1, ...] (``Model.reshape``) and saved beside it,
- optionally a reference artifact (e.g. the one built from the checkpoint),

and prints each median with its bootstrap interval and the paired ratios to the reshaped model.
Needs the artifacts of ``bash scripts/onnx_reparam_check.sh`` (or any OpenVINO artifact dirs):

    python scripts/openvino_batch_check.py /tmp/onnx-reparam/openvino-fp32-fused \
        --reference /tmp/onnx-reparam/openvino-fp32-ckpt [--arithmetic bf16] [--rounds 15]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="OpenVINO artifact dir built from a symbolic-batch file")
    parser.add_argument("--reference", type=Path, help="another OpenVINO artifact dir to time beside it")
    parser.add_argument("--arithmetic", default=None, help="fp32 / bf16 / fp16 (default: the artifact's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    import openvino as ov

    from deploykit.backends.openvino import compile_model
    from deploykit.bench.stats import ratio_of_medians, summarize
    from deploykit.bench.timing import host_timer, interleaved_rounds, iterations_per_round, warm_up
    from deploykit.resolve import open_artifact

    artifact = open_artifact(args.artifact)
    arithmetic = args.arithmetic or artifact.record.backend.get("inference_precision", "fp32")
    xml = artifact.path / "model.xml"
    model = ov.Core().read_model(str(xml))
    given = [str(i.get_partial_shape()) for i in model.inputs]
    model.reshape([1, *model.inputs[0].get_partial_shape()[1:].to_shape()])
    with tempfile.TemporaryDirectory() as tmp:
        static = Path(tmp) / "model.xml"
        ov.save_model(model, str(static), compress_to_fp16=False)
        paths = {f"as built {given[0]}": xml, "reshaped to batch 1": static}
        if args.reference is not None:
            paths[f"reference {args.reference.name}"] = open_artifact(args.reference).path / "model.xml"
        x = np.random.default_rng(0).standard_normal([1, *artifact.record.input_shape[1:]]).astype(np.float32)
        measures, iterations = {}, {}
        for name, path in paths.items():
            request = compile_model(path, threads=args.threads, arithmetic=arithmetic).create_infer_request()
            measures[name] = host_timer(lambda batch, r=request: r.infer({0: batch}), x)
            iterations[name] = iterations_per_round(warm_up(measures[name]).per_iteration_s, 0.5)
        times = interleaved_rounds(measures, iterations, args.rounds)
    medians = {name: [float(np.median(r)) for r in rounds] for name, rounds in times.items()}
    print(f"OpenVINO {ov.__version__}, {arithmetic}, batch 1, {args.threads} threads, {args.rounds} rounds")
    for name, rounds in times.items():
        s = summarize(rounds)
        r = ratio_of_medians(medians[name], medians["reshaped to batch 1"])
        print(f"  {name:<40} {s.median_ms:.3f} ms [{s.ci_low_ms:.3f}, {s.ci_high_ms:.3f}]"
              f"  x{r.ratio:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] vs reshaped")


if __name__ == "__main__":
    main()

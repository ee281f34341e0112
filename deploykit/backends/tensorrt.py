"""TensorRT (NVIDIA GPUs): plain ``.engine`` files in FP32, FP16 and explicit-quantization INT8.

Every precision is a *strongly typed* network built from an ONNX model whose types say the
precision, so the same recipe works on TensorRT 10 (strong typing opted in) and TensorRT 11
(weak typing and precision flags such as ``BuilderFlag.FP16`` removed):

- fp32: the exported ONNX as is;
- fp16: the ONNX converted to float16 with float32 inputs/outputs
  (``onnxruntime.transformers.float16``; NVIDIA's own route is ModelOpt AutoCast);
- int8: a Q/DQ ONNX from deploykit's calibration set (:mod:`deploykit.backends.qdq`), with the
  skip input of residual Adds quantized and every unquantized layer in float16, as NVIDIA
  Model-Optimizer's ONNX INT8 mode writes it (options ``quantize_residual`` and
  ``unquantized_precision`` switch back to the earlier FP32, inputs-only recipe). Never the
  implicit ``IInt8Calibrator`` path (deprecated in TensorRT 10.1, removed in 11).

An artifact holds the ONNX the engine is built from (``model.<precision>.onnx``), the engine
(``model.engine``, TensorRT's serialized plan with no header of ours), ``build_engine.sh``
with the equivalent ``trtexec`` command, and for int8 ``calibration.json``. ``--emit-only``
(option ``emit_only``) writes all of it but the engine, on any machine.

What has been run: the ONNX preparation, the Q/DQ model and its ONNX Runtime accuracy, the
trtexec command, preflight and the build.json compatibility checks run in deploykit's tests
on CPU machines. Building and running engines (:mod:`deploykit.backends.tensorrt_runtime`)
is written against TensorRT's documented Python API and has NOT been executed anywhere by
deploykit's authors: TensorRT could not be installed where this code was written.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from deploykit.backends.base import Artifact, BackendBase, BuildConfig, Option, resolve_options
from deploykit.errors import DeployError, MissingBackendError

logger = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
SCRIPT_FILE = "build_engine.sh"
CALIBRATION_FILE = "calibration.json"
# trtexec's cache, beside the script, named there after the GPU that runs it: trtexec loads
# --timingCacheFile without checking the device it was written on.
BUNDLE_TIMING_CACHE = "timing-<GPU>-<compute capability>.cache"
NEEDS = "an NVIDIA GPU and TensorRT"
STATUS = ("engine build/run written to TensorRT 10/11's documented API, never executed in "
          "deploykit's test environment (no GPU, no TensorRT); --emit-only and the Q/DQ ONNX are tested")

OPTIONS = {
    "emit_only": Option(False, "write the ONNX to build from, calibration summary and trtexec command; no engine"),
    "workspace_mib": Option(1024, "builder workspace memory pool limit, MiB"),
    "min_batch": Option(1, "optimization profile: smallest batch (dynamic-batch ONNX only)"),
    "opt_batch": Option(1, "optimization profile: the batch kernels are tuned for"),
    "max_batch": Option(32, "optimization profile: largest batch"),
    "builder_optimization_level": Option(3, "0-5: higher searches longer for faster kernels", (0, 1, 2, 3, 4, 5)),
    "timing_cache": Option(None, "timing cache file (default: ~/.cache/deploykit/tensorrt/)", kind=str),
    "calibrate_method": Option("minmax", "how activation ranges are set", ("minmax", "entropy", "percentile"),
                               ("int8",)),
    "unquantized_precision": Option("fp16", "precision of the layers INT8 leaves unquantized (fp32: earlier recipe)",
                                    ("fp16", "fp32"), ("int8",)),
    "quantize_residual": Option(True, "Q/DQ on residual Adds' skip input so Conv+Add fuse in INT8 "
                                      "(false: earlier recipe)", precisions=("int8",)),
}


def onnx_file_for(precision: str) -> str:
    return f"model.{precision}.onnx"


def _input_spec(onnx_path: Path) -> tuple[str, list[Any]]:
    from deploykit.onnxio import onnx_io

    first = onnx_io(onnx_path)["inputs"][0]
    return first["name"], first["shape"]


def batch_profile(shape: list[Any], options: dict[str, Any]) -> dict[str, list[int]] | None:
    """min/opt/max input shapes for a dynamic batch; None for a fixed-batch ONNX."""
    if isinstance(shape[0], int) and shape[0] > 0:
        return None
    if not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise DeployError(f"TensorRT needs fixed C, H, W; the ONNX input is {shape}")
    low, opt, high = options["min_batch"], options["opt_batch"], options["max_batch"]
    if not 1 <= low <= opt <= high:
        raise DeployError(f"batch profile needs 1 <= min_batch <= opt_batch <= max_batch; got {low}, {opt}, {high}")
    return {name: [b, *shape[1:]] for name, b in (("min", low), ("opt", opt), ("max", high))}


def trtexec_command(onnx_file: str, *, input_name: str, profile: dict[str, list[int]] | None,
                    options: dict[str, Any]) -> list[str]:
    """The trtexec call that builds the same engine (run in the artifact directory).

    ``--stronglyTyped`` opts TensorRT 10 into strong typing and is the default (a no-op) in
    11; no precision flag (``--fp16``/``--int8``, removed in 11): the ONNX carries the types.
    """
    command = [
        "trtexec", f"--onnx={onnx_file}", f"--saveEngine={ENGINE_FILE}", "--stronglyTyped",
        f"--memPoolSize=workspace:{options['workspace_mib']}M",
        f"--builderOptimizationLevel={options['builder_optimization_level']}",
    ]  # build_engine.sh adds --timingCacheFile, named for the GPU it runs on
    if profile is not None:
        for flag, key in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
            command.append(f"{flag}={input_name}:{'x'.join(map(str, profile[key]))}")
    return [*command, "--skipInference"]


# trtexec builds on CUDA device 0, the first entry of CUDA_VISIBLE_DEVICES. nvidia-smi numbers
# GPUs in PCI order, CUDA fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, so the script sets
# PCI order when the caller did not; an index under another order names no row it can trust.
_TIMING_CACHE_BY_GPU = """\
# trtexec loads --timingCacheFile without checking which GPU wrote it: one cache per GPU model.
export CUDA_DEVICE_ORDER="${CUDA_DEVICE_ORDER:-PCI_BUS_ID}"
device="${CUDA_VISIBLE_DEVICES-0}"
device="${device%%,*}"
gpu=""
if [[ -n "$device" && ( "$CUDA_DEVICE_ORDER" == PCI_BUS_ID || ! "$device" =~ ^[0-9]+$ ) ]]; then
  gpu="$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader -i "$device" 2>/dev/null | head -n 1 || true)"
fi
timing_cache=()
if [[ -n "$gpu" ]]; then
  timing_cache=("--timingCacheFile=timing-$(printf '%s' "$gpu" | tr -cs 'A-Za-z0-9.' '-').cache")
else
  echo "build_engine.sh: cannot tell which GPU is CUDA device 0; building without a timing cache" >&2
fi
"""


def _write_script(path: Path, command: list[str]) -> None:
    path.write_text(
        "#!/usr/bin/env bash\n"
        "# Builds model.engine from the ONNX beside this script with TensorRT's trtexec (10.x or 11.x),\n"
        "# the same build configuration as `deploykit build ... --target tensorrt` (written by deploykit).\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        f"{_TIMING_CACHE_BY_GPU}"
        f'{shlex.join(command)} ${{timing_cache[@]+"${{timing_cache[@]}}"}}\n'
    )
    path.chmod(0o755)


def _calibration_arrays(calibration: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(calibration inputs, held-out inputs, held-out labels, summary) from a CalibrationSet or array."""
    import numpy as np

    if calibration is None:
        return None, None, None, {}
    if isinstance(calibration, np.ndarray):
        summary = {"source": "array", "count": len(calibration), "shape": list(calibration.shape)}
        return calibration, calibration, None, summary
    return calibration.inputs, calibration.held_out, calibration.held_out_labels, calibration.summary()


def _onnxruntime_check(reference_onnx: Path, candidate_onnx: Path, inputs: Any, labels: Any,
                       threads: int) -> dict[str, Any]:
    """The engine's source ONNX against the FP32 ONNX, both on ORT's CPU provider."""
    import numpy as np

    from deploykit.backends.qdq import run_onnxruntime
    from deploykit.verify import compare

    reference = run_onnxruntime(reference_onnx, inputs, threads=threads)
    candidate = run_onnxruntime(candidate_onnx, inputs, threads=threads)
    figures: dict[str, Any] = {"reference": "onnxruntime fp32 on the exported ONNX",
                               "candidate": f"onnxruntime on {candidate_onnx.name}",
                               **compare(reference, candidate).to_dict()}
    if labels is not None:
        figures["top1_reference"] = float(np.mean(reference.argmax(1) == labels))
        figures["top1_candidate"] = float(np.mean(candidate.argmax(1) == labels))
    return figures


def emit_tensorrt_bundle(onnx_path: Path, out_dir: Path, precision: str, calibration: Any, *,
                         options: dict[str, Any] | None = None, threads: int = 2) -> dict[str, Any]:
    """Write what builds the engine elsewhere: the ONNX, calibration summary, trtexec script.

    Needs no GPU and no TensorRT. Returns the backend facts for build.json, with the ONNX
    Runtime figures of the written ONNX against the FP32 one (on held-out inputs).
    """
    import onnx

    from deploykit.backends.qdq import quantize_qdq

    options = resolve_options("tensorrt", OPTIONS, options or {}, precision)
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    input_name, shape = _input_spec(onnx_path)
    profile = batch_profile(shape, options)
    source = out_dir / onnx_file_for(precision)
    inputs, held_out, labels, summary = _calibration_arrays(calibration)
    facts: dict[str, Any] = {"onnx_file": source.name, "input": {"name": input_name, "shape": shape},
                             "profile": profile, "batch": shape[0] if profile is None else None,
                             "strongly_typed": True, "qdq": None, "calibration_file": None}
    if precision == "fp32":
        shutil.copyfile(onnx_path, source)
    elif precision == "fp16":
        from deploykit.backends.qdq import to_float16

        onnx.save(to_float16(onnx.load(str(onnx_path))), str(source))
    elif precision == "int8":
        if inputs is None:
            raise DeployError("target tensorrt int8 needs calibration data: pass --calib DIR")
        report = quantize_qdq(onnx_path, source, inputs, method=options["calibrate_method"],
                              unquantized=options["unquantized_precision"], residual=options["quantize_residual"])
        facts["qdq"] = report.to_dict()
        calib_summary = {**summary, "method": options["calibrate_method"],
                         "scheme": "symmetric int8: per-channel weights, per-tensor activations, zero point 0",
                         "unquantized_precision": options["unquantized_precision"],
                         "residual_inputs_quantized": report.residual_inputs,
                         "activation_amax": {k: v * 127 for k, v in report.activation_scales.items()},
                         "activation_scales": report.activation_scales}
        (out_dir / CALIBRATION_FILE).write_text(json.dumps(calib_summary, indent=2) + "\n")
        facts["calibration_file"] = CALIBRATION_FILE
    else:
        raise DeployError(f"target tensorrt does not build precision {precision}; choose from fp32, fp16, int8")
    command = trtexec_command(source.name, input_name=input_name, profile=profile, options=options)
    _write_script(out_dir / SCRIPT_FILE, command)
    facts.update(trtexec=shlex.join(command), script=SCRIPT_FILE, options=options,
                 trtexec_timing_cache=BUNDLE_TIMING_CACHE)
    facts["onnxruntime_check"] = (
        _onnxruntime_check(onnx_path, source, held_out, labels, threads) if held_out is not None and len(held_out)
        else None
    )
    return facts


def default_timing_cache(environment: dict[str, Any]) -> Path:
    """Per TensorRT version and GPU: a cache from another pair is of no use and is rejected."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deploykit" / "tensorrt"
    gpu = "".join(ch if ch.isalnum() else "-" for ch in str(environment.get("gpu_name") or "gpu"))
    return root / f"timing-{environment.get('tensorrt_version')}-sm{environment.get('compute_capability')}-{gpu}.cache"


def check_compatible(built: dict[str, Any], current: dict[str, Any], engine: str) -> None:
    """Refuse an engine from another TensorRT version or GPU, before TensorRT reads it."""
    was, now = built.get("tensorrt_version"), current.get("tensorrt_version")
    if was != now:
        raise DeployError(
            f"{engine} was built with TensorRT {was}; this machine has TensorRT {now}. An engine loads only in "
            "the TensorRT version that built it: rebuild it here with `deploykit build ... --target tensorrt`"
        )
    gpu = ("gpu_name", "compute_capability")
    if [built.get(k) for k in gpu] != [current.get(k) for k in gpu]:
        raise DeployError(
            f"{engine} was built for {built.get('gpu_name')} (compute capability {built.get('compute_capability')}); "
            f"this machine has {current.get('gpu_name')} ({current.get('compute_capability')}). An engine is tuned "
            "for the GPU that built it: rebuild it here with `deploykit build ... --target tensorrt`"
        )


class TensorRTBackend(BackendBase):
    name = "tensorrt"
    precisions = ("fp32", "fp16", "int8")
    extra = "tensorrt"
    options = OPTIONS
    distributions = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")
    runtime_module = "tensorrt"
    exact_version = True  # an engine loads only in the TensorRT version that built it
    device = "gpu"
    export_batch = "dynamic"  # engines get a min/opt/max batch profile (when the pipeline honours it)

    def missing_reason(self) -> str:
        return str(MissingBackendError("tensorrt", NEEDS, "tensorrt"))

    def require(self) -> None:
        from deploykit.preflight import require_tensorrt

        require_tensorrt()  # every check (GPU, driver, CUDA, compute capability, TensorRT) with its fix

    def can_build(self, options: dict[str, Any]) -> bool:
        # emit_only: write what builds the engine elsewhere; the runtime is not needed here.
        return bool(options.get("emit_only")) or self.version() is not None

    def timer(self, runner: Any, inputs: Any):
        return runner.timer(inputs)  # CUDA events (see tensorrt_runtime)

    def clock(self) -> str:
        return "CUDA events around each execution (device time)"

    def built_with(self, facts: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
        environment = facts.get("environment") or {}
        return environment.get("tensorrt_version"), {k: environment.get(k) for k in ("gpu_name", "compute_capability")}

    def version(self) -> str | None:
        try:
            import tensorrt
        except Exception:  # ImportError, or OSError when the wheel's libnvinfer is missing
            return None
        return str(getattr(tensorrt, "__version__", "unknown"))

    def status(self) -> str:
        """One line for `deploykit targets`: what has and has not been run."""
        return STATUS

    def build(self, onnx_path: Path, out_dir: Path, config: BuildConfig) -> dict[str, Any]:
        options = resolve_options(self.name, self.options, config.options, config.precision)
        facts = None
        if not options["emit_only"]:
            from deploykit.preflight import require_tensorrt

            facts = require_tensorrt()  # before the minutes of calibration, not after
        bundle = emit_tensorrt_bundle(onnx_path, out_dir, config.precision, config.calibration,
                                      options=options, threads=config.threads)
        if facts is None:
            logger.info("emit-only: wrote %s; run %s on a machine with TensorRT", bundle["onnx_file"], SCRIPT_FILE)
            return {**bundle, "emit_only": True, "model_file": None, "environment": None}
        # Not executed in deploykit's test environment (no GPU, no TensorRT): see the module docstring.
        from deploykit.backends.tensorrt_runtime import build_engine

        environment = facts.environment()
        cache = Path(options["timing_cache"]) if options["timing_cache"] else default_timing_cache(environment)
        built = build_engine(out_dir / bundle["onnx_file"], out_dir / ENGINE_FILE, input_name=bundle["input"]["name"],
                             profile=bundle["profile"], options=options, timing_cache=cache)
        environment["tensorrt_version"] = built.pop("tensorrt_version")
        return {**bundle, "emit_only": False, "model_file": ENGINE_FILE, "environment": environment,
                "timing_cache": str(cache), "builder": built}

    def load(self, artifact: Artifact, *, threads: int):
        meta = artifact.backend
        if meta.get("emit_only") or not meta.get("model_file"):
            raise DeployError(
                f"{artifact.path} was written with --emit-only and holds no engine built by deploykit; "
                f"run its {SCRIPT_FILE} with trtexec, or build without --emit-only on a machine with TensorRT"
            )
        from deploykit.preflight import gather_facts, require_tensorrt

        facts = require_tensorrt(gather_facts())
        check_compatible(meta.get("environment") or {}, facts.environment(), str(artifact.path / meta["model_file"]))
        # Not executed in deploykit's test environment (no GPU, no TensorRT): see the module docstring.
        from deploykit.backends.tensorrt_runtime import TensorRTRunner

        return TensorRTRunner(artifact.path / meta["model_file"], profile=meta.get("profile"), threads=threads)

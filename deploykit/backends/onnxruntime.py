"""ONNX Runtime (CPU execution provider): FP32, FP16 and INT8 (static QDQ).

- fp32: the graph optimized by ORT (level ``extended``: portable across CPUs; ``all`` adds
  layout transforms tied to this machine's instruction set) and saved as ``model.onnx``.
- fp16: weights and activations in float16 (``onnxruntime.transformers.float16``), float32
  inputs and outputs; nodes without an fp16 CPU kernel run behind inserted casts.
- int8: ``onnxruntime.quantization.quantize_static`` in QDQ format over the calibration set,
  per-channel weights by default; MinMax, Entropy or Percentile ranges.

No bf16: the CPU execution provider has no bfloat16 convolution kernels on x86; its only bf16
arithmetic is the arm64 GEMM fast-math switch (session config ``mlas.enable_gemm_fastmath_arm64_bfloat16``,
MatMul/Gemm only). The fp16 artifact's float16 nodes run behind casts where the CPU EP has no
fp16 kernel, so its arithmetic is recorded as fp32 on x86.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from deploykit.backends.base import (
    Artifact, BackendBase, BuildConfig, MaxDropKnobs, Option, installed_version, resolve_options, run_in_batches,
)
from deploykit.errors import DeployError, MissingBackendError
from deploykit.onnxio import fixed_batch, onnx_io
from deploykit.files import temp_dir
from deploykit.quiet import drop_log_records

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"

OPTIONS = {
    "optimization_level": Option("extended", "graph optimizations saved into the fp32 model",
                                 ("basic", "extended", "all"), ("fp32",)),
    "calibrate_method": Option("minmax", "how activation ranges are set", ("minmax", "entropy", "percentile"),
                               ("int8",)),
    "per_channel": Option(True, "one weight scale per output channel", precisions=("int8",)),
    "symmetric": Option(False, "symmetric activation ranges (zero point at the middle)", precisions=("int8",)),
    "activation_type": Option("uint8", "activation integer type; uint8 suits x86 (u8s8 kernels)",
                              ("uint8", "int8"), ("int8",)),
    "reduce_range": Option(False, "7-bit weights: avoids u8s8 overflow on x86 CPUs without VNNI",
                           precisions=("int8",)),
    "nodes_to_exclude": Option("", "comma-separated ONNX node names kept in float (mixed precision)",
                               precisions=("int8",)),
    "x64_quant_precision": Option(True, "x86 CPUs without VNNI: run u8s8 products as u8u8 where a weight exceeds "
                                  "7 bits (exact, slower); off: their int16 sums saturate", precisions=("int8",)),
}

# ORT's session setting behind x64_quant_precision (onnxruntime PR #12088). On x86 CPUs without VNNI,
# MLAS multiplies u8 activations by s8 weights with vpmaddubsw, which adds two products into a
# saturating int16: 255 * 127 * 2 overflows it, so per-channel weights (which use the full int8
# range in every channel) lose accuracy there, by 3.6 top-1 points on the trained RepVGG-A0 on an
# AVX2 AMD EPYC (reports/ort-int8-x86-saturation.md). With the setting, ORT converts those weights
# to u8 and runs u8u8 kernels, which do not saturate; on CPUs with VNNI the products are exact either way,
# and on arm64 the setting is compiled out. ORT applies it where MLAS's u8u8 and u8s8 kernels differ
# (MlasPlatformU8S8Overflow), which is not the same as "no VNNI": it ran on an AMD EPYC Zen 5 with
# AVX512-VNNI (2026-12-02), not on an Intel Xeon with AMX.
X64_QUANT_PRECISION = "session.x64quantprecision"


def _ort():
    from deploykit.privacy import quiet_onnxruntime, quiet_runtimes

    quiet_runtimes()  # ORT_DISABLE_TELEMETRY must be set before onnxruntime is imported
    try:
        import onnxruntime
    except ImportError as err:
        raise MissingBackendError("onnxruntime", "ONNX Runtime") from err
    quiet_onnxruntime()
    return onnxruntime


def wanted_config(options: dict[str, Any]) -> dict[str, str]:
    """The session config entries a build with ``options`` asks for."""
    return {X64_QUANT_PRECISION: "1"} if options.get("x64_quant_precision", True) else {}


def session(path: Path, *, threads: int, level: str = "all", save_to: Path | None = None,
            config: dict[str, str] | None = None):
    """An ORT CPU session with explicit threads and session ``config`` entries (default: those of
    ``wanted_config({})``, exact int8 on CPUs without VNNI); optionally save the optimized graph."""
    ort = _ort()
    opts = ort.SessionOptions()
    for key, value in (wanted_config({}) if config is None else config).items():
        opts.add_session_config_entry(key, value)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,  # Q/DQ run as written: no integer kernels
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if save_to is not None:
        opts.optimized_model_filepath = str(save_to)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DeployError(f"onnxruntime cannot load {path.name}: {first}") from err


def session_with_fallback(path: Path, *, threads: int, config: dict[str, str] | None = None,
                          level: str = "all") -> tuple[Any, dict[str, str], str | None]:
    """(session, the config it runs with, why a wanted entry was dropped). ORT 1.32's u8s8 -> u8u8
    transformer (x86 CPUs where MLAS's u8u8 and u8s8 kernels differ: AVX2 ones, VNNI ones like AMD
    Zen 5; not the AMX Xeon measured) fails on some models ("Attempt to
    replace the existing tensor": one quantized initializer feeding two inputs of a node, as an
    untrained BatchNormalization whose scale and variance the exporter merged); the model then
    loads without it, as u8s8, and says so."""
    config = wanted_config({}) if config is None else config
    try:
        return session(path, threads=threads, level=level, config=config), config, None
    except DeployError as err:
        if X64_QUANT_PRECISION not in config:
            raise
        rest = {k: v for k, v in config.items() if k != X64_QUANT_PRECISION}
        loaded = session(path, threads=threads, level=level, config=rest)
        from deploykit.precision import cpu_flags, int16_saturates

        saturates = int16_saturates(cpu_flags())
        why = (f"onnxruntime cannot apply {X64_QUANT_PRECISION} to {path.name} ({err}); it runs u8s8 as is, "
               + ("whose int16 sums saturate on this CPU (no VNNI)" if saturates
                  else "exact on this CPU (its int8 dot products sum in int32)"))
        (logger.warning if saturates else logger.info)("%s", why)
        return loaded, rest, why


class OnnxRuntimeRunner:
    def __init__(self, path: Path, *, threads: int, config: dict[str, str] | None = None) -> None:
        self.threads = threads
        self.session, self.config, _ = session_with_fallback(path, threads=threads, config=config)
        self.input_name = self.session.get_inputs()[0].name
        self.batch = fixed_batch(onnx_io(path))

    def __call__(self, inputs):
        import numpy as np

        def run(x):
            return self.session.run(None, {self.input_name: x})[0]

        return run_in_batches(run, np.ascontiguousarray(inputs, dtype=np.float32), self.batch)


class _Reader:
    """The calibration tensors, one batch per call, as ``quantize_static`` reads them."""

    def __init__(self, input_name: str, inputs, batch: int) -> None:
        self.input_name, self.inputs, self.batch, self.pos = input_name, inputs, batch, 0

    def get_next(self) -> dict[str, Any] | None:
        if self.pos >= len(self.inputs):
            return None
        chunk = self.inputs[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return {self.input_name: chunk} if len(chunk) == self.batch else None

    def rewind(self) -> None:
        self.pos = 0


class OnnxRuntimeBackend(BackendBase):
    name = "onnxruntime"
    precisions = ("fp32", "fp16", "int8")
    extra = "onnxruntime"
    options = OPTIONS
    distributions = ("onnxruntime", "onnxruntime-gpu")
    runtime_module = "onnxruntime"
    max_drop_knobs = MaxDropKnobs(("per_channel", True), None, "nodes_to_exclude")

    def version(self) -> str | None:
        return installed_version("onnxruntime", "onnxruntime") or installed_version("onnxruntime", "onnxruntime-gpu")

    def build(self, onnx_path: Path, out_dir: Path, config: BuildConfig) -> dict[str, Any]:
        _ort()
        options = resolve_options(self.name, self.options, config.options, config.precision)
        out = out_dir / MODEL_FILE
        if config.precision == "fp32":
            session(onnx_path, threads=config.threads, level=options["optimization_level"], save_to=out)
        elif config.precision == "fp16":
            self._build_fp16(onnx_path, out)
        else:
            self._build_int8(onnx_path, out, config, options)
        # Fails here, not at first use, if the result does not load; the config it loads with is
        # what it is verified and run with (runtime_config).
        _, session_config, dropped = session_with_fallback(out, threads=config.threads, config=wanted_config(options))
        from deploykit.precision import Arithmetic, cpu_flags, int8_dot_note

        # ORT's API does not expose kernel precision per node; what is known is stated.
        dot = int8_dot_note(cpu_flags(), X64_QUANT_PRECISION in session_config)
        note = {"fp16": "fp16 storage; CPU EP computes fp16 nodes behind casts in fp32",
                "int8": "; ".join(filter(None, ["QDQ: int8 convolutions/matmuls, fp32 elsewhere", dot]))
                }.get(config.precision, "")
        arithmetic = Arithmetic(config.precision, "fp32", True, (), note=note)
        return {"model_file": MODEL_FILE, "batch": fixed_batch(onnx_io(out)), "options": options,
                "session_config": session_config, "session_config_dropped": dropped,
                "inference_precision": "fp32", "arithmetic": arithmetic.to_dict()}

    def _build_fp16(self, onnx_path: Path, out: Path) -> None:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
        onnx.save(model, str(out))

    def _build_int8(self, onnx_path: Path, out: Path, config: BuildConfig, options: dict[str, Any]) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        calib = config.calibration
        if calib is None:
            raise DeployError("int8 needs calibration data")
        io = onnx_io(onnx_path)
        reader = _Reader(io["inputs"][0]["name"], calib.inputs, fixed_batch(io) or 1)
        with temp_dir("ort") as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            try:
                quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
                excluded = [n.strip() for n in options["nodes_to_exclude"].split(",") if n.strip()]
                if excluded:  # ORT ignores unknown names silently; a typo must not pass
                    import onnx

                    unknown = sorted(set(excluded) - {n.name for n in onnx.load(str(prepared)).graph.node})
                    if unknown:
                        raise DeployError(f"option nodes_to_exclude: no node named {', '.join(unknown)} in the model")
                # ORT's QDQ quantizer logs "Axis 1 is out-of-range for weight ..." on the root logger for
                # every 1-D weight (standalone BN/LayerNorm scales) when per-channel is on: noise, not news.
                with drop_log_records("", r"^Axis -?\d+ is out-of-range for weight ", "ORT per-channel axis notes on 1-D weights"):
                    quantize_static(
                        str(prepared), str(out), reader,
                        quant_format=QuantFormat.QDQ,
                        per_channel=options["per_channel"],
                        reduce_range=options["reduce_range"],
                        activation_type=QuantType.QUInt8 if options["activation_type"] == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method={
                            "minmax": CalibrationMethod.MinMax,
                            "entropy": CalibrationMethod.Entropy,
                            "percentile": CalibrationMethod.Percentile,
                        }[options["calibrate_method"]],
                        nodes_to_exclude=excluded,
                        extra_options={"ActivationSymmetric": options["symmetric"], "WeightSymmetric": True},
                    )
            except DeployError:
                raise
            except Exception as err:
                raise DeployError(f"onnxruntime int8 quantization failed: {type(err).__name__}: {err}") from err

    def runtime_config(self, facts: dict[str, Any]) -> dict[str, str]:
        return dict(facts.get("session_config") or {})  # none recorded: built before there was one

    def variants(self, precision: str, flags: frozenset[str]) -> dict[str, dict[str, Any]]:
        from deploykit.precision import int16_saturates

        if precision != "int8" or not int16_saturates(flags):
            return {}
        # Without VNNI the exact default (u8u8 where a weight exceeds 7 bits) costs latency: 1.64x the
        # saturating u8s8 kernels on a Zen 3 EPYC, 1.20x on a Zen 1 (reports/ort-int8-x86-saturation*.md);
        # whether a model bears saturation, or escapes it with 7-bit or per-tensor weights, only its
        # accuracy says.
        fast = {"x64_quant_precision": False}
        return {"int16 sums": fast, "7-bit weights": {**fast, "reduce_range": True},
                "per-tensor weights": {**fast, "per_channel": False}}

    def load(self, artifact: Artifact, *, threads: int) -> OnnxRuntimeRunner:
        return OnnxRuntimeRunner(artifact.path / artifact.backend["model_file"], threads=threads,
                                 config=self.runtime_config(artifact.backend))

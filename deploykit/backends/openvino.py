"""OpenVINO (CPU plugin): IR ``model.xml``/``model.bin`` in FP32, BF16, FP16 or INT8.

A precision names the arithmetic (``INFERENCE_PRECISION_HINT``), decided from the CPU's flags
(``deploykit.precision``), and the executed precision per op kind is read back from the compiled
model's runtime model and recorded:

- fp32: f32 pinned, so results do not depend on the machine. OpenVINO's own default on a CPU
  with AVX512-BF16/AMX is bf16: that one is ``--precision bf16``.
- bf16: bf16 arithmetic; refused on a CPU without AVX512-BF16/AMX-BF16 (OpenVINO would emulate it
  on plain AVX-512 and silently run f32 on AVX2).
- fp16: weights compressed to float16; f16 arithmetic where the CPU has AVX512-FP16/AMX-FP16,
  else f32 arithmetic on fp16-stored weights (recorded as not native).
- int8: NNCF post-training quantization (``nncf.quantize``) on the calibration set; the float
  parts run in the fastest native float arithmetic (``--option float_precision=auto``) unless
  its outputs leave that precision's tolerance of the f32 ones on the held-out inputs, then
  f32. With ``--option max_drop=X`` (top-1 points, as ``--max-drop``) and labeled calibration data,
  ``nncf.quantize_with_accuracy_control`` keeps the top-1 drop within X.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from deploykit.backends.base import (
    Artifact, BackendBase, BuildConfig, MaxDropKnobs, Option, installed_version, resolve_options, run_in_batches,
)
from deploykit.errors import DeployError, MissingBackendError

MODEL_FILE = "model.xml"

OPTIONS = {
    "preset": Option("performance", "performance: symmetric activations; mixed: asymmetric (better for "
                     "non-ReLU activations)", ("performance", "mixed"), ("int8",)),
    "fast_bias_correction": Option(True, "fast (True) or full (False) bias correction", precisions=("int8",)),
    "ignored_scope": Option("", "comma-separated node names kept in float", precisions=("int8",)),
    "float_precision": Option("auto", "arithmetic of the parts left in float: auto = the fastest native one "
                              "that passes verification", ("auto", "fp32", "bf16", "fp16"), ("int8",)),
    "max_drop": Option(None, "largest top-1 drop allowed, in points (1.0 = one point); needs labeled "
                       "calibration data", precisions=("int8",), kind=float, bounds=(0.0, 100.0)),
}


def _openvino():
    from deploykit.privacy import quiet_runtimes

    quiet_runtimes()
    try:
        import openvino
    except ImportError as err:
        raise MissingBackendError("openvino", "OpenVINO") from err
    return openvino


def _first_line(err: Exception) -> str:
    """The informative line of OpenVINO's multi-line errors (they open with a source location)."""
    lines = [line.strip(" -") for line in str(err).strip().splitlines() if line.strip(" -")]
    for marker in ("no conversion rule", "not supported", "unsupported"):
        hit = next((line for line in lines if marker in line.lower()), None)
        if hit:
            return hit[:300]
    useful = [line for line in lines if not line.startswith("Check '")]
    return (useful or lines or [type(err).__name__])[0][:300]


# deploykit precision -> OpenVINO element type of INFERENCE_PRECISION_HINT
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def compile_model(path: Path, *, threads: int, arithmetic: str = "fp32"):
    """The model compiled for CPU with explicit threads, one stream, latency hint, the given arithmetic."""
    ov = _openvino()
    import openvino.properties as props
    import openvino.properties.hint as hints

    config = {
        props.inference_num_threads: threads,
        props.num_streams: 1,
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        hints.inference_precision: getattr(ov.Type, HINTS[arithmetic]),
    }
    try:
        return ov.Core().compile_model(str(path), "CPU", config)
    except Exception as err:  # OpenVINO raises RuntimeError subclasses with multi-line text
        raise DeployError(f"openvino cannot compile {path.name}: {_first_line(err)}") from err


def runtime_precisions(compiled: Any) -> dict[str, int]:
    """How many executed ops run at each precision (``runtimePrecision`` of the runtime model)."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "runtimePrecision" in info:
            precision = info["runtimePrecision"].astype(str)
            counts[precision] = counts.get(precision, 0) + 1
    return counts


def _openvino_op_name(node: Any) -> str:
    # OpenVINO's ONNX frontend splits Conv/Gemm with a bias into the op "<node>/WithoutBiases" + Add.
    return f"{node.name}/WithoutBiases" if len(node.input) > 2 and node.input[2] else node.name


# Precisions a CPU kernel's name ends with (``primitiveType``: brgconv_avx2_f32, jit_avx2_I8, ...).
KERNEL_PRECISIONS = ("f32", "bf16", "f16", "i8", "u8")


def _executed(info: Any) -> str:
    """The precision an op computes in: its kernel's, where the kernel's name says it, else
    ``runtimePrecision``. The two differ for fp16-stored weights on a CPU without fp16 units
    (AVX2): runtimePrecision says f16 (the weights' type) while the kernel, e.g. brgconv_avx2_f32,
    decompresses them and computes in f32 (measured: 3e-7 from f32 math on f16-rounded weights)."""
    kernel = info["primitiveType"].astype(str).rsplit("_", 1)[-1].lower() if "primitiveType" in info else ""
    return kernel if kernel in KERNEL_PRECISIONS else info["runtimePrecision"].astype(str)


def executed_precision(compiled: Any) -> dict[str, dict[str, int]]:
    """Op kind (``layerType``) -> {executed precision: op count}, constants left out."""
    kinds: dict[str, dict[str, int]] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "runtimePrecision" not in info or "layerType" not in info:
            continue
        kind, precision = info["layerType"].astype(str), _executed(info)
        if kind == "Const":
            continue
        kinds.setdefault(kind, {})
        kinds[kind][precision] = kinds[kind].get(precision, 0) + 1
    return kinds


class OpenVINORunner:
    def __init__(self, path: Path, *, threads: int, batch: int | None, arithmetic: str = "fp32") -> None:
        self.threads = threads
        self.compiled = compile_model(path, threads=threads, arithmetic=arithmetic)
        self.request = self.compiled.create_infer_request()
        self.batch = batch

    def __call__(self, inputs):
        import numpy as np

        def run(x):
            self.request.infer({0: x})
            return self.request.get_output_tensor(0).data.copy()

        return run_in_batches(run, np.ascontiguousarray(inputs, dtype=np.float32), self.batch)


class OpenVINOBackend(BackendBase):
    name = "openvino"
    precisions = ("fp32", "bf16", "fp16", "int8")
    extra = "openvino"
    options = OPTIONS
    distributions = ("openvino",)
    runtime_module = "openvino"
    max_drop_knobs = MaxDropKnobs(None, ("fast_bias_correction", False), "ignored_scope", _openvino_op_name)
    native_max_drop_option = "max_drop"  # NNCF's accuracy control does the search itself

    def version(self) -> str | None:
        return installed_version("openvino", "openvino")

    def build(self, onnx_path: Path, out_dir: Path, config: BuildConfig) -> dict[str, Any]:
        ov = _openvino()
        from deploykit.onnxio import fixed_batch, onnx_io

        from deploykit import precision as arith

        options = resolve_options(self.name, self.options, config.options, config.precision)
        flags = arith.cpu_flags()
        if config.precision == "int8":
            wanted = options["float_precision"]
            plan = arith.fastest_float(flags) if wanted == "auto" else arith.resolve(wanted, flags)
        else:
            plan = arith.resolve(config.precision, flags)  # bf16 without units: one line, before converting
        try:
            model = ov.convert_model(str(onnx_path))
        except Exception as err:
            raise DeployError(f"openvino cannot convert {onnx_path.name}: {_first_line(err)}") from err
        facts: dict[str, Any] = {}
        if config.precision == "int8":
            model, facts = self._quantize(model, config, options)
        ov.save_model(model, str(out_dir / MODEL_FILE), compress_to_fp16=config.precision == "fp16")
        batch = fixed_batch(onnx_io(onnx_path))
        float_check = None
        if config.precision == "int8" and plan.executes != "fp32":
            plan, float_check = self._check_float_parts(out_dir / MODEL_FILE, plan, config, batch)
        compiled = compile_model(out_dir / MODEL_FILE, threads=config.threads, arithmetic=plan.executes)
        return {
            "model_file": MODEL_FILE,
            "weights_file": "model.bin",
            "batch": batch,
            "options": options,
            # The arithmetic the artifact is compiled with (load() uses it), and why.
            "inference_precision": plan.executes,
            "arithmetic": {**plan.to_dict(), "hint": HINTS[plan.executes], "float_parts_check": float_check},
            "executed_precision": executed_precision(compiled),
            "runtime_precisions": runtime_precisions(compiled),
            **facts,
        }

    def _check_float_parts(self, path: Path, plan: Any, config: BuildConfig,
                           batch: int | None) -> tuple[Any, dict[str, Any]]:
        """INT8: keep the faster float arithmetic only if it stays within its tolerance of f32."""
        from deploykit.precision import Arithmetic
        from deploykit.verify import TOLERANCES, compare, judge

        inputs = config.calibration.held_out
        fast = OpenVINORunner(path, threads=config.threads, batch=batch, arithmetic=plan.executes)(inputs)
        exact = OpenVINORunner(path, threads=config.threads, batch=batch, arithmetic="fp32")(inputs)
        tolerance = TOLERANCES[plan.executes]
        problems = judge(compare(exact, fast), tolerance)
        check = {"against": "the same int8 model with f32 float parts", "samples": len(inputs),
                 "tolerance": tolerance.to_dict(), "passed": not problems, "problems": problems}
        if problems:
            plan = Arithmetic(plan.precision, "fp32", True, plan.features,
                              note=f"{plan.executes} float parts failed verification; f32 kept")
        return plan, check

    def _quantize(self, model: Any, config: BuildConfig, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        import nncf

        calib = config.calibration
        if calib is None:
            raise DeployError("int8 needs calibration data")
        names = [n.strip() for n in options["ignored_scope"].split(",") if n.strip()]
        common = dict(
            preset=nncf.QuantizationPreset(options["preset"]),
            subset_size=len(calib.inputs),
            fast_bias_correction=options["fast_bias_correction"],
            ignored_scope=nncf.IgnoredScope(names=names) if names else None,
        )
        dataset = nncf.Dataset(list(calib.batches(1)))
        # NNCF draws rich progress bars on stdout; a library must not print, so they are dropped.
        with contextlib.redirect_stdout(io.StringIO()):
            return self._run_nncf(nncf, model, dataset, calib, options, common)

    def _run_nncf(self, nncf: Any, model: Any, dataset: Any, calib: Any, options: dict[str, Any],
                  common: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        try:
            if options["max_drop"] is None:
                return nncf.quantize(model, dataset, **common), {}
            if calib.held_out_labels is None or not len(calib.held_out_labels):
                raise DeployError("max_drop needs labeled calibration data (one folder per class)")
            validation = nncf.Dataset(list(zip(calib.held_out, calib.held_out_labels)), lambda item: item[0][None])
            quantized = nncf.quantize_with_accuracy_control(
                model, dataset, validation, _top1_on, max_drop=options["max_drop"] / 100.0, **common
            )  # NNCF's max_drop is a fraction; recorded as NNCF took it
            return quantized, {"accuracy_control": {"max_drop": options["max_drop"] / 100.0,
                                                    "samples": len(calib.held_out)}}
        except DeployError:
            raise
        except Exception as err:  # NNCF raises ValidationError, RuntimeError, ... with long texts
            raise DeployError(f"openvino int8 quantization (nncf) failed: {_first_line(err)}") from err

    def runtime_config(self, facts: dict[str, Any]) -> dict[str, str]:
        # The arithmetic the build verified (bf16/f16 where the CPU has the units; int8 artifacts: their
        # float parts). A runner that left it out would get OpenVINO's default: bf16 on CPUs with bf16
        # units even for an fp32 artifact; one that forced f32 would run a bf16 artifact at fp32 speed.
        return {"INFERENCE_PRECISION_HINT": HINTS[facts.get("inference_precision", "fp32")]}

    def load(self, artifact: Artifact, *, threads: int) -> OpenVINORunner:
        backend = artifact.backend
        return OpenVINORunner(artifact.path / backend["model_file"], threads=threads, batch=backend.get("batch"),
                              arithmetic=backend.get("inference_precision", "fp32"))


def _top1_on(compiled: Any, items: Any) -> float:
    """NNCF's validation_fn: top-1 of a compiled model over (input, label) pairs."""
    hits = total = 0
    output = compiled.outputs[0]
    for x, label in items:
        hits += int(compiled(x[None])[output].argmax() == label)
        total += 1
    return hits / max(total, 1)

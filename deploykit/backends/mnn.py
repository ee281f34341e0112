"""MNN (CPU): ``model.mnn`` in FP32, FP16 (weights), W8 (int8 weights, float compute) or INT8.

The converter and the offline quantizer run in a subprocess (``_mnn_worker``): they can abort
or segfault, and a crash becomes one DeployError naming what to change. INT8 calibrates on the
*same* tensors as the other backends: they are written in the quantizer's "sequence" input
format (one folder per sample holding ``<input name>.txt``), so MNN's own image decoding and
resizing never enter. ``feature_quantize_method`` EMA is the default; KL and ADMM crash or
lose accuracy on some graphs.

Why EMA calibration is slow, and what is done about it: MNN's EMA method runs every calibration
sample as one step of its *training* engine (a fake-quantized Express module in training mode,
then ``solver->step`` with learning rate 0), at 10-30x the cost of an inference pass (profiled
here: RepVGG-A0 at 32x32 took 0.36-0.9 s per sample against ~30 ms for a float forward pass).
A larger ``batch_size`` does not help: with sequence inputs each step keeps only the last sample
of its batch (checked: batch 10 over 20 samples gives the byte-identical model of batch 1 over
samples 10 and 20). So ``--option ema_steps`` (default 100) bounds the steps: EMA steps through an
evenly spaced subset of the calibration set, recorded in build.json as ``calibration_samples_used``.

No bf16: the wheel's ``Precision_Low_BF16`` mode stores bf16 and computes with AVX2/FMA fp32
kernels on x86 (GemmAVX2FMABF16), so it is not bf16 arithmetic; deploykit offers no mnn bf16.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deploykit.backends.base import (
    Artifact, BackendBase, BuildConfig, MaxDropKnobs, Option, installed_version, resolve_options,
)
from deploykit.errors import DeployError, MissingBackendError
from deploykit.files import temp_dir

MODEL_FILE = "model.mnn"
TOOL_TIMEOUT_S = 3600

OPTIONS = {
    "feature_quantize_method": Option("EMA", "activation ranges: EMA (moving average), KL or ADMM",
                                      ("EMA", "KL", "ADMM"), ("int8",)),
    "weight_quantize_method": Option("MAX_ABS", "weight scales", ("MAX_ABS", "ADMM"), ("int8",)),
    "ema_steps": Option(100, "EMA: calibration samples stepped through (each one costs a training step)",
                        precisions=("int8",), bounds=(1, 100000)),
    # Outside 1..127 MNN's quantizer logs an error and then segfaults.
    "feature_clamp_value": Option(127, "activation range [-v, v]; lower it when int8 overflows",
                                  precisions=("int8",), bounds=(1, 127)),
}

_ERROR_MARKS = ("error", "not support", "failed", "check failed", "invalid")


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Swallow what MNN's C code prints on stdout (a CPU-feature banner, precision notes)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced (pytest capture, notebooks)
        yield
        return
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            try:
                yield
            finally:
                libc.fflush(None)
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _mnn():
    try:
        with _quiet_stdout():
            import MNN
    except ImportError as err:
        raise MissingBackendError("mnn", "MNN") from err
    return MNN


def _tool_message(output: str) -> str:
    """The line of a tool's log that says what went wrong: an unsupported op first, else the last error."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    unsupported = [line for line in lines if "not support" in line.lower()]
    marked = [line for line in lines if any(m in line.lower() for m in _ERROR_MARKS)]
    return (unsupported or marked or lines or ["no output"])[-1][:300]


def run_tool(args: list[str], *, what: str, hint: str = "", produces: Path | None = None) -> str:
    """Run ``_mnn_worker ARGS`` in a subprocess; a crash or a missing output is a DeployError."""
    from deploykit.procs import run_python_module

    try:
        done = run_python_module("deploykit.backends._mnn_worker", args, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise DeployError(f"{what} ran over {TOOL_TIMEOUT_S} s and was stopped{hint}") from err
    output = done.stdout + done.stderr
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise DeployError(f"{what} crashed ({name}){hint}")
    if done.returncode != 0 or (produces is not None and not (produces.is_file() and produces.stat().st_size)):
        raise DeployError(f"{what} failed: {_tool_message(output)}{hint}")
    return output


def _write_sequence_inputs(folder: Path, input_name: str, inputs: Any) -> None:
    """One folder per sample with ``<input_name>.txt`` (whitespace-separated floats)."""
    for i, sample in enumerate(inputs):
        sample_dir = folder / f"{i:06d}"
        sample_dir.mkdir(parents=True)
        shape = [1, *sample.shape]
        (sample_dir / "input.json").write_text(json.dumps({"inputs": [{"name": input_name, "shape": shape}]}))
        sample.astype("float32").tofile(str(sample_dir / f"{input_name}.txt"), sep=" ", format="%.7g")


class MNNRunner:
    def __init__(self, path: Path, *, threads: int, precision: str, io: dict[str, Any]) -> None:
        MNN = _mnn()
        self.threads = threads
        self.expr = MNN.expr
        mode = "low" if precision == "fp16" else "high"  # low: fp16 arithmetic where the CPU has it
        with _quiet_stdout():
            self.runtime = MNN.nn.create_runtime_manager(({"backend": "CPU", "numThread": threads, "precision": mode},))
            self.module = MNN.nn.load_module_from_file(
                str(path), [io["inputs"][0]["name"]], [io["outputs"][0]["name"]], runtime_manager=self.runtime
            )
        if self.module is None:
            raise DeployError(f"MNN cannot load {path}")

    def __call__(self, inputs):
        import numpy as np

        x = np.ascontiguousarray(inputs, dtype=np.float32)
        var = self.expr.const(x, list(x.shape), self.expr.NCHW)
        out = self.module.forward(var)
        out = out[0] if isinstance(out, list) else out
        # MNN may hand back its packed NC4HW4 layout; NCHW is what every other runner returns.
        out = self.expr.convert(out, self.expr.NCHW)
        return np.array(out.read(), dtype=np.float32, copy=True)


class MNNBackend(BackendBase):
    name = "mnn"
    precisions = ("fp32", "fp16", "w8", "int8")
    extra = "mnn"
    options = OPTIONS
    distributions = ("MNN",)
    runtime_module = "MNN"
    # MNN's quantizer: MAX_ABS weights are per channel. Its skip_quant_op_names is read only by the
    # KL/ADMM path; the EMA path (NN::turnQuantize on the whole graph) quantizes every conv regardless
    # (measured with MNN 3.x: the same top-1 with and without it).
    max_drop_knobs = MaxDropKnobs(None, None, None, why_no_float="MNN's EMA quantizer (the one that runs here; KL "
                                  "and ADMM crash) ignores skip_quant_op_names and quantizes every layer")

    def version(self) -> str | None:
        # _tools (converter, quantizer) ships in the same wheel as MNN (inference).
        return installed_version("MNN", "MNN") if installed_version("_tools", "MNN") else None

    def build(self, onnx_path: Path, out_dir: Path, config: BuildConfig) -> dict[str, Any]:
        from deploykit.onnxio import onnx_io

        if self.version() is None:
            raise MissingBackendError("mnn", "MNN")
        options = resolve_options(self.name, self.options, config.options, config.precision)
        io = onnx_io(onnx_path)
        out = out_dir / MODEL_FILE
        flags = {"fp16": ["--fp16"], "w8": ["--weightQuantBits", "8"]}.get(config.precision, [])
        if config.precision != "int8":
            self._convert(onnx_path, out, flags)
        else:
            with temp_dir("mnn") as tmp:
                float_model = Path(tmp) / "float.mnn"
                self._convert(onnx_path, float_model, [])
                used = self._quantize(float_model, out, Path(tmp), io, config, options)
        from deploykit.precision import Arithmetic

        note = {"fp16": "fp16 weights; fp32 arithmetic on x86 (fp16 arithmetic only on arm64 with ASIMD-HP)",
                "w8": "int8 weights, fp32 arithmetic"}.get(config.precision, "")
        facts = {"model_file": MODEL_FILE, "batch": None, "options": options, "io": io,
                 "inference_precision": "fp32",
                 "arithmetic": Arithmetic(config.precision, "fp32", True, (), note=note).to_dict()}
        if config.precision == "int8":
            facts["calibration_samples_used"] = used
        return facts

    def _convert(self, onnx_path: Path, out: Path, flags: list[str]) -> None:
        args = ["convert", "-f", "ONNX", "--modelFile", str(onnx_path), "--MNNModel", str(out),
                "--bizCode", "deploykit", *flags]
        run_tool(args, what=f"MNN converter on {onnx_path.name}", produces=out)

    def _quantize(self, src: Path, out: Path, tmp: Path, io: dict[str, Any], config: BuildConfig,
                  options: dict[str, Any]) -> int:
        """Run MNN's quantizer; return how many calibration samples it stepped through."""
        calib = config.calibration
        if calib is None:
            raise DeployError("int8 needs calibration data")
        import numpy as np

        input_name = io["inputs"][0]["name"]
        samples = calib.inputs
        if options["feature_quantize_method"] == "EMA" and len(samples) > options["ema_steps"]:
            samples = samples[np.linspace(0, len(samples) - 1, options["ema_steps"]).round().astype(int)]
        _write_sequence_inputs(tmp / "calib", input_name, samples)
        settings = {
            "path": str(tmp / "calib"),
            "used_sample_num": len(samples),
            "input_type": "sequence",
            "inputs": [{"name": input_name, "shape": [1, *calib.inputs.shape[1:]]}],
            # Sequence inputs are read one sample per step; a larger batch would use only its last sample.
            "batch_size": 1,
            "quant_bits": 8,
            "feature_quantize_method": options["feature_quantize_method"],
            "weight_quantize_method": options["weight_quantize_method"],
            "feature_clamp_value": options["feature_clamp_value"],
            "weight_clamp_value": 127,
            "debug": False,
        }
        config_path = tmp / "quant.json"
        config_path.write_text(json.dumps(settings, indent=1))
        method = options["feature_quantize_method"]
        hint = "" if method == "EMA" else "; retry with --option feature_quantize_method=EMA"
        quantized = tmp / "quantized.mnn"  # the quantizer also drops a scales dump beside it
        run_tool(["quant", str(src), str(quantized), str(config_path)],
                 what=f"MNN quantizer (feature_quantize_method={method})", hint=hint, produces=quantized)
        shutil.move(str(quantized), str(out))
        return len(samples)

    def load(self, artifact: Artifact, *, threads: int) -> MNNRunner:
        backend = artifact.backend
        return MNNRunner(artifact.path / backend["model_file"], threads=threads,
                         precision=artifact.precision, io=backend["io"])

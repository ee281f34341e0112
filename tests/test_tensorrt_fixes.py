"""Issue 18, part 1: the TensorRT target's fixes that run without TensorRT or a GPU.

Real where it can be: the INT8 Q/DQ models (residual Adds, FP16 for the rest) run on ONNX
Runtime against FP32; the emitted build_engine.sh runs in bash with stand-in trtexec and
nvidia-smi scripts on PATH. A stand-in ``tensorrt`` module object is injected only to test
deploykit's own logic at the seam with TensorRT (one logger per process, errors captured per
call, a corrupt timing cache, shapes an engine does not take); no TensorRT behaviour is claimed.
"""
from __future__ import annotations

import logging

import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.backends import tensorrt_runtime as trt_runtime
from deploykit.backends.tensorrt import SCRIPT_FILE, emit_tensorrt_bundle
from deploykit.errors import DeployError
from deploykit.preflight import FAIL, FIX_TORCH_CUDA, Facts, evaluate, require_tensorrt, select_gpu
from deploykit.backends.qdq import inspect_qdq, quantize_qdq, run_onnxruntime
from deploykit.backends.qdq_residual import find_residual_inputs
from deploykit.verify import compare

ROOT = Path(__file__).resolve().parents[1]


def _inputs(count: int, seed: int, shape: tuple[int, ...] = (3, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *shape)).astype(np.float32)


# --- the extra and the preflight message ------------------------------------------------------

def test_tensorrt_extra_brings_onnxruntime_and_says_how_to_get_cuda_torch() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("onnxruntime") for r in extras["tensorrt"])  # fp16 conversion, quantize_static
    assert not any(r.startswith("torch") for r in extras["tensorrt"])  # a CUDA pin would break CPU installs
    cpu_torch = Facts(gpu_name="NVIDIA L4", driver_version="550", compute_capability="8.9",
                      tensorrt_version="10.13.0.35")
    with pytest.raises(DeployError) as err:
        require_tensorrt(cpu_torch)
    assert FIX_TORCH_CUDA in str(err.value)
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu" in FIX_TORCH_CUDA


def test_compute_capability_floor_message_matches_the_warning() -> None:
    check = next(c for c in evaluate(Facts(gpu_name="GTX 1080", compute_capability="6.1"))
                 if c.name == "compute capability")
    assert check.status == FAIL and "needs 7.0 or newer (current releases 7.5)" in check.detail


# --- which GPU: the one CUDA device 0 of this process is ---------------------------------------

L4 = {"name": "NVIDIA L4", "driver_version": "550.54", "compute_capability": "8.9", "uuid": "GPU-aaaa1111-22"}
H100 = {"name": "NVIDIA H100 80GB HBM3", "driver_version": "550.54", "compute_capability": "9.0",
        "uuid": "GPU-bbbb3333-44"}


@pytest.mark.parametrize(("kwargs", "expected", "words"), [
    ({"uuid": "bbbb3333-44"}, H100, "by UUID"),  # PyTorch's uuid has no GPU- prefix
    ({"visible": "1,0", "order": "PCI_BUS_ID"}, H100, "PCI order"),
    ({"visible": "GPU-bbbb"}, H100, "CUDA_VISIBLE_DEVICES=GPU-bbbb"),  # a UUID prefix, as CUDA accepts
    ({"visible": "1"}, None, "fastest first"),  # index under CUDA's default order: no row to trust
    ({"visible": ""}, None, "no GPU visible"),
    ({"visible": "5", "order": "PCI_BUS_ID"}, None, "nvidia-smi lists 2"),
])
def test_select_gpu_respects_cuda_visible_devices(kwargs: dict, expected: dict | None, words: str) -> None:
    row, how = select_gpu([L4, H100], **kwargs)
    assert row == expected and words in how


def test_select_gpu_same_model_everywhere_is_unambiguous() -> None:
    row, how = select_gpu([H100, {**H100, "uuid": "GPU-cccc"}], visible="1")
    assert row["name"] == H100["name"] and "same model" in how


# --- the emitted build_engine.sh names its timing cache per GPU ---------------------------------

def _fake_tools(bin_dir: Path) -> None:
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > trtexec.args\n')
    (bin_dir / "nvidia-smi").write_text(
        '#!/usr/bin/env bash\necho "$@" >> nvidia-smi.calls\n'
        'case "$*" in *"-i 2"*|*"-i GPU-bbbb"*) echo "NVIDIA H100 80GB HBM3, 9.0";; *) echo "NVIDIA L4, 8.9";; esac\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)


@pytest.mark.parametrize(("env", "cache"), [
    ({}, "timing-NVIDIA-L4-8.9.cache"),
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, "timing-NVIDIA-H100-80GB-HBM3-9.0.cache"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-bbbb"}, "timing-NVIDIA-H100-80GB-HBM3-9.0.cache"),
    ({"CUDA_VISIBLE_DEVICES": "2", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, None),
])
def test_build_script_names_timing_cache_per_gpu(env: dict, cache: str | None, tmp_path: Path) -> None:
    fc = tmp_path / "fc.onnx"
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fc))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    facts = emit_tensorrt_bundle(fc, bundle, "fp32", None)
    _fake_tools(tmp_path / "bin")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CUDA_")}
    done = subprocess.run(["bash", str(bundle / SCRIPT_FILE)], capture_output=True, text=True, timeout=30,
                          env={**clean, **env, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    args = (bundle / "trtexec.args").read_text().split()
    assert args[: len(facts["trtexec"].split()) - 1] == facts["trtexec"].split()[1:]
    if cache is None:
        assert not any(a.startswith("--timingCacheFile") for a in args)
        assert "building without a timing cache" in done.stderr
    else:
        assert args[-1] == f"--timingCacheFile={cache}"


# --- residual Adds: which input is the skip ----------------------------------------------------

def _conv(name: str, x: str, y: str, cin: int, cout: int, rng: np.random.Generator) -> tuple[list, list]:
    weight = numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32), f"{name}.w")
    bias = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32) * 0.1, f"{name}.b")
    return [helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name, pads=[1, 1, 1, 1])], [weight, bias]


def _residual_model(path: Path) -> None:
    """stem -> r; Add(conv(relu(conv(r))), r) [identity skip]; Add(conv(relu(conv(s))), conv(s)) [conv skip];
    Add(conv(t), conv(t)) on one conv [not residual]; plus a bias Add [not residual]."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for part in [
        _conv("stem", "x", "stem_out", 3, 8, rng), ([helper.make_node("Relu", ["stem_out"], ["r"], name="relu0")], []),
        _conv("a1", "r", "a1_out", 8, 8, rng), ([helper.make_node("Relu", ["a1_out"], ["a1_act"], name="relu1")], []),
        _conv("a2", "a1_act", "a2_out", 8, 8, rng),
        ([helper.make_node("Add", ["a2_out", "r"], ["s"], name="identity_add")], []),
        _conv("b1", "s", "b1_out", 8, 8, rng), ([helper.make_node("Relu", ["b1_out"], ["b1_act"], name="relu2")], []),
        _conv("b2", "b1_act", "b2_out", 8, 8, rng), _conv("short", "s", "short_out", 8, 8, rng),
        ([helper.make_node("Add", ["b2_out", "short_out"], ["t"], name="conv_shortcut_add")], []),
        _conv("c", "t", "c_out", 8, 8, rng),
        ([helper.make_node("Add", ["c_out", "c_out"], ["u"], name="self_add")], []),
        ([helper.make_node("Add", ["u", "offset"], ["v"], name="bias_add"),
          helper.make_node("GlobalAveragePool", ["v"], ["pooled"]),
          helper.make_node("Flatten", ["pooled"], ["flat"]),
          helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], name="fc", transB=1)],
         [numpy_helper.from_array(np.full((1, 8, 1, 1), 0.5, np.float32), "offset"),
          numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "fc.w"),
          numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")]),
    ]:
        nodes += part[0]
        inits += part[1]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_residual_skip_inputs_follow_model_optimizers_rule(tmp_path: Path) -> None:
    _residual_model(tmp_path / "res.onnx")
    found = {(r.add, r.index, r.tensor) for r in find_residual_inputs(onnx.load(str(tmp_path / "res.onnx")))}
    # The identity skip r; for two convolutions the one nearer their common ancestor (the shortcut).
    assert found == {("identity_add", 1, "r"), ("conv_shortcut_add", 1, "short_out")}


@pytest.mark.parametrize(("unquantized", "residual"), [("fp16", True), ("fp32", False)])
def test_residual_qdq_model_on_onnxruntime(unquantized: str, residual: bool, tmp_path: Path) -> None:
    """The hand-built model, quantized: skip inputs through a Q/DQ (one needs its own calibration)."""
    _residual_model(tmp_path / "res.onnx")
    out = tmp_path / "q.onnx"
    report = quantize_qdq(tmp_path / "res.onnx", out, _inputs(16, 1, (3, 8, 8)), batch_size=8,
                          unquantized=unquantized, residual=residual)
    onnx.checker.check_model(str(out))
    assert report.ok and report.scale_type == ("float16" if unquantized == "fp16" else "float32")
    assert ({"identity_add:1", "conv_shortcut_add:1"} <= set(report.residual_inputs)) == residual
    held_out = _inputs(32, 2, (3, 8, 8))
    figures = compare(run_onnxruntime(tmp_path / "res.onnx", held_out), run_onnxruntime(out, held_out))
    assert figures.cosine_mean > 0.99


@pytest.mark.parametrize("name", ["ghostnet_050", "g_ghost_regnetx_002"])
def test_zoo_residual_model_int8_recipe_on_onnxruntime(name: str, tmp_path: Path) -> None:
    """Zoo models with skip connections at 32x32: the Model-Optimizer-style recipe against FP32 and
    against the earlier recipe, all on ONNX Runtime (the Q/DQ graph, not TensorRT's kernels)."""
    import torch

    from deploykit.export import export_onnx
    from deploykit.fuse import reparameterize
    from deploykit.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=10, cifar=True).eval()
    fused = reparameterize(model, input_shape=(1, 3, 32, 32), check=False).model
    source = tmp_path / "fp32.onnx"
    export_onnx(fused, source, input_size=32, batch="dynamic")
    calibration, held_out = _inputs(16, 0), _inputs(32, 1)
    new = quantize_qdq(source, tmp_path / "new.onnx", calibration, batch_size=8)
    old = quantize_qdq(source, tmp_path / "old.onnx", calibration, batch_size=8, unquantized="fp32", residual=False)
    graph = onnx.load(str(tmp_path / "new.onnx")).graph
    skips = {f"{r.add}:{r.index}" for r in find_residual_inputs(onnx.load(str(source)))}
    assert skips and skips <= set(new.residual_inputs) and len(new.residual_inputs) > len(old.residual_inputs)
    floats = {numpy_helper.to_array(i).dtype for i in graph.initializer if numpy_helper.to_array(i).dtype.kind == "f"}
    assert floats == {np.dtype(np.float16)} and graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert inspect_qdq(tmp_path / "old.onnx").scale_type == "float32"
    reference = run_onnxruntime(source, held_out)
    new_out, old_out = run_onnxruntime(tmp_path / "new.onnx", held_out), run_onnxruntime(tmp_path / "old.onnx", held_out)
    assert compare(reference, new_out).cosine_mean > 0.99 and compare(old_out, new_out).cosine_mean > 0.99


# --- stand-in tensorrt: one logger per process, errors per call ---------------------------------

class _Severity:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)


def _fake_tensorrt(engine: object | None = None) -> types.ModuleType:
    """A module object with the few names deploykit's code touches; records what it was given."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "0.0-stand-in"
    trt.loggers = []

    class ILogger:
        Severity = _Severity

        def __init__(self) -> None:
            pass

    class Runtime:
        def __init__(self, log: ILogger) -> None:
            trt.loggers.append(log)
            self.log = log

        def deserialize_cuda_engine(self, data: bytes) -> object | None:
            if engine is None:
                self.log.log(_Severity.ERROR, f"stand-in: cannot deserialize {len(data)} bytes")
            return engine

    trt.ILogger, trt.Runtime = ILogger, Runtime
    return trt


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch):
    trt = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_runtime, "_PROCESS_LOGGER", None)
    return trt


def test_one_logger_per_process_and_errors_per_runner(fake_trt, tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"12345")
    messages = []
    for _ in range(2):
        with pytest.raises(DeployError) as err:
            trt_runtime.TensorRTRunner(engine, profile=None, threads=1)
        messages.append(str(err.value))
    assert len(fake_trt.loggers) == 2 and fake_trt.loggers[0] is fake_trt.loggers[1]
    assert messages == [f"TensorRT cannot load {engine}: stand-in: cannot deserialize 5 bytes"] * 2


def test_captured_errors_stay_with_their_call(fake_trt) -> None:
    log = trt_runtime.process_logger()
    assert trt_runtime.process_logger() is log
    seen: dict[str, list[str]] = {}
    ready, logged = threading.Barrier(2), threading.Barrier(2)

    def call(name: str) -> None:
        with trt_runtime.captured_errors() as errors:
            ready.wait()
            log.log(_Severity.ERROR, f"error of {name}")
            log.log(_Severity.WARNING, f"warning of {name}")
            logged.wait()
        seen[name] = errors

    threads = [threading.Thread(target=call, args=(n,)) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"first": ["error of first"], "second": ["error of second"]}
    with trt_runtime.captured_errors() as errors:  # from a thread of TensorRT's own: to every open capture
        worker = threading.Thread(target=log.log, args=(_Severity.INTERNAL_ERROR, "from a worker"))
        worker.start()
        worker.join()
    assert errors == ["from a worker"] and trt_runtime._CAPTURES == {}


# --- timing cache: rejected or unreadable, the build goes on --------------------------------------

class _Config:
    def __init__(self, *, create: str = "ok", accept: bool = True) -> None:
        self.create, self.accept, self.attached = create, accept, []

    def create_timing_cache(self, data: bytes) -> object | None:
        if data and self.create == "raise":
            raise TypeError("stand-in: bad buffer")
        if data and self.create == "none":
            return None
        return ("cache", bytes(data))

    def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
        if cache is None:
            raise TypeError("set_timing_cache(): incompatible function arguments")  # what pybind11 would do
        ok = self.accept or cache == ("cache", b"")
        if ok:
            self.attached.append(cache)
        return ok


@pytest.mark.parametrize(("content", "config", "status"), [
    (None, _Config(), "new"),
    (b"good", _Config(), "reused"),
    (b"other gpu", _Config(accept=False), "rejected"),
    (b"garbage", _Config(create="none"), "unreadable"),
    (b"garbage", _Config(create="raise"), "unreadable"),
])
def test_timing_cache_failures_warn_and_build_on(content: bytes | None, config: _Config, status: str,
                                                 tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Other tests in the same worker (Ray clients, in-process CLI runs) may leave deploykit's loggers
    # disabled or not propagating; this test reads the warning through the root logger.
    for name in ("deploykit", trt_runtime.logger.name):
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    caplog.set_level(logging.WARNING, logger=trt_runtime.logger.name)
    path = tmp_path / "timing.cache"
    if content is not None:
        path.write_bytes(content)
    assert trt_runtime.attach_timing_cache(config, path) == status
    assert config.attached[-1] == (("cache", content) if status == "reused" else ("cache", b""))
    if status in ("rejected", "unreadable"):
        assert "timing cache" in caplog.text and str(path) in caplog.text


# --- shapes an engine does not take ---------------------------------------------------------------

@pytest.mark.parametrize(("shape", "engine_shape", "profile", "words"), [
    ((1, 3, 32, 32), (8, 3, 32, 32), None, "fixed-shape engine takes batches of exactly 8"),
    ((8, 3, 16, 16), (8, 3, 32, 32), None, "takes inputs of shape (8, 3, 32, 32)"),
    ((64, 3, 32, 32), (-1, 3, 32, 32), ((1, 3, 32, 32), (32, 3, 32, 32)), "outside the engine's optimization profile"),
    ((4, 3, 16, 16), (-1, 3, 32, 32), ((1, 3, 32, 32), (32, 3, 32, 32)), "dimension 2 must be 32"),
    ((4, 3, 32), (-1, 3, 32, 32), ((1, 3, 32, 32), (32, 3, 32, 32)), "rank-4"),
])
def test_check_input_shape_refuses(shape, engine_shape, profile, words: str) -> None:
    with pytest.raises(DeployError, match=words.replace("(", r"\(").replace(")", r"\)")):
        trt_runtime.check_input_shape(shape, engine_shape, profile)
    trt_runtime.check_input_shape(engine_shape if min(engine_shape) > 0 else (4, 3, 32, 32), engine_shape, profile)


def test_timers_refuse_a_batch_the_fixed_engine_does_not_take() -> None:
    """timer()/copy_timers() check before any buffer is bound (the context is never touched)."""
    runner = object.__new__(trt_runtime.TensorRTRunner)
    runner.input_shape, runner.input_profile, runner.fixed_batch = (8, 3, 32, 32), None, 8
    runner.context = None  # any call on it would raise AttributeError, not DeployError
    for call in (runner.timer, runner.copy_timers):
        with pytest.raises(DeployError, match="batches of exactly 8"):
            call(np.zeros((1, 3, 32, 32), np.float32))

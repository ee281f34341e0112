"""The TensorRT target: Q/DQ models, --emit-only bundles, preflight, build.json compatibility.

TensorRT itself cannot be installed where these tests were written (no GPU, and TensorRT's
libraries come only from NVIDIA's index). Everything that needs no TensorRT runs here for
real: the Q/DQ ONNX is built from real calibration data and measured with ONNX Runtime, and
the emitted build_engine.sh runs against stand-in trtexec/nvidia-smi scripts. The tests that
need TensorRT and a GPU skip with the reason. A stand-in ``tensorrt`` module object is used
only at the narrowest seams of deploykit's own logic around TensorRT (the process-wide logger
and per-call error capture, timing-cache failure handling, input-shape checks); those tests
say nothing about TensorRT itself.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.backends.base import BACKENDS, Artifact, BuildConfig, get_backend
from deploykit.backends.tensorrt import (
    CALIBRATION_FILE, ENGINE_FILE, SCRIPT_FILE, TensorRTBackend, check_compatible, emit_tensorrt_bundle,
)
from deploykit.errors import DeployError, MissingBackendError
from deploykit.models import get_entry, list_models
from deploykit.preflight import FAIL, OK, SKIP, WARN, Facts, evaluate, gather_facts, parse_nvidia_smi, require_tensorrt
from deploykit.backends.qdq import WEIGHTED_OPS, inspect_qdq, quantize_qdq, run_onnxruntime
from conftest import run_cli

MISSING = "target tensorrt needs an NVIDIA GPU and TensorRT: pip install 'deploykit[tensorrt]'"
FACTS = gather_facts()
try:
    require_tensorrt(FACTS)
    TENSORRT_HERE, WHY_NOT = True, ""
except DeployError as err:
    TENSORRT_HERE, WHY_NOT = False, str(err)
needs_tensorrt = pytest.mark.skipif(not TENSORRT_HERE, reason=f"needs TensorRT and an NVIDIA GPU: {WHY_NOT}")
without_tensorrt = pytest.mark.skipif(TENSORRT_HERE, reason="this machine has TensorRT and a GPU")

# One model per family: a family added to the zoo is covered here the moment it is registered.
FAMILIES = sorted({get_entry(n).family: n for n in reversed(list_models())}.values())
PRECISIONS = TensorRTBackend.precisions


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """name -> fused CIFAR model exported with a dynamic batch (random weights), once per session."""
    import torch

    from deploykit.export import export_onnx
    from deploykit.fuse import reparameterize
    from deploykit.models import create_model

    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("trt-onnx")

    def get(name: str) -> Path:
        if name not in cache:
            torch.manual_seed(0)
            model = create_model(name, num_classes=10, cifar=True).eval()
            fused = reparameterize(model, input_shape=(1, 3, 32, 32), check=False).model
            export_onnx(fused, root / f"{name}.onnx", input_size=32, batch="dynamic")
            cache[name] = root / f"{name}.onnx"
        return cache[name]

    return get


@pytest.fixture(scope="session")
def cifar_calibration(cifar_root: Path):
    from deploykit.calib import load_calibration

    return load_calibration(str(cifar_root), input_size=32, num_samples=128, num_verify=128, seed=0)


def _rng_inputs(count: int = 16) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, 3, 32, 32)).astype(np.float32)


# --- Q/DQ model -------------------------------------------------------------------------------

def _expected_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return rank - 1


def _assert_tensorrt_qdq(path: Path) -> int:
    """Check the Q/DQ rules directly on the graph (independently of inspect_qdq); return #weighted ops."""
    graph = onnx.load(str(path)).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    weighted = [n for n in graph.node if n.op_type in WEIGHTED_OPS]
    assert weighted
    for node in weighted:
        act_dq = producer[node.input[0]]
        assert act_dq.op_type == "DequantizeLinear", f"{node.name}: input not quantized"
        assert producer[act_dq.input[0]].op_type == "QuantizeLinear"
        assert init[act_dq.input[1]].size == 1, f"{node.name}: activation not per-tensor"
        assert init[act_dq.input[2]].dtype == np.int8 and not init[act_dq.input[2]].any()
        w_dq = producer[node.input[1]]
        assert w_dq.op_type == "DequantizeLinear", f"{node.name}: weight not quantized"
        weight, scale, zero = (init[name] for name in w_dq.input[:3])
        assert weight.dtype == np.int8 and weight.min() >= -127, f"{node.name}: weight not symmetric int8"
        axis = next(a.i for a in w_dq.attribute if a.name == "axis")
        assert axis == _expected_axis(node, weight.ndim), f"{node.name}: per-channel axis {axis}"
        assert scale.shape == (weight.shape[axis],) and (scale > 0).all()
        assert zero.dtype == np.int8 and not zero.any()
        if len(node.input) > 2 and node.input[2]:
            assert node.input[2] in init and init[node.input[2]].dtype in (np.float32, np.float16), \
                f"{node.name}: bias not float"
    return len(weighted)


@pytest.mark.parametrize("name", FAMILIES)
def test_qdq_model_follows_tensorrt_rules(name: str, exported, tmp_path: Path) -> None:
    out = tmp_path / "qdq.onnx"
    report = quantize_qdq(exported(name), out, _rng_inputs(8), batch_size=8)
    onnx.checker.check_model(str(out))
    count = _assert_tensorrt_qdq(out)
    assert report.ok and report.quantized_nodes == report.weighted_nodes == count
    logits = run_onnxruntime(out, _rng_inputs(4))
    assert logits.shape == (4, 10) and np.isfinite(logits).all()


def test_inspect_qdq_catches_what_tensorrt_rejects(exported, tmp_path: Path) -> None:
    """ORT's CPU defaults (asymmetric uint8, per-tensor weights, int32 bias) break three rules."""
    from deploykit.backends.qdq import CalibrationReader
    from onnxruntime.quantization import QuantFormat, quantize_static

    out = tmp_path / "cpu-style.onnx"
    quantize_static(str(exported("repvgg_a0")), str(out), CalibrationReader("input", _rng_inputs(8), 8),
                    quant_format=QuantFormat.QDQ)
    text = "\n".join(inspect_qdq(out).violations)
    assert "zero point must be int8 0" in text
    assert "per-channel scales on axis 0" in text
    assert "bias is quantized" in text
    assert not inspect_qdq(out).ok


def _gemm_matmul_model(path: Path) -> None:
    """x (N, 8) -> Gemm(transB=0, B (8, 6)) -> Gemm(transB=1, B (4, 6)) -> MatMul(B (4, 3))."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "b0"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "c0"),
        numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "b0", "c0"], ["h0"], name="gemm_plain", transB=0),
        helper.make_node("Gemm", ["h0", "b1"], ["h1"], name="gemm_transposed", transB=1),
        helper.make_node("MatMul", ["h1", "b2"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_per_channel_axis_follows_the_weight_layout(tmp_path: Path) -> None:
    _gemm_matmul_model(tmp_path / "fc.onnx")
    out = tmp_path / "fc.qdq.onnx"
    inputs = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    report = quantize_qdq(tmp_path / "fc.onnx", out, inputs, batch_size=8)
    graph = onnx.load(str(out)).graph
    producer = {o: n for n in graph.node for o in n.output}
    axes = {n.name: next(a.i for a in producer[n.input[1]].attribute if a.name == "axis")
            for n in graph.node if n.op_type in WEIGHTED_OPS}
    # Output channels: B (K, N) -> axis 1; transB=1 stores B as (N, K) -> axis 0.
    assert axes == {"gemm_plain": 1, "gemm_transposed": 0, "matmul": 1}
    assert report.ok and _assert_tensorrt_qdq(out) == 3


def test_qdq_refuses_old_opset(tmp_path: Path) -> None:
    _gemm_matmul_model(tmp_path / "fc.onnx")
    model = onnx.load(str(tmp_path / "fc.onnx"))
    model.opset_import[0].version = 11
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(DeployError, match="uses opset 11; Q/DQ for TensorRT needs opset 13 or newer"):
        quantize_qdq(tmp_path / "old.onnx", tmp_path / "q.onnx", np.zeros((4, 8), np.float32))


# --- --emit-only bundle ------------------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
def test_emit_only_bundle(precision: str, exported, tmp_path: Path) -> None:
    calibration = _rng_inputs(8) if precision == "int8" else None
    facts = emit_tensorrt_bundle(exported("repvgg_a0"), tmp_path, precision, calibration)
    files = sorted(p.name for p in tmp_path.iterdir())
    expected = [SCRIPT_FILE, f"model.{precision}.onnx"] + ([CALIBRATION_FILE] if precision == "int8" else [])
    assert files == sorted(expected) and ENGINE_FILE not in files
    script = (tmp_path / SCRIPT_FILE).read_text()
    assert os.access(tmp_path / SCRIPT_FILE, os.X_OK)
    last = script.strip().splitlines()[-1]
    assert last == facts["trtexec"] + ' ${timing_cache[@]+"${timing_cache[@]}"}'  # the per-GPU cache flag
    command = shlex.split(facts["trtexec"])
    assert command[0] == "trtexec" and f"--onnx=model.{precision}.onnx" in command
    assert f"--saveEngine={ENGINE_FILE}" in command and "--stronglyTyped" in command
    assert "--memPoolSize=workspace:1024M" in command and not any("--timingCacheFile" in c for c in command)
    assert ["--minShapes=input:1x3x32x32", "--optShapes=input:1x3x32x32", "--maxShapes=input:32x3x32x32"] == [
        c for c in command if c.split("=")[0] in ("--minShapes", "--optShapes", "--maxShapes")]
    # No precision flags: TensorRT 11 removed them; the ONNX's types carry the precision.
    assert not {"--fp16", "--int8", "--best"} & set(command)
    model = onnx.load(str(tmp_path / f"model.{precision}.onnx"))
    weights = {i.name: numpy_helper.to_array(i).dtype for i in model.graph.initializer}
    if precision == "int8":
        assert facts["qdq"]["ok"] and _assert_tensorrt_qdq(tmp_path / "model.int8.onnx") == 23
        assert facts["qdq"]["scale_type"] == "float16" and np.dtype(np.float16) in weights.values()
        summary = json.loads((tmp_path / CALIBRATION_FILE).read_text())
        assert summary["count"] == 8 and summary["method"] == "minmax"
        assert summary["unquantized_precision"] == "fp16"
        assert len(summary["activation_scales"]) == 23
    elif precision == "fp16":
        assert np.dtype(np.float16) in weights.values()
        assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # float32 I/O kept
    else:
        assert set(weights.values()) == {np.dtype(np.float32)}


def test_emit_only_fixed_batch_has_no_shape_flags(tmp_path: Path) -> None:
    _gemm_matmul_model(tmp_path / "fc.onnx")
    model = onnx.load(str(tmp_path / "fc.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    out = tmp_path / "bundle"
    out.mkdir()
    facts = emit_tensorrt_bundle(tmp_path / "fixed.onnx", out, "fp32", None)
    assert facts["profile"] is None and facts["batch"] == 4
    assert "Shapes=" not in facts["trtexec"]


def test_emit_only_int8_on_cifar(exported, cifar_calibration, tmp_path: Path) -> None:
    """The backend's emit-only build: Q/DQ calibrated on CIFAR-10, measured against FP32 with ORT."""
    backend = get_backend("tensorrt")
    config = BuildConfig(precision="int8", calibration=cifar_calibration, options={"emit_only": "true"})
    facts = backend.build(exported("repvgg_a0"), tmp_path, config)
    assert facts["emit_only"] is True and facts["model_file"] is None and facts["environment"] is None
    assert facts["qdq"]["ok"] and json.loads((tmp_path / CALIBRATION_FILE).read_text())["count"] == 128
    # Held-out images (never calibrated on), Q/DQ model vs the FP32 model, both on ONNX Runtime.
    check = facts["onnxruntime_check"]
    assert check["samples"] == 128
    assert check["cosine_mean"] > 0.99 and check["top1_agreement"] > 0.75
    assert {"top1_reference", "top1_candidate"} <= set(check)
    with pytest.raises(DeployError, match="written with --emit-only and holds no engine"):
        backend.load(Artifact.staged(tmp_path, "tensorrt", "int8", facts), threads=1)


def _build_has_emit_only() -> bool:
    from click.testing import CliRunner

    from deploykit.cli.build import build

    return "--emit-only" in CliRunner().invoke(build, ["--help"]).output


@pytest.mark.skipif(not _build_has_emit_only(),
                    reason="deploykit build has no --emit-only flag yet (the hook belongs in deploykit/cli/build.py)")
def test_cli_build_emit_only(cifar_root: Path, tmp_path: Path) -> None:
    """The issue's done-when command, on any machine: Q/DQ ONNX, calibration, trtexec script."""
    out = tmp_path / "bundle"
    done = run_cli("build", "repvgg_a0", "--cifar", "--num-classes", "10", "--target", "tensorrt",
                   "--precision", "int8", "--emit-only", "--calib", str(cifar_root), "--calib-samples", "64",
                   "--verify-samples", "64", "--out", str(out))
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "build.json").read_text())
    assert meta["backend"]["emit_only"] is True and not (out / ENGINE_FILE).exists()
    assert {"model.int8.onnx", CALIBRATION_FILE, SCRIPT_FILE} <= set(meta["files"])
    assert meta["backend"]["onnxruntime_check"]["samples"] == 64
    assert "trtexec --onnx=model.int8.onnx" in (out / SCRIPT_FILE).read_text()


# --- preflight and compatibility -----------------------------------------------------------------

H100 = dict(gpu_name="NVIDIA H100 80GB HBM3", driver_version="550.54.15", compute_capability="9.0",
            cuda_version="12.4", torch_cuda_available=True, tensorrt_version="10.13.0.35")


@pytest.mark.parametrize(("facts", "name", "status", "words"), [
    (H100, "tensorrt", OK, "TensorRT 10.13.0.35"),
    ({**H100, "tensorrt_version": "8.6.1"}, "tensorrt", FAIL, "too old; deploykit needs 10 or newer"),
    ({**H100, "tensorrt_version": None, "tensorrt_error": "OSError: libnvinfer.so.10"}, "tensorrt", FAIL,
     "installed but not importable: OSError: libnvinfer.so.10"),
    ({**H100, "compute_capability": "6.1"}, "compute capability", FAIL, "6.1"),
    ({**H100, "compute_capability": "7.0"}, "compute capability", WARN, "early TensorRT 10"),
    ({**H100, "cuda_version": None, "torch_cuda_available": False}, "cuda", FAIL, "CPU-only build"),
    ({"gpu_probe": "nvidia-smi not on PATH"}, "nvidia gpu", FAIL, "nvidia-smi not on PATH"),
    ({"gpu_probe": "nvidia-smi not on PATH"}, "compute capability", SKIP, "no GPU"),
])
def test_preflight_judgement(facts: dict, name: str, status: str, words: str) -> None:
    check = next(c for c in evaluate(Facts(**facts)) if c.name == name)
    assert check.status == status and words in check.detail
    assert (check.fix != "") == (status in (FAIL, WARN))


def test_require_tensorrt_errors() -> None:
    assert require_tensorrt(Facts(**H100)).tensorrt_version == "10.13.0.35"
    with pytest.raises(MissingBackendError) as missing:
        require_tensorrt(Facts(**{**H100, "tensorrt_version": None}))
    assert str(missing.value) == MISSING
    with pytest.raises(DeployError, match=r"^target tensorrt: cuda: PyTorch is a CPU-only build.*CUDA build"):
        require_tensorrt(Facts(**{**H100, "cuda_version": None, "torch_cuda_available": False}))


def test_parse_nvidia_smi() -> None:
    text = "NVIDIA H100 80GB HBM3, 550.54.15, 9.0\nTesla V100-SXM2-16GB, 470.82.01, [N/A]\n"
    assert parse_nvidia_smi(text) == [
        {"name": "NVIDIA H100 80GB HBM3", "driver_version": "550.54.15", "compute_capability": "9.0"},
        {"name": "Tesla V100-SXM2-16GB", "driver_version": "470.82.01", "compute_capability": ""},
    ]
    assert parse_nvidia_smi("") == []


@without_tensorrt
def test_build_without_tensorrt_fails_in_one_line(exported, tmp_path: Path) -> None:
    with pytest.raises(MissingBackendError) as err:
        get_backend("tensorrt").build(exported("repvgg_a0"), tmp_path, BuildConfig(precision="fp32"))
    assert str(err.value) == MISSING
    assert list(tmp_path.iterdir()) == []  # preflight runs before anything is written
    assert get_backend("tensorrt").version() is None


def _engine_artifact(root: Path, environment: dict) -> Artifact:
    (root / ENGINE_FILE).write_bytes(b"not an engine: load must refuse before reading it")
    meta = {"target": "tensorrt", "precision": "fp32", "files": {},
            "backend": {"model_file": ENGINE_FILE, "emit_only": False, "environment": environment, "profile": None}}
    (root / "build.json").write_text(json.dumps(meta))
    return Artifact.open(root)


def test_load_refuses_engine_from_another_tensorrt(tmp_path: Path) -> None:
    artifact = _engine_artifact(tmp_path, {**FACTS.environment(), "tensorrt_version": "9.9.9"})
    expected = (f"was built with TensorRT 9.9.9; this machine has TensorRT {FACTS.tensorrt_version}"
                if TENSORRT_HERE else MISSING)
    with pytest.raises(DeployError) as err:
        get_backend("tensorrt").load(artifact, threads=1)
    assert expected in str(err.value)


@pytest.mark.parametrize(("change", "words"), [
    ({"tensorrt_version": "10.0.1.6"}, "was built with TensorRT 10.0.1.6; this machine has TensorRT 10.13.0.35. "
                                       "An engine loads only in the TensorRT version that built it"),
    ({"gpu_name": "NVIDIA L4", "compute_capability": "8.9"},
     "was built for NVIDIA L4 (compute capability 8.9); this machine has NVIDIA H100 80GB HBM3 (9.0)"),
])
def test_compatibility_check_names_the_difference(change: dict, words: str) -> None:
    current = Facts(**H100).environment()
    check_compatible(current, current, "model.engine")  # the same machine: accepted
    with pytest.raises(DeployError) as err:
        check_compatible({**current, **change}, current, "model.engine")
    assert words in str(err.value) and "rebuild it here" in str(err.value)


def test_doctor_lists_every_check_and_the_fix() -> None:
    done = run_cli("doctor", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [c["name"] for c in report["tensorrt"]] == ["nvidia gpu", "driver", "cuda", "compute capability", "tensorrt"]
    assert all(c["fix"] for c in report["tensorrt"] if c["status"] == FAIL)
    assert report["tensorrt_verdict"] == (WHY_NOT or "target tensorrt: ready to build and run engines")
    required = run_cli("doctor", "--require", "tensorrt")
    assert required.returncode == (0 if TENSORRT_HERE else 1)
    if not TENSORRT_HERE:
        assert required.stderr.strip().splitlines()[-1] == f"error: {WHY_NOT}"


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_a_target_that_cannot_run_here_says_what_was_not_run(name: str) -> None:
    """`deploykit targets` shows, for every target whose runtime is absent here, a status line
    saying it was never executed (the code and the listing must not pretend it works)."""
    backend = get_backend(name)
    if backend.version() is not None:
        pytest.skip(f"{name} runs here: its tests execute it")
    done = run_cli("targets", "--json")
    assert done.returncode == 0, done.stderr
    row = next(r for r in json.loads(done.stdout)["targets"] if r["target"] == name)
    assert row["available"] is False and row["status"] == backend.status()
    assert "never executed" in row["status"]
    if "emit_only" in backend.options:  # then the listing says what can be done here instead
        assert "emit-only" in row["status"]


def test_modules_import_no_runtime() -> None:
    code = ("import sys, deploykit.backends.tensorrt, deploykit.preflight, deploykit.backends.qdq, deploykit.cli.doctor; "
            "print(sorted(m for m in ('tensorrt', 'torch', 'onnxruntime', 'onnx') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- TensorRT itself: runs only where TensorRT and a GPU are ---------------------------------------

@needs_tensorrt
@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_builds_runs_and_times(precision: str, exported, cifar_calibration, tmp_path: Path) -> None:
    from deploykit.verify import compare

    source = exported("repvgg_a0")
    backend = get_backend("tensorrt")
    config = BuildConfig(precision=precision, calibration=cifar_calibration if precision == "int8" else None)
    facts = backend.build(source, tmp_path, config)
    assert (tmp_path / ENGINE_FILE).stat().st_size > 0 and facts["environment"]["tensorrt_version"]
    runner = backend.load(Artifact.staged(tmp_path, "tensorrt", precision, facts), threads=1)
    held_out = cifar_calibration.held_out
    figures = compare(run_onnxruntime(source, held_out), runner(held_out))
    assert figures.cosine_mean > (0.99 if precision == "int8" else 0.999)
    compute = runner.timer(held_out[:1])(5)
    copies = {name: measure(5) for name, measure in runner.copy_timers(held_out[:1]).items()}
    assert compute.shape == (5,) and (compute > 0).all()
    assert set(copies) == {"h2d", "d2h"} and all((t > 0).all() for t in copies.values())

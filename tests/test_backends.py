"""Every CPU backend x every precision it lists: build, load, run, verify against PyTorch.

Generic over ``BACKENDS``: a newly registered backend is covered here the moment it is
added (and skipped with a reason where its runtime is not installed). The model is a tiny
RepVGG with a least-squares classifier fitted on CIFAR-10 (tests/tiny_model.py); inputs are
CIFAR images when the dataset is present, seeded random tensors otherwise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deploykit.backends.base import BACKENDS, Artifact, BuildConfig, get_backend
from deploykit.errors import DeployError, MissingBackendError
from deploykit.verify import TOLERANCES, compare, judge

from tiny_model import write_tiny_model

from conftest import CIFAR_TGZ  # one definition (DEPLOYKIT_CIFAR_TGZ or ../shared/data)
CASES = [(name, precision) for name in sorted(BACKENDS) for precision in get_backend(name).precisions]
# Figures an int8/w8 artifact of the tiny model must reach on held-out inputs (measured well above).
QUANTIZED_MIN_MEAN_COSINE = 0.95
QUANTIZED_MIN_TOP1_AGREEMENT = 0.75


@dataclass
class Source:
    onnx_path: Path
    calib: Any  # CalibrationSet
    reference: np.ndarray  # torch outputs on calib.held_out
    fused: Any


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    from deploykit.backends.torch_cpu import TorchRunner
    from deploykit.calib import load_calibration
    from deploykit.export import export_onnx
    from deploykit.fuse import reparameterize
    from deploykit.loading import load_model

    work = tmp_path_factory.mktemp("backends")
    loaded = load_model(write_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model", CIFAR_TGZ))
    fused = reparameterize(loaded.model, input_shape=(2, 3, 32, 32)).model
    export_onnx(fused, work / "model.onnx", input_size=32)
    data = str(CIFAR_TGZ) if CIFAR_TGZ.is_file() else None
    calib = load_calibration(data, input_size=32, num_samples=64, num_verify=64)
    reference = TorchRunner(loaded.model, threads=2)(calib.held_out)
    return Source(work / "model.onnx", calib, reference, fused)


@pytest.fixture(scope="module")
def built(source: Source, tmp_path_factory: pytest.TempPathFactory):
    """build(name, precision) -> Artifact, each built once per module."""
    cache: dict[tuple[str, str], Artifact] = {}
    root = tmp_path_factory.mktemp("artifacts")

    def build(name: str, precision: str) -> Artifact:
        if (name, precision) not in cache:
            backend = get_backend(name)
            if backend.version() is None:
                pytest.skip(f"target {name} is not installed here")
            from deploykit.precision import cpu_flags, refusal

            if refusal(precision, cpu_flags()):
                pytest.skip(f"{name} {precision} not on this CPU: {refusal(precision, cpu_flags())}")
            out = root / f"{name}-{precision}"
            out.mkdir()
            config = BuildConfig(precision=precision, threads=2, calibration=source.calib, source_model=source.fused)
            facts = backend.build(source.onnx_path, out, config)
            cache[(name, precision)] = Artifact.staged(out, name, precision,
                                                       json.loads(json.dumps(facts, default=str)))
        return cache[(name, precision)]

    return build


@pytest.mark.parametrize(("name", "precision"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_build_load_run_verify(name: str, precision: str, source: Source, built, record_property) -> None:
    artifact = built(name, precision)
    runner = get_backend(name).load(artifact, threads=2)
    assert runner.threads == 2
    x = source.calib.held_out
    out = runner(x)
    assert out.shape == source.reference.shape and np.isfinite(out).all()
    np.testing.assert_allclose(runner(x[:3]), out[:3], rtol=1e-4, atol=1e-4)  # any batch size
    figures = compare(source.reference, out)
    for key, value in figures.to_dict().items():
        record_property(key, value)
    tolerance = TOLERANCES[precision]
    if tolerance.gate:
        assert judge(figures, tolerance) == []
    else:
        assert figures.cosine_mean >= QUANTIZED_MIN_MEAN_COSINE, figures
        assert figures.top1_agreement >= QUANTIZED_MIN_TOP1_AGREEMENT, figures


def _size(artifact: Artifact) -> int:
    return sum(p.stat().st_size for p in artifact.path.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", [n for n, p in CASES if p == "int8"])
def test_int8_artifacts_really_hold_int8(name: str, built) -> None:
    artifact = built(name, "int8")
    if name == "onnxruntime":
        import onnx

        model = onnx.load(str(artifact.path / "model.onnx"))
        ops = [node.op_type for node in model.graph.node]
        assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
        int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
        assert len(int8_weights) >= 5  # every conv's weight
    elif name == "openvino":
        from deploykit.backends.openvino import runtime_precisions

        precisions = runtime_precisions(get_backend(name).load(artifact, threads=2).compiled)
        assert precisions.get("u8", 0) + precisions.get("i8", 0) >= 5, precisions
    elif name == "mnn":
        assert _size(artifact) < 0.5 * _size(built(name, "fp32"))
        assert _size(built(name, "w8")) < 0.5 * _size(built(name, "fp32"))
    elif name == "tensorrt":
        from deploykit.backends.qdq import inspect_qdq

        assert inspect_qdq(artifact.path / "model.int8.onnx").ok
    else:
        pytest.fail(f"no int8 check for target {name}: add one here")


@pytest.fixture(scope="module")
def custom_op_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("FooOp", ["input"], ["logits"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path_factory.mktemp("custom") / "custom.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("name", [n for n in sorted(BACKENDS) if n != "torch"])
def test_unsupported_op_is_one_clear_error(name: str, custom_op_onnx: Path, tmp_path: Path) -> None:
    backend = get_backend(name)
    if backend.version() is None:
        pytest.skip(f"target {name} is not installed here")
    with pytest.raises(DeployError) as info:
        backend.build(custom_op_onnx, tmp_path, BuildConfig(precision="fp32"))
    message = str(info.value)
    assert "\n" not in message and "FooOp" in message, message


def test_mnn_crash_names_the_method_and_the_fallback(built, tmp_path: Path) -> None:
    from deploykit.backends.mnn import run_tool

    float_model = built("mnn", "fp32").path / "model.mnn"
    (tmp_path / "empty").mkdir()
    config = tmp_path / "quant.json"  # an empty calibration folder makes MNN's quantizer segfault
    config.write_text(json.dumps({"path": str(tmp_path / "empty"), "feature_quantize_method": "KL",
                                  "input_type": "sequence"}))
    with pytest.raises(DeployError, match=r"MNN quantizer \(feature_quantize_method=KL\) crashed \(SIG[A-Z]+\); "
                                          r"retry with --option feature_quantize_method=EMA"):
        run_tool(["quant", str(float_model), str(tmp_path / "q.mnn"), str(config)],
                 what="MNN quantizer (feature_quantize_method=KL)",
                 hint="; retry with --option feature_quantize_method=EMA", produces=tmp_path / "q.mnn")


@pytest.mark.parametrize(("name", "module"), [("onnxruntime", "onnxruntime"), ("openvino", "openvino")])
def test_missing_runtime_says_what_to_install(name: str, module: str, source: Source, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    backend = get_backend(name)
    assert backend.version() is None
    with pytest.raises(MissingBackendError, match=rf"target {name} needs .*: pip install 'deploykit\[{name}\]'"):
        backend.build(source.onnx_path, tmp_path, BuildConfig())


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_backend_modules_import_no_runtime() -> None:
    done = _python(
        "import sys\n"
        "import deploykit.backends.onnxruntime, deploykit.backends.openvino, deploykit.backends.mnn\n"
        "import deploykit.backends.torch_cpu, deploykit.calib, deploykit.build, deploykit.cli.build\n"
        "heavy = {'torch', 'onnx', 'onnxruntime', 'openvino', 'nncf', 'MNN', '_tools'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_telemetry_off_and_nothing_written_to_home(tmp_path: Path) -> None:
    """openvino.convert_model and nncf would otherwise init telemetry and create ~/intel."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    done = _python(
        "from deploykit.privacy import quiet_runtimes\n"
        "quiet_runtimes()\n"
        "import openvino.tools.ovc.telemetry_utils as tu, nncf\n"
        "from nncf.telemetry import wrapper\n"
        "print(tu.tm.__name__, type(wrapper.telemetry).__name__)\n",
        env={"HOME": str(tmp_path), "CI": "", "NNCF_CI": ""},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["openvino.tools.ovc.telemetry_stub", "MagicMock"]
    assert list(tmp_path.iterdir()) == []


def test_openvino_accuracy_control_needs_labels_and_keeps_int8(source: Source, tmp_path: Path) -> None:
    from deploykit.backends.openvino import runtime_precisions
    from deploykit.calib import load_calibration

    backend = get_backend("openvino")
    if backend.version() is None:
        pytest.skip("target openvino is not installed here")
    synthetic = load_calibration(None, input_size=32, num_samples=8, num_verify=8)
    with pytest.raises(DeployError, match="max_drop needs labeled calibration data"):
        backend.build(source.onnx_path, tmp_path,
                      BuildConfig("int8", calibration=synthetic, options={"max_drop": 1.0}))  # top-1 points
    if source.calib.held_out_labels is None:
        pytest.skip(f"accuracy control needs labeled data; CIFAR-10 tarball not found at {CIFAR_TGZ}")
    out = tmp_path / "ac"
    out.mkdir()
    facts = backend.build(source.onnx_path, out, BuildConfig("int8", calibration=source.calib,
                                                             options={"max_drop": "2"}))  # points; NNCF gets 0.02
    assert facts["accuracy_control"] == {"max_drop": 0.02, "samples": len(source.calib.held_out)}
    assert facts["runtime_precisions"].get("u8", 0) + facts["runtime_precisions"].get("i8", 0) > 0
    runner = backend.load(Artifact.staged(out, "openvino", "int8", facts),
                          threads=2)
    assert compare(source.reference, runner(source.calib.held_out)).cosine_mean > QUANTIZED_MIN_MEAN_COSINE


def test_verification_gates_fp_builds_and_warns_for_int8() -> None:
    from deploykit.build import _Source, _verify
    from deploykit.calib import load_calibration
    from deploykit.errors import QualityGateError

    calib = load_calibration(None, input_size=8, num_samples=1, num_verify=16)
    weights = np.random.default_rng(0).standard_normal((3 * 8 * 8, 10)).astype(np.float32)

    def reference(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1) @ weights

    source = _Source(Path("m.onnx"), 8, lambda: reference, "a linear map", {}, {})
    warnings: list[str] = []
    exact = _verify(source, reference, calib, "t", "fp32", warnings)
    assert exact["passed"] and exact["cosine_min"] > 0.99999 and exact["top1_agreement"] == 1 and not warnings

    def noisy(x: np.ndarray) -> np.ndarray:
        return reference(x) + np.random.default_rng(1).normal(0, 3.0, (len(x), 10))

    with pytest.raises(QualityGateError, match="t fp32 artifact differs from the reference: cosine") as info:
        _verify(source, noisy, calib, "t", "fp32", [])
    assert info.value.exit_code == 3
    report = _verify(source, noisy, calib, "t", "int8", warnings)
    assert not report["passed"] and report["problems"] and "int8 artifact below the expected" in warnings[0]

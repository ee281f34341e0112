"""ONNX Runtime INT8 computes what its Q/DQ graph says, on every x86 CPU.

On x86 CPUs without VNNI, ORT's u8s8 kernels add pairs of u8 x s8 products in a saturating
int16 (vpmaddubsw); per-channel int8 weights use the full range in every channel, so sums
overflow and the model loses accuracy (3.6 top-1 points on the trained RepVGG-A0 on an AVX2
AMD EPYC, reports/ort-int8-x86-saturation.md). deploykit runs ORT INT8 with
``session.x64quantprecision`` (backend option ``x64_quant_precision``, on by default), in its
own runner and in a bundle's. The reference is the same Q/DQ model with every graph
optimization off: DequantizeLinear then a float convolution, no integer kernel.

The model is built to saturate: a convolution whose weights are all at the int8 limit, fed
activations near the top of their u8 range.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deploykit.backends.base import Artifact, BuildConfig, get_backend
from deploykit.precision import INT8_DOT_FLAGS, X86_FLAGS, cpu_flags, int8_dot_note

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

X64 = "session.x64quantprecision"
FLAGS = cpu_flags()
SATURATES_HERE = any(f in FLAGS for f in X86_FLAGS) and not any(f in FLAGS for f in INT8_DOT_FLAGS)


def _calibration(count: int, seed: int):
    from deploykit.calib import CalibrationSet
    from deploykit.calib.preprocess import Preprocessing

    rng = np.random.default_rng(seed)
    inputs = rng.uniform(0.5, 1.0, size=(count, 64, 8, 8)).astype(np.float32)  # u8 codes mostly > 128
    return CalibrationSet(inputs=inputs[: count // 2], held_out=inputs[count // 2 :], source="uniform",
                          preprocessing=Preprocessing(size=8, mean=(0.0,) * 3, std=(1.0,) * 3),
                          seed=seed, recipe=None, synthetic=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """x64_quant_precision -> (artifact, calibration) of the saturating convolution."""
    from deploykit.export import export_onnx

    work = tmp_path_factory.mktemp("ort-x86")
    conv = torch.nn.Conv2d(64, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)  # every weight quantizes to 127
    onnx_path = work / "conv.onnx"
    export_onnx(conv.eval(), onnx_path, input_size=8, channels=64)
    calib = _calibration(64, seed=0)
    cache = {}

    def build(exact: bool) -> Artifact:
        if exact not in cache:
            out = work / f"exact-{exact}"
            out.mkdir()
            config = BuildConfig(precision="int8", threads=2, calibration=calib,
                                 options={"x64_quant_precision": exact})
            facts = get_backend("onnxruntime").build(onnx_path, out, config)
            cache[exact] = Artifact.staged(out, "onnxruntime", "int8", facts)
        return cache[exact]

    return build, calib


def _dq_float(artifact: Artifact, inputs: np.ndarray) -> np.ndarray:
    """The Q/DQ graph evaluated as written: no fusion into integer kernels."""
    from deploykit.backends.onnxruntime import session

    qdq = session(artifact.path / artifact.backend["model_file"], threads=2, level="disabled", config={})
    name = qdq.get_inputs()[0].name
    return np.concatenate([qdq.run(None, {name: x[None]})[0] for x in inputs])


def _error(artifact: Artifact, calib) -> float:
    """Largest deviation from the Q/DQ reference, relative to the reference's range."""
    runner = get_backend("onnxruntime").load(artifact, threads=2)
    reference = _dq_float(artifact, calib.held_out)
    return float(np.abs(runner(calib.held_out) - reference).max() / np.ptp(reference))


def test_int8_runs_the_qdq_arithmetic(built) -> None:
    build, calib = built
    artifact = build(True)
    runner = get_backend("onnxruntime").load(artifact, threads=2)
    assert runner.session.get_session_options().get_session_config_entry(X64) == "1"
    assert get_backend("onnxruntime").runtime_config(artifact.backend) == {X64: "1"}
    assert _error(artifact, calib) < 0.01  # a rounding step or two of the output's u8 code
    assert int8_dot_note(FLAGS, True) in artifact.backend["arithmetic"]["note"]


def test_the_setting_can_be_turned_off_and_is_then_absent(built) -> None:
    build, _ = built
    artifact = build(False)
    runner = get_backend("onnxruntime").load(artifact, threads=2)
    with pytest.raises(RuntimeError, match="does not have configuration"):
        runner.session.get_session_options().get_session_config_entry(X64)
    assert get_backend("onnxruntime").runtime_config(artifact.backend) == {}


@pytest.mark.skipif(not SATURATES_HERE, reason="this CPU has VNNI (or is not x86): u8s8 sums do not saturate")
def test_without_the_setting_u8s8_saturates_on_this_cpu(built) -> None:
    """What the setting is for, shown on this CPU: the same model computes something else."""
    build, calib = built
    assert _error(build(False), calib) > 0.05
    assert _error(build(True), calib) < 0.01


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2", "avx512_vnni"}, "u8s8 dot products in int32 (AVX512-VNNI)"),
    ({"avx2", "avx_vnni", "amx_int8"}, "u8s8 dot products in int32 (AVX-VNNI, AMX-INT8)"),
    ({"sse4_1", "avx2"}, "no VNNI on this CPU: weights beyond 7 bits run as u8u8 (exact, slower than u8s8)"),
    ({"asimd", "asimddp"}, ""),
])
def test_int8_dot_note(flags: set[str], expected: str) -> None:
    assert int8_dot_note(flags, True) == expected


def test_a_bundle_runs_with_the_setting(built, tmp_path: Path) -> None:
    from deploykit.package.bundle import _runtime

    build, _ = built
    artifact = build(True)
    backend = get_backend("onnxruntime")
    assert _runtime(artifact, backend, backend.version()).config == {X64: "1"}


def test_a_model_the_setting_breaks_still_builds_and_says_so(tmp_path: Path) -> None:
    """ORT 1.32's u8u8 transformer fails on the unfused tiny RepVGG (its untrained identity BN has scale and
    variance merged into one quantized initializer) wherever ORT applies it: on x86 CPUs whose MLAS u8u8 and
    u8s8 kernels differ, VNNI or not (it ran on an AMD Zen 5 with AVX512-VNNI; not on an AMX Xeon). The build
    then drops the setting and says so; only where sums saturate does it say that costs accuracy."""
    from deploykit.calib import load_calibration
    from deploykit.export import export_onnx
    from deploykit.loading import load_model

    from tiny_model import write_tiny_model

    onnx_path = tmp_path / "unfused.onnx"
    export_onnx(load_model(write_tiny_model(tmp_path / "tiny", None)).model, onnx_path, input_size=32)
    out = tmp_path / "int8"
    out.mkdir()
    config = BuildConfig(precision="int8", threads=2, calibration=load_calibration(None, input_size=32, num_samples=16))
    facts = get_backend("onnxruntime").build(onnx_path, out, config)
    if SATURATES_HERE:  # ORT applies the setting on every such CPU: it fails, and the build says what that costs
        assert facts["session_config"] == {} and "cannot apply session.x64quantprecision" in facts["session_config_dropped"]
        assert "saturating int16" in facts["arithmetic"]["note"]
    elif facts["session_config"] == {}:  # applied and failed on a CPU with int8 dot products: no accuracy lost
        assert "cannot apply session.x64quantprecision" in facts["session_config_dropped"]
        assert "saturating" not in facts["arithmetic"]["note"] and "int32" in facts["arithmetic"]["note"]
    else:  # not applied here (MLAS runs one kernel for both): the setting stays, harmless
        assert facts["session_config"] == {X64: "1"} and facts["session_config_dropped"] is None
    runner = get_backend("onnxruntime").load(Artifact.staged(out, "onnxruntime", "int8", facts), threads=2)
    assert runner.config == facts["session_config"]
    assert np.isfinite(runner(config.calibration.held_out)).all()

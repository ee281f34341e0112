"""Precision means arithmetic: resolution from CPU flags, bf16/fp16 builds and their gates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploykit import precision
from deploykit.errors import DeployError
from deploykit.verify import TOLERANCES, judge

from conftest import run_cli

CPUS = json.loads((Path(__file__).parent / "data" / "cpu_flags.json").read_text())
KINDS = [k for k in CPUS if not k.startswith("_")]

# What each recorded CPU kind must resolve to: bf16 (native or refused), fp16 arithmetic, int8 float parts.
EXPECTED = {
    "epyc-avx2": {"bf16": None, "fp16": "fp32", "fastest": "fp32"},
    "epyc-zen4": {"bf16": ("avx512_bf16",), "fp16": "fp32", "fastest": "bf16"},
    "xeon-spr": {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": "fp16", "fastest": "bf16"},
}
HERE = precision.cpu_flags()


@pytest.mark.parametrize("kind", KINDS)
def test_precision_resolves_from_the_cpu_flags(kind: str) -> None:
    flags, want = CPUS[kind]["flags"], EXPECTED[kind]
    assert precision.resolve("fp32", flags).executes == "fp32"
    if want["bf16"] is None:
        with pytest.raises(DeployError, match="bf16 needs a CPU with AVX512-BF16 or AMX-BF16"):
            precision.resolve("bf16", flags)
        assert "AVX512-BF16" in precision.refusal("bf16", flags)
    else:
        plan = precision.resolve("bf16", flags)
        assert (plan.executes, plan.native, plan.features) == ("bf16", True, want["bf16"])
    fp16 = precision.resolve("fp16", flags)
    assert fp16.executes == want["fp16"]
    assert fp16.native == (want["fp16"] == "fp16")
    if not fp16.native:
        assert "fp32 arithmetic" in fp16.note and "AVX512-FP16" in fp16.note
    assert precision.fastest_float(flags).executes == want["fastest"]


def test_fingerprint_lists_the_flags_that_change_kernels() -> None:
    from deploykit.device import ISA_FLAGS, _cpuinfo

    for flag in ("avx512_fp16", "amx_fp16", "avx512_bf16", "amx_bf16", "avx512_vnni", "amx_int8", "avx_ne_convert"):
        assert flag in ISA_FLAGS
    spr = _cpuinfo("flags\t: " + " ".join(CPUS["xeon-spr"]["flags"]))["flags"]
    assert {"amx_bf16", "avx512_fp16"} <= spr


def _build(tmp: Path, model: str, target: str, prec: str, *extra: str):
    out = tmp / f"{target}-{prec}"
    done = run_cli("build", model, "--target", target, "--precision", prec, "--out", str(out), "--verify-samples", "16",
                   *extra)
    return done, out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny"), None)


@pytest.mark.parametrize(("target", "prec"), [("openvino", "bf16"), ("torch", "bf16"), ("openvino", "fp16")])
def test_float_builds_record_the_executed_arithmetic(target: str, prec: str, tiny: str, tmp_path: Path) -> None:
    native = precision.native_features(prec, HERE)
    if prec == "bf16" and not native:
        pytest.skip(f"this CPU has no native bf16 ({precision.refusal('bf16', HERE)})")
    pytest.importorskip("openvino" if target == "openvino" else "torch")
    done, out = _build(tmp_path, tiny, target, prec)
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "build.json").read_text())
    plan, executed = meta["backend"]["arithmetic"], meta["backend"]["executed_precision"]
    expected = prec if native else "fp32"
    assert plan["executes"] == expected and plan["native"] == bool(native)
    assert set(plan["features"]) == set(native)
    conv = executed.get("Convolution") or executed.get("conv2d") or executed.get("convolution")
    assert conv and set(conv) == {{"bf16": "bf16", "fp16": "f16", "fp32": "f32"}[expected]}
    assert meta["verification"]["passed"] and meta["verification"]["tolerance"]["precision"] == prec
    assert "executed precision" in done.stdout and "arithmetic" in done.stdout


def test_int8_float_parts_run_in_the_fastest_native_precision(tiny: str, tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    done, out = _build(tmp_path, tiny, "openvino", "int8", "--calib-samples", "16")
    assert done.returncode == 0, done.stderr
    backend = json.loads((out / "build.json").read_text())["backend"]
    fastest = precision.fastest_float(HERE).executes
    check = backend["arithmetic"]["float_parts_check"]
    if fastest == "fp32":
        assert backend["inference_precision"] == "fp32" and check is None
    else:  # either kept because it passed the check against f32 float parts, or fell back with the reason
        assert backend["inference_precision"] == (fastest if check["passed"] else "fp32")
    assert any(p in ("i8", "u8") for p in backend["executed_precision"]["Convolution"])
    done, out = _build(tmp_path / "f32", tiny, "openvino", "int8", "--calib-samples", "16",
                       "--option", "float_precision=fp32")
    assert json.loads((out / "build.json").read_text())["backend"]["inference_precision"] == "fp32"


def test_bf16_gate_fails_a_wrong_result_and_passes_bf16_rounding() -> None:
    import numpy as np

    from deploykit.verify import compare

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((16, 10)).astype(np.float32)
    rounded = (reference.view(np.uint32) & 0xFFFF0000).view(np.float32)  # truncated to bf16
    assert judge(compare(reference, rounded), TOLERANCES["bf16"]) == []
    assert judge(compare(reference, reference[::-1].copy()), TOLERANCES["bf16"])
    assert TOLERANCES["bf16"].gate


def test_unknown_precision_for_a_target_is_a_usage_error(tiny: str, tmp_path: Path) -> None:
    done, _ = _build(tmp_path, tiny, "onnxruntime", "bf16")
    assert done.returncode == 2
    assert "target onnxruntime does not build precision bf16" in done.stderr.strip().splitlines()[-1]


def test_bf16_without_the_cpu_feature_is_one_line(tiny: str, tmp_path: Path, monkeypatch) -> None:
    from deploykit.backends.base import BuildConfig
    from deploykit.backends.openvino import OpenVINOBackend

    pytest.importorskip("openvino")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(CPUS["epyc-avx2"]["flags"]))
    with pytest.raises(DeployError, match="bf16 needs a CPU with AVX512-BF16 or AMX-BF16.*--precision fp32"):
        OpenVINOBackend().build(Path("unused.onnx"), tmp_path, BuildConfig(precision="bf16"))

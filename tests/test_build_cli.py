"""`deploykit build / eval / targets` through the command line, as a user runs them.

Successful INT8 builds on each CPU target with CIFAR-10 calibration (skipped without the
dataset), build.json contents, accuracy via `eval`, and every bad-input case of the issue:
one `error:` line, a non-zero exit, no partial artifact, the previous artifact untouched.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from deploykit.backends.base import BACKENDS, get_backend
from deploykit.files import sha256_tree

from conftest import run_cli as cli
from tiny_model import write_tiny_model

from conftest import CIFAR_TGZ  # one definition (DEPLOYKIT_CIFAR_TGZ or ../shared/data)
needs_cifar = pytest.mark.skipif(not CIFAR_TGZ.is_file(), reason=f"CIFAR-10 tarball not found at {CIFAR_TGZ}")
INT8_TARGETS = [n for n in sorted(BACKENDS) if "int8" in get_backend(n).precisions and n != "tensorrt"]
EVAL_LIMIT = 300


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one `error:` line the CLI printed (and nothing that looks like a traceback)."""
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model", CIFAR_TGZ)  # shared by modules


@pytest.fixture(scope="module")
def tiny_onnx(tiny: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as .onnx: bad-input tests then run without importing torch."""
    from deploykit.export import export_onnx
    from deploykit.loading import load_model

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(load_model(tiny).model, out, input_size=32)
    return out


@pytest.fixture(scope="module")
def torch_top1(tiny: str) -> float:
    """Top-1 of the PyTorch model on the seeded CIFAR-10 test subset every eval here uses."""
    from deploykit.evaluate import evaluate, open_evaluable

    return evaluate(open_evaluable(tiny), CIFAR_TGZ, limit=EVAL_LIMIT).top1


@needs_cifar
@pytest.mark.parametrize("target", INT8_TARGETS)
def test_int8_build_with_cifar_calibration_then_eval(target: str, tiny: str, torch_top1: float,
                                                     tmp_path: Path) -> None:
    from deploykit.evaluate import evaluate, open_evaluable

    if get_backend(target).version() is None:
        pytest.skip(f"target {target} is not installed here")
    out = tmp_path / target
    done = cli("build", tiny, "--target", target, "--precision", "int8", "--calib", str(CIFAR_TGZ),
               "--calib-samples", "64", "--out", str(out))
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "build.json").read_text())
    assert (meta["target"], meta["precision"], meta["schema_version"]) == (target, "int8", 1)
    assert meta["files"] == {k: v for k, v in sha256_tree(out).items() if k != "build.json"}
    calib = meta["calibration"]
    assert calib["count"] == 64 and calib["synthetic"] is False and calib["source"].endswith(":train")
    assert len(calib["sha256"]) == 64 and calib["seed"] == 0
    assert meta["preprocessing"]["size"] == 32 and meta["preprocessing"]["mean"][0] == pytest.approx(0.4914)
    assert meta["inputs"][0]["name"] == "input" and meta["outputs"][0]["shape"] == [1, 10]
    v = meta["verification"]
    assert v["samples"] == 64 and 0.9 <= v["cosine_mean"] <= 1 and 0.7 <= v["top1_agreement"] <= 1
    assert {"torch", "onnx", "numpy"} <= set(meta["versions"])
    assert meta["model"]["fusion"] is not None and meta["export"]["opset"] == 17
    assert any("300+" in w for w in meta["warnings"])  # 64 < 300 samples
    result = evaluate(open_evaluable(str(out)), CIFAR_TGZ, limit=EVAL_LIMIT)  # with the stored preprocessing
    assert result.count == EVAL_LIMIT and abs(result.top1 - torch_top1) <= 0.08, (result.top1, torch_top1)


@needs_cifar
def test_eval_cli_on_the_model_matches_the_library(tiny: str, torch_top1: float) -> None:
    done = cli("eval", tiny, "--data", str(CIFAR_TGZ), "--limit", str(EVAL_LIMIT), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["count"] == EVAL_LIMIT and result["data"].endswith(":test")
    assert result["top1"] == torch_top1 > 0.18  # chance is 0.10: the preprocessing fits the model


def test_int8_without_data_warns_and_marks_synthetic(tiny_onnx: Path, tmp_path: Path) -> None:
    done = cli("build", str(tiny_onnx), "--target", "onnxruntime", "--precision", "int8", "--out", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    assert "accuracy needs real data: pass --calib DIR" in " ".join(done.stderr.split())
    meta = json.loads((tmp_path / "a" / "build.json").read_text())
    assert meta["calibration"]["synthetic"] is True and meta["model"]["source"] == "onnx"
    assert meta["verification"]["reference"].startswith("onnxruntime fp32 on the original")
    if CIFAR_TGZ.is_file():
        done = cli("eval", str(tmp_path / "a"), "--data", str(CIFAR_TGZ), "--limit", "50")
        assert done.returncode == 0 and "top-1" in done.stdout and "(onnxruntime int8)" in done.stdout, done.stderr


def test_profile_sets_target_precision_and_options(tiny_onnx: Path, tmp_path: Path) -> None:
    done = cli("build", str(tiny_onnx), "--target", "onnxruntime-int8", "--calib-samples", "16",
               "--option", "calibrate_method=percentile", "--out", str(tmp_path / "p"))
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "p" / "build.json").read_text())
    assert (meta["target"], meta["profile"], meta["precision"]) == ("onnxruntime", "onnxruntime-int8", "int8")
    assert meta["options"]["calibrate_method"] == "percentile" and meta["options"]["per_channel"] is True


def _tree(root: Path, make) -> Path:
    (root / "train" / "c").mkdir(parents=True)
    make(root / "train" / "c")
    return root


def _bad_inputs(tmp: Path, onnx_path: Path) -> dict[str, tuple[str, str, list[str], str]]:
    """case -> (MODEL, --target, more build args, expected error text)."""
    import numpy as np
    from PIL import Image

    empty = tmp / "empty"
    empty.mkdir()
    corrupt = _tree(tmp / "corrupt", lambda d: (d / "x.jpg").write_bytes(b"\xff\xd8 not really a jpeg"))
    small = _tree(tmp / "small", lambda d: Image.new("RGB", (16, 16)).save(d / "s.png"))
    nan = tmp / "nan.npy"
    np.save(nan, np.full((8, 3, 32, 32), np.nan, np.float32))
    truncated = tmp / "truncated.onnx"
    truncated.write_bytes(onnx_path.read_bytes()[:2000])
    model, ort = str(onnx_path), "onnxruntime"
    int8 = ["--precision", "int8", "--calib-samples", "4"]
    return {
        "missing-calib": (model, ort, [*int8, "--calib", str(tmp / "nowhere")], "does not exist"),
        "empty-calib": (model, ort, [*int8, "--calib", str(empty)], "holds no images"),
        "unreadable-image": (model, ort, [*int8, "--calib", str(corrupt)], "cannot read image"),
        "wrongly-sized-image": (model, ort, [*int8, "--calib", str(small)], "is 16x16, smaller than the 32x32 input"),
        "nan-array": (model, ort, [*int8, "--calib", str(nan)], "contains NaN or inf values"),
        "truncated-onnx": (str(truncated), ort, [], "is not a valid ONNX model"),
        "missing-model-file": (str(tmp / "gone.onnx"), ort, [], "does not exist"),
        "unknown-option": (model, ort, ["--option", "speed=max"], "unknown option speed for target onnxruntime"),
        "option-out-of-range": (model, "mnn", ["--precision", "int8", "--option", "feature_clamp_value=300"],
                                "must be between 1 and 127"),
        "unsupported-precision": (model, ort, ["--precision", "w8"], "does not build precision w8"),
        "unknown-target": (model, "tpu", [], "unknown target 'tpu'"),
        "torch-from-onnx": (model, "torch", [], "target torch builds from a PyTorch model"),
    }


@pytest.fixture(scope="module")
def bad_cases(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _bad_inputs(tmp_path_factory.mktemp("bad"), tiny_onnx)


BAD_CASES = ["missing-calib", "empty-calib", "unreadable-image", "wrongly-sized-image", "nan-array",
             "truncated-onnx", "missing-model-file", "unknown-option", "option-out-of-range",
             "unsupported-precision", "unknown-target", "torch-from-onnx"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_nonzero_exit_and_no_artifact(case: str, bad_cases: dict, tmp_path: Path) -> None:
    model, target, args, expected = bad_cases[case]
    out = tmp_path / "out"
    line = error_line(cli("build", model, "--target", target, "--out", str(out), *args))
    assert expected in line
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial artifact, no temp leftovers


@pytest.mark.parametrize("target", [n for n in sorted(BACKENDS) if n not in ("torch", "tensorrt")])
def test_unsupported_op_through_the_cli(target: str, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    if get_backend(target).version() is None:
        pytest.skip(f"target {target} is not installed here")
    node = helper.make_node("Relu", ["input"], ["mid"])
    odd = helper.make_node("FooOp", ["mid"], ["logits"], domain="com.example")
    graph = helper.make_graph([node, odd], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(tmp_path / "odd.onnx"))
    line = error_line(cli("build", str(tmp_path / "odd.onnx"), "--target", target, "--out", str(tmp_path / "o")))
    assert "FooOp" in line  # the target's own converter names the op
    assert not (tmp_path / "o").exists()


def test_mnn_crash_is_one_line_with_the_fallback(tiny_onnx: Path, tmp_path: Path) -> None:
    """A stand-in for MNN's ``_tools`` that segfaults in the quantizer, put first on the worker's path."""
    if get_backend("mnn").version() is None:
        pytest.skip("target mnn is not installed here")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "_tools.py").write_text(
        "import ctypes, pathlib\n"
        "def mnnconvert(argv):\n"
        "    pathlib.Path(argv[argv.index('--MNNModel') + 1]).write_bytes(b'float model')\n"
        "    return True\n"
        "def mnnquant(argv):\n"
        "    ctypes.string_at(0)  # segfault, as the real quantizer does on some graphs\n"
    )
    out = tmp_path / "out"
    done = cli("build", str(tiny_onnx), "--target", "mnn", "--precision", "int8", "--calib-samples", "4",
               "--option", "feature_quantize_method=KL", "--out", str(out),
               env={"PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])})
    line = error_line(done)
    assert "MNN quantizer (feature_quantize_method=KL) crashed (SIGSEGV)" in line
    assert "retry with --option feature_quantize_method=EMA" in line
    assert not out.exists()


def test_failed_rebuild_leaves_previous_artifact_untouched(tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    assert cli("build", str(tiny_onnx), "--target", "onnxruntime", "--out", str(out)).returncode == 0
    before = sha256_tree(out)
    again = cli("build", str(tiny_onnx), "--target", "onnxruntime", "--out", str(out))
    assert "exists; pass --force" in error_line(again)
    failed = cli("build", str(tiny_onnx), "--target", "onnxruntime", "--precision", "int8", "--force",
                 "--calib", str(tmp_path / "nowhere"), "--out", str(out))
    assert "does not exist" in error_line(failed)
    assert sha256_tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_targets_lists_every_backend_and_profile() -> None:
    from deploykit.profiles import list_profiles

    done = cli("targets", "--json")
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    assert [r["target"] for r in listing["targets"]] == sorted(BACKENDS)
    for row in listing["targets"]:
        assert row["available"] == (get_backend(row["target"]).version() is not None)
        assert row["precisions"] == list(get_backend(row["target"]).precisions)
    assert {p["profile"] for p in listing["profiles"]} == set(list_profiles())
    table = cli("targets")
    assert table.returncode == 0 and all(name in table.stdout for name in BACKENDS)


@pytest.mark.parametrize("command", ["build", "eval", "targets"])
def test_help_ends_with_an_example(command: str) -> None:
    done = cli(command, "--help")
    assert done.returncode == 0 and "Example:" in done.stdout and "deploykit " + command in done.stdout

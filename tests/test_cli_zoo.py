"""The zoo commands through a subprocess, as a user runs them, including bad input."""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from tests.conftest import run_cli


def test_import_deploykit_pulls_in_no_heavy_package() -> None:
    code = (
        "import sys, deploykit, deploykit.cli, deploykit.errors, deploykit.models, deploykit.backends.base\n"
        "heavy = {'torch', 'onnx', 'onnxruntime', 'openvino', 'nncf', 'MNN', '_tools', 'tensorrt', 'matplotlib'}\n"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version_and_help_for_every_command() -> None:
    from deploykit import __version__
    from deploykit.cli import COMMANDS

    version = run_cli("--version")
    assert version.returncode == 0 and __version__ in version.stdout
    top = run_cli("--help")
    assert top.returncode == 0
    for name in COMMANDS:
        assert name in top.stdout
        sub = run_cli(name, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "Example" in sub.stdout, f"`deploykit {name} --help` has no example"


def test_models_lists_every_family() -> None:
    out = run_cli("models")
    assert out.returncode == 0
    for name in ("repvgg_a0", "repopt_vgg_a0", "convnext_atto", "ghostnet_100", "g_ghost_regnetx_032"):
        assert name in out.stdout


def test_models_info_prints_params_and_macs() -> None:
    out = run_cli("models", "--info", "repvgg_a0")
    assert out.returncode == 0, out.stderr
    assert "8,309,384" in out.stdout  # deploy-form params; the paper says 8.30M


def test_fuse_then_export_the_fused_checkpoint(tmp_path) -> None:
    ckpt, report, onnx_path = tmp_path / "f.safetensors", tmp_path / "f.json", tmp_path / "f.onnx"
    out = run_cli("fuse", "repvgg_a0", "--cifar", "--num-classes", "10", "--out", str(ckpt), "--report", str(report))
    assert out.returncode == 0, out.stderr
    assert "PASS" in out.stdout and ckpt.is_file() and report.is_file()
    out = run_cli("export", str(ckpt), "--out", str(onnx_path), "--batch", "dynamic")
    assert out.returncode == 0, out.stderr
    assert "ONNX Runtime vs PyTorch" in out.stdout
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)
    assert sum(n.op_type == "Conv" for n in graph.node) == 22  # RepVGG-A0: one conv per block


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_unknown_model_names_close_matches() -> None:
    line = _error_line(run_cli("export", "repvgg_a00", "--out", "x.onnx"))
    assert "unknown model 'repvgg_a00'" in line and "repvgg_a0" in line


def test_wrong_input_size_names_the_expected_shape(tmp_path) -> None:
    line = _error_line(run_cli("export", "convnext_atto", "--input-size", "8", "--out", str(tmp_path / "x.onnx")))
    assert "expected (N, 3, 224, 224)" in line
    assert not (tmp_path / "x.onnx").exists()


def test_corrupt_checkpoint(tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    assert "corrupt" in _error_line(run_cli("export", str(bad), "--out", str(tmp_path / "x.onnx")))
    truncated = tmp_path / "bad.pt"
    truncated.write_bytes(b"PK\x03\x04truncated")
    assert "corrupt" in _error_line(run_cli("export", str(truncated), "--out", str(tmp_path / "x.onnx")))


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle executes code",))


def test_pickle_that_needs_code_is_refused(tmp_path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    proc = run_cli("export", str(evil), "--out", str(tmp_path / "x.onnx"))
    assert "executes code" not in proc.stdout
    assert "never executes code" in _error_line(proc)


def test_checkpoint_without_metadata_says_so(tmp_path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    assert "which model" in _error_line(run_cli("export", str(plain), "--out", str(tmp_path / "x.onnx")))


def test_existing_output_is_refused_without_force_and_kept(tmp_path) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")
    line = _error_line(run_cli("export", "repvgg_a0", "--cifar", "--out", str(out)))
    assert "--force" in line and out.read_bytes() == b"previous"


def test_failed_export_leaves_no_partial_file_and_keeps_previous(tmp_path) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")
    proc = run_cli("export", "convnext_atto", "--input-size", "8", "--out", str(out), "--force")
    assert proc.returncode == 1
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "no temporary files left behind"


def test_debug_shows_the_traceback() -> None:
    proc = run_cli("--debug", "export", "nope_model", "--out", "x.onnx")
    assert proc.returncode != 0 and "Traceback" in proc.stderr

"""Nothing leaves the machine: every command, and the bundle's standalone runner, leaves HOME and TMPDIR empty.

Each runtime, left alone, writes there on import (ONNX Runtime: a device id and an event queue
under ~/.cache/Microsoft and $TMPDIR/.ses; OpenVINO/NNCF: ~/intel/openvino_ga_cid and stats).
The commands run with an empty HOME and TMPDIR and without the telemetry variables in their
environment, so the test proves deploykit (and the runner) set them, not the test process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from deploykit.backends.base import get_backend
from deploykit.privacy import QUIET_ENV

from conftest import run_cli
from tiny_model import write_tiny_model

TARGETS = ["onnxruntime", "openvino", "mnn"]  # int8: NNCF and MNN's quantizer subprocess run too


def _png_tree(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / "test" / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "test" / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model", None)


@pytest.fixture(scope="module")
def tiny_onnx(tiny: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deploykit.export import export_onnx
    from deploykit.loading import load_model

    out = tmp_path_factory.mktemp("privacy-onnx") / "tiny.onnx"
    export_onnx(load_model(tiny).model, out, input_size=32)
    return out


def _empty_env(tmp: Path) -> tuple[dict[str, str], Path, Path]:
    home, tmpdir = tmp / "home", tmp / "tmpdir"
    home.mkdir()
    tmpdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV and k not in ("CI", "NNCF_DEV")}
    env.update(HOME=str(home), TMPDIR=str(tmpdir), XDG_CACHE_HOME="", XDG_CONFIG_HOME="")
    env = {k: v for k, v in env.items() if v != ""}
    return env, home, tmpdir


def _left_in(*folders: Path) -> list[str]:
    return sorted(str(p.relative_to(f.parent)) for f in folders for p in f.rglob("*"))


@pytest.mark.parametrize("target", TARGETS)
def test_commands_and_runner_leave_home_and_tmpdir_empty(target: str, tiny: str, tiny_onnx: Path,
                                                         tmp_path: Path) -> None:
    if get_backend(target).version() is None:
        pytest.skip(f"target {target} is not installed here")
    env, home, tmpdir = _empty_env(tmp_path)
    work = tmp_path / "work"
    data = _png_tree(tmp_path / "data")
    work.mkdir()
    art, bundle = work / "art", work / "bundle.tar.gz"

    def step(name: str, done: subprocess.CompletedProcess) -> None:
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"
        assert _left_in(home, tmpdir) == [], f"{name} wrote {_left_in(home, tmpdir)}"

    step("build", run_cli("build", str(tiny_onnx), "--target", target, "--precision", "int8", "--calib-samples", "4",
                          "--verify-samples", "4", "--out", str(art), env=env, cwd=work.parent))
    step("eval", run_cli("eval", str(art), "--data", str(data), env=env))
    step("bench", run_cli("bench", "--model", tiny, "--target", target, "--rounds", "2", "--min-round-time", "0.01",
                          "--warmup-max-time", "0.2", "--memory", "--cache-dir", str(work / "cache"),
                          "--results", str(work / "rows.jsonl"), env=env, cwd=work))
    step("package", run_cli("package", str(art), "--out", str(bundle), "--golden", "2", env=env))
    step("verify", run_cli("verify", str(bundle), env=env))
    with tarfile.open(bundle) as tar:
        tar.extractall(work / "unpacked", filter="data")
    (root,) = (work / "unpacked").iterdir()
    runner_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # the runner runs without deploykit
    step("runner", subprocess.run([sys.executable, str(root / "deploykit_runner.py"), "--self-test"], env=runner_env,
                                  cwd=root, capture_output=True, text=True, timeout=300))

"""Hostile input through the command line: one `error:` line naming the file and the problem, exit 1
(2 for usage), no traceback, nothing written. One test per class, parametrized over the entry
points that take that kind of input.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from conftest import run_cli
from tiny_model import write_tiny_model

MODEL_COMMANDS = {  # entry point -> how it is called with MODEL and an output under OUT
    "build": lambda m, out: ["build", m, "--target", "onnxruntime", "--out", str(out / "art")],
    "eval": lambda m, out: ["eval", m, "--data", str(out / "no-data")],
    "export": lambda m, out: ["export", m, "--out", str(out / "m.onnx")],
    "fuse": lambda m, out: ["fuse", m, "--out", str(out / ("m.onnx" if m.endswith(".onnx") else "m.pt"))],
}
ONNX_COMMANDS = ("build", "eval", "fuse")  # the entry points that take an .onnx file as MODEL


def one_error(done: subprocess.CompletedProcess, code: int = 1) -> str:
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height pixels (PIL refuses it as a decompression bomb on open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model", None)


@pytest.fixture(scope="module")
def files(tiny: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The hostile files, made once."""
    import onnx
    import torch
    from onnx import TensorProto, helper
    from safetensors.torch import save_file

    from deploykit.export import export_onnx
    from deploykit.loading import load_model

    root = tmp_path_factory.mktemp("hostile")
    made = {}
    made["onnx"] = root / "tiny.onnx"
    export_onnx(load_model(tiny).model, made["onnx"], input_size=32)
    made["random.onnx"] = root / "random.onnx"
    made["random.onnx"].write_bytes(os.urandom(4000))
    made["random.pt"] = root / "random.pt"
    made["random.pt"].write_bytes(b"\x13" + os.urandom(4000))
    made["empty.pt"] = root / "empty.pt"
    made["empty.pt"].write_bytes(b"")
    made["model.engine"] = root / "model.engine"
    made["model.engine"].write_bytes(os.urandom(4000))
    tensors = {"w": torch.zeros(2)}
    made["meta-not-json.safetensors"] = root / "meta-not-json.safetensors"
    save_file(tensors, str(made["meta-not-json.safetensors"]), metadata={"deploykit": "{not json"})
    made["meta-wrong-type.safetensors"] = root / "meta-wrong-type.safetensors"
    save_file(tensors, str(made["meta-wrong-type.safetensors"]), metadata={"deploykit": json.dumps({"model": "x"})})
    (root / "factories.py").write_text("def raises():\n    raise ValueError('no weights here')\n\n"
                                       "def not_a_module():\n    return 42\n")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
    graph = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)], "g", [x], [y])
    made["one-channel.onnx"] = root / "one-channel.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), made["one-channel.onnx"])
    (root / "bomb" / "test" / "c").mkdir(parents=True)
    made["bomb"] = root / "bomb"
    made["bomb.png"] = _png_header(root / "bomb" / "test" / "c" / "bomb.png", 30000, 30000)
    made["not-a-tar.tar.gz"] = root / "not-a-tar.tar.gz"
    made["not-a-tar.tar.gz"].write_bytes(os.urandom(3000))
    made["bad.yaml"] = root / "bad.yaml"
    made["bad.yaml"].write_text("target: onnxruntime\noptions: [unclosed\n")
    made["afile"] = root / "afile"
    made["afile"].write_text("a file, not a folder")
    made["factories"] = root / "factories.py"
    return made


MODEL_CASES = {  # case -> (file key or MODEL text, expected words, entry points)
    "random-bytes-onnx": ("random.onnx", "is not a valid ONNX model", ONNX_COMMANDS),
    "random-bytes-pt": ("random.pt", "is not a torch checkpoint", tuple(MODEL_COMMANDS)),
    "empty-pt": ("empty.pt", "is empty (0 bytes)", tuple(MODEL_COMMANDS)),
    "engine-as-model": ("model.engine", "is a TensorRT engine, not a PyTorch model", tuple(MODEL_COMMANDS)),
    "onnx-where-pytorch-needed": ("onnx", "is an ONNX model, not a PyTorch model", ("export",)),
    "metadata-not-json": ("meta-not-json.safetensors", "metadata is not valid JSON", tuple(MODEL_COMMANDS)),
    "metadata-wrong-type": ("meta-wrong-type.safetensors", "names the model as str", tuple(MODEL_COMMANDS)),
    "factory-raises": ("factories.py:raises", "raises() raised ValueError: no weights here", tuple(MODEL_COMMANDS)),
    "factory-not-module": ("factories.py:not_a_module", "returned int, not a torch.nn.Module", tuple(MODEL_COMMANDS)),
    "input-one-channel": ("one-channel.onnx", "has shape (1, 1, 32, 32); deploykit feeds RGB images", ONNX_COMMANDS),
}


def _model_arg(files: dict[str, Path], text: str) -> str:
    if ".py:" in text:
        return f"{files['factories']}:{text.split(':')[1]}"
    return str(files[text])


@pytest.mark.parametrize("case,command", [(c, e) for c, (_, _, entries) in MODEL_CASES.items() for e in entries])
def test_bad_model_is_one_line(case: str, command: str, files: dict[str, Path], tmp_path: Path) -> None:
    model_text, expected, _ = MODEL_CASES[case]
    model = _model_arg(files, model_text)
    line = one_error(run_cli(*MODEL_COMMANDS[command](model, tmp_path)))
    assert expected in line and Path(model.split(":")[0]).name in line
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    from deploykit.checkpoint import save_checkpoint
    from deploykit.models import create_model

    model = create_model("repvgg_a0", num_classes=10, cifar=True)
    ckpt = tmp_path / "a0.safetensors"
    save_checkpoint(model, ckpt, spec={"name": "repvgg_a0", "num_classes": 100, "cifar": True}, form="train")
    line = one_error(run_cli("export", str(ckpt), "--out", str(tmp_path / "m.onnx")))
    assert "tensor linear.weight has shape (10, 1280), the model expects (100, 1280)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a0.safetensors"]


@pytest.mark.parametrize("command", ["build-calib", "eval-data"])
def test_decompression_bomb_image_is_one_line(command: str, files: dict[str, Path], tmp_path: Path) -> None:
    if command == "build-calib":
        args = ["build", str(files["onnx"]), "--target", "onnxruntime", "--precision", "int8", "--calib-samples", "1",
                "--calib", str(files["bomb"] / "test"), "--out", str(tmp_path / "art")]
    else:
        args = ["eval", str(files["onnx"]), "--data", str(files["bomb"])]
    line = one_error(run_cli(*args))
    assert "cannot read image" in line and "bomb.png" in line and "decompression bomb" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["build-calib", "eval-data"])
def test_unreadable_archive_is_one_line(command: str, files: dict[str, Path], tmp_path: Path) -> None:
    archive = str(files["not-a-tar.tar.gz"])
    if command == "build-calib":
        args = ["build", str(files["onnx"]), "--target", "onnxruntime", "--precision", "int8", "--calib-samples", "1",
                "--calib", archive, "--out", str(tmp_path / "art")]
    else:
        args = ["eval", str(files["onnx"]), "--data", archive]
    done = run_cli(*args)
    line = one_error(done)
    assert "not-a-tar.tar.gz" in line and "not a tar archive" in line
    assert "method" not in done.stderr  # not tarfile's one line per compression method tried
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["build-profile", "bench-sweep"])
def test_yaml_syntax_error_is_one_line_with_position(command: str, files: dict[str, Path], tmp_path: Path) -> None:
    if command == "build-profile":
        args = ["build", str(files["onnx"]), "--target", str(files["bad.yaml"]), "--out", str(tmp_path / "art")]
    else:
        args = ["bench", "--sweep", str(files["bad.yaml"]), "--results", str(tmp_path / "rows.jsonl")]
    line = one_error(run_cli(*args), code=2)
    assert "bad.yaml:3:1: YAML syntax error" in line
    assert list(tmp_path.iterdir()) == []


OUTPUT_COMMANDS = {
    "build": lambda f, out: ["build", str(f["onnx"]), "--target", "onnxruntime", "--out", out],
    "export": lambda f, out: ["export", str(f["onnx"].with_name("factories.py")) + ":raises", "--out", out],
    "fuse": lambda f, out: ["fuse", "repvgg_a0", "--cifar", "--out", out],
    "bench": lambda f, out: ["bench", "--model", "repvgg_a0", "--results", out],
}


@pytest.mark.parametrize("command", sorted(OUTPUT_COMMANDS))
def test_output_under_a_file_fails_before_any_work(command: str, files: dict[str, Path], tmp_path: Path) -> None:
    out = str(files["afile"] / "sub" / "out")
    line = one_error(run_cli(*OUTPUT_COMMANDS[command](files, out)))
    assert "afile is a file, not a directory" in line


@pytest.mark.parametrize("command", ["export", "fuse"])
def test_force_onto_a_directory_is_refused(command: str, files: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "taken"
    (folder / "keep").mkdir(parents=True)
    line = one_error(run_cli(*OUTPUT_COMMANDS[command](files, str(folder)), "--force"))
    assert "taken is a directory; give a file path" in line
    assert [p.name for p in folder.iterdir()] == ["keep"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", sorted(OUTPUT_COMMANDS))
def test_output_in_a_read_only_folder_fails_before_any_work(command: str, files: dict[str, Path],
                                                            tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = one_error(run_cli(*OUTPUT_COMMANDS[command](files, str(locked / "out"))))
    finally:
        locked.chmod(0o700)
    assert "locked is not writable" in line


def test_bench_where_nothing_was_measured_exits_nonzero_with_the_summary(tmp_path: Path) -> None:
    done = run_cli("bench", "--model", "no_such_model", "--target", "onnxruntime", "--results",
                   str(tmp_path / "rows.jsonl"))
    line = one_error(done)
    assert "nothing was measured: 1 skipped, 0 failed" in line or "nothing was measured: 0 skipped, 1 failed" in line
    assert "0 measured" in done.stdout and "no_such_model" in done.stdout


def _row_without(field: str) -> dict:
    """A complete result row, less ``field`` ("summary", or "config__model" for a nested key)."""
    row = {"schema": "deploykit.bench/1", "status": "ok", "config_id": "c1", "device": {"id": "d1"}, "versions": {},
           "config": {"model": "m", "form": "deploy", "target": "onnxruntime", "target_name": "onnxruntime",
                      "precision": "fp32", "batch": 1, "threads": 1},
           "summary": {"median_ms": 1.0, "min_ms": 1.0, "p90_ms": 1.0, "iqr_ms": 0.0, "cv": 0.0, "ci_low_ms": 1.0,
                       "ci_high_ms": 1.0, "rounds": 2, "unstable": False, "unstable_reasons": []}}
    where, _, key = field.rpartition("__")
    del (row[where] if where else row)[key]
    return row


@pytest.mark.parametrize("missing", ["summary", "versions", "config__model", "config__threads", "summary__median_ms"])
def test_result_row_missing_a_field_is_one_line(missing: str, tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(_row_without(missing)) + "\n")
    line = one_error(run_cli("report", "latency", str(rows), "--out", str(tmp_path / "rep" / "x"), "--no-plots"))
    assert "rows.jsonl:1:" in line and missing.rpartition("__")[2] in line
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("command", ["eval", "package"])
@pytest.mark.parametrize("damage", ["not-json", "not-an-object", "no-backend"])
def test_artifact_with_invalid_build_json_is_one_line(command: str, damage: str, files: dict[str, Path],
                                                      tmp_path: Path) -> None:
    art = tmp_path / "art"
    art.mkdir()
    meta = {"target": "onnxruntime", "precision": "fp32", "files": {}}
    text = {"not-json": "{oops", "not-an-object": "[1, 2]", "no-backend": json.dumps(meta)}[damage]
    (art / "build.json").write_text(text)
    args = {"eval": ["eval", str(art), "--data", str(files["bomb"])],
            "package": ["package", str(art), "--out", str(tmp_path / "b.tar.gz")]}[command]
    line = one_error(run_cli(*args))
    assert "build.json" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


@pytest.mark.parametrize("command", ["build", "eval"])
def test_absurd_thread_count_is_bounded_by_the_machine(command: str, files: dict[str, Path], tmp_path: Path) -> None:
    from deploykit.device import usable_cpus

    data = tmp_path / "data" / "test" / "c"
    data.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(data / "x.png")
    args = {"build": ["build", str(files["onnx"]), "--target", "onnxruntime", "--verify-samples", "2",
                      "--out", str(tmp_path / "art")],
            "eval": ["eval", str(files["onnx"]), "--data", str(tmp_path / "data")]}[command]
    done = run_cli(*args, "--threads", "100000")
    assert done.returncode == 0, done.stderr
    assert f"--threads 100000 is more than the {usable_cpus()} CPUs this process may use" in done.stderr
    if command == "build":
        assert json.loads((tmp_path / "art" / "build.json").read_text())["threads"] == usable_cpus()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_kill_9_of_a_build_kills_its_child_and_the_next_run_cleans_up(files: dict[str, Path], tmp_path: Path) -> None:
    """A stand-in for MNN's ``_tools`` whose converter hangs: the build is killed -9 while it runs."""
    import sys
    import time

    from deploykit.backends.base import get_backend

    if get_backend("mnn").version() is None:
        pytest.skip("target mnn is not installed here")
    fake, tmpdir, work = tmp_path / "fake", tmp_path / "tmpdir", tmp_path / "work"
    for folder in (fake, tmpdir, work):
        folder.mkdir()
    pid_file = tmp_path / "child.pid"
    (fake / "_tools.py").write_text(
        "import os, pathlib, time\n"
        "def mnnconvert(argv):\n"
        f"    pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
        "    time.sleep(600)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmpdir),
           "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    out = work / "art"
    build = subprocess.Popen([sys.executable, "-m", "deploykit", "build", str(files["onnx"]), "--target", "mnn",
                              "--verify-samples", "2", "--out", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid_file.exists(), "the MNN worker never started"
        time.sleep(0.2)
        child = int(pid_file.read_text())
        assert _alive(child)
    finally:
        build.kill()
        build.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the MNN worker outlived its killed parent"
    left = sorted(p.name for p in [*work.iterdir(), *tmpdir.iterdir()])
    assert any(name.startswith(".art.") for name in left) and any(n.startswith("deploykit-build-") for n in left), left
    again = run_cli("build", str(files["onnx"]), "--target", "onnxruntime", "--verify-samples", "2", "--out", str(out),
                    env={"TMPDIR": str(tmpdir)})
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in work.iterdir()) == ["art"]
    assert list(tmpdir.iterdir()) == []

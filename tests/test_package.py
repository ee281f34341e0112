"""Edge bundles: package -> verify -> run for every CPU backend, and every way a bundle can be bad.

Artifacts are built with the real pipeline (``deploykit.build``) from the tiny CIFAR RepVGG
(tests/tiny_model.py), once per backend; each backend whose runtime is missing is skipped.
The standalone runner is run in a subprocess where importing torch or deploykit raises.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from deploykit.artifact import ArtifactRecord
from deploykit.backends.base import get_backend, packageable
from deploykit.errors import DeployError, QualityGateError, UsageError
from deploykit.files import sha256_file
from deploykit.package import ExtractLimits, extract_bundle, package_artifact, run_bundle, verify_bundle
from deploykit.package.bundle import resolve_labels
from deploykit.package.manifest import MANIFEST, Runtime, check_runtime, read_manifest

from tiny_model import write_tiny_model

# Every backend a bundle can hold that runs on a CPU: a new one is covered the moment it is registered.
CPU_BACKENDS = sorted(name for name in packageable() if get_backend(name).device == "cpu")
LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def weights_file(root: Path) -> str:
    """The bundle's largest model file (the weights: model.onnx, model.bin, model.mnn, ...)."""
    files = [p for p in (root / "model").rglob("*") if p.is_file() and p.name != "build.json"]
    return max(files, key=lambda p: p.stat().st_size).relative_to(root).as_posix()

# Runs the bundle's runner with torch and deploykit unimportable: proves the runner needs neither.
BLOCKED_RUNNER = """
import importlib.abc, runpy, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "deploykit"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
for name in ("torch", "deploykit"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable: the blocker does not work")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def needs_runtime(name: str) -> None:
    if get_backend(name).version() is None:
        pytest.skip(f"runtime for {name} is not installed here")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("package")


@pytest.fixture(scope="module")
def artifact(work: Path):
    """artifact(backend) -> fp32 artifact directory, built once per backend with deploykit.build."""
    from deploykit.build import BuildRequest, build

    spec = write_tiny_model(work / "tiny", None)
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        needs_runtime(name)
        if name not in built:
            built[name] = build(BuildRequest(model=spec, target=name, out=work / f"artifact-{name}",
                                             verify_samples=8)).path
        return built[name]

    return get


@pytest.fixture(scope="module")
def bundle(artifact, work: Path):
    """bundle(backend) -> (archive, PackageResult), packaged once per backend."""
    made: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in made:
            out = work / f"tiny-{name}.tar.gz"
            made[name] = (out, package_artifact(artifact(name), out, labels=LABELS))
        return made[name]

    return get


@pytest.fixture(scope="module")
def any_backend() -> str:
    """The first CPU backend installed here, for tests that need one bundle of any kind."""
    for name in CPU_BACKENDS:
        if get_backend(name).version() is not None:
            return name
    pytest.skip("no CPU runtime (onnxruntime, openvino, MNN) installed")


@pytest.fixture(scope="module")
def images(work: Path) -> list[Path]:
    """A PNG larger than the input (center-cropped) and a JPEG of the input size."""
    from PIL import Image

    rng = np.random.default_rng(7)
    png, jpg = work / "big.png", work / "small.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(png)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpg, quality=90)
    return [png, jpg]


def extracted(archive: Path, dest: Path) -> Path:
    return extract_bundle(archive, dest)


def run_runner(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", BLOCKED_RUNNER, str(root / "deploykit_runner.py"), *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def cli(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from deploykit.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(args))
    out, err = capsys.readouterr()
    return done.value.code, out, err


# ---------------------------------------------------------------- round trip, per backend

PRECISIONS = [(name, p) for name in CPU_BACKENDS for p in get_backend(name).precisions if p != "fp32"]


@pytest.mark.parametrize("name, precision", PRECISIONS)
def test_the_runner_computes_as_the_build(name: str, precision: str, work: Path, tmp_path: Path) -> None:
    """On the machine that packaged it, the standalone runner reproduces the golden outputs (computed
    by deploykit's own loader) to float rounding: it loads the model with the build's settings, e.g.
    OpenVINO's bf16 arithmetic (run at f32 it was 2x slower here, and off by 8e-3) or ORT's INT8
    session settings. Precisions this CPU cannot build are skipped with the build's one line."""
    from deploykit.build import BuildRequest, build

    needs_runtime(name)
    spec = write_tiny_model(tmp_path / "tiny", None)
    try:
        built = build(BuildRequest(model=spec, target=name, precision=precision, out=tmp_path / "artifact",
                                   verify_samples=8, calib_samples=16)).path
    except DeployError as err:
        pytest.skip(f"{name} {precision} does not build on this CPU: {err}")
    result = package_artifact(built, tmp_path / "b.tar.gz", labels=LABELS)
    assert result.manifest.runtime.config == get_backend(name).runtime_config(ArtifactRecord.model_validate_json(
        (built / "build.json").read_text()).backend)
    root = extracted(tmp_path / "b.tar.gz", tmp_path / "x")
    done = run_runner(root, "--self-test", "--json")
    assert done.returncode == 0, done.stderr
    golden = json.loads(done.stdout)["golden"]
    assert golden["max_rel_error"] <= 1e-5 and golden["top1_agreement"] == 1.0, golden


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_round_trip_package_verify_run(name: str, bundle, images: list[Path], tmp_path: Path) -> None:
    archive, result = bundle(name)
    manifest = result.manifest
    print(f"{name}: bundle {result.size_bytes} bytes, {len(manifest.files)} files")
    assert result.path == archive and archive.stat().st_size == result.size_bytes == os.path.getsize(archive)
    assert not list(archive.parent.glob(f".{archive.name}.*")), "temporary file left beside the bundle"
    assert manifest.backend == name and manifest.precision == "fp32" and manifest.labels == LABELS
    assert manifest.runtime.version == get_backend(name).version()
    assert manifest.inputs[0].shape == [1, 3, 32, 32] and manifest.outputs[0].shape == [1, 10]
    assert manifest.verification["passed"] and manifest.versions["numpy"]

    root = extracted(archive, tmp_path / "x")
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert on_disk == {*manifest.files, MANIFEST}
    assert {weights_file(root), "model/build.json", "golden.npz", "deploykit_runner.py", "README.md"} <= on_disk
    assert all(sha256_file(root / rel) == digest for rel, digest in manifest.files.items())
    assert read_manifest(root) == manifest

    for source in (archive, root):  # the archive, and the directory a device extracted
        report = verify_bundle(source)
        assert report.files_checked == len(manifest.files)
        assert report.comparison["cosine_min"] > 0.9999 and report.comparison["top1_agreement"] == 1.0
        assert report.warnings == []

    predictions = run_bundle(archive, images, topk=3)
    assert [p.image for p in predictions] == [str(i) for i in images]
    for p in predictions:
        probs = [prob for _, prob in p.top]
        assert len(p.top) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(label in LABELS for label, _ in p.top)

    # The standalone runner, with torch and deploykit unimportable, agrees with deploykit.
    done = run_runner(root, "--self-test", "--json")
    assert done.returncode == 0, done.stderr
    test = json.loads(done.stdout)
    assert test["passed"] and test["files_checked"] == len(manifest.files)
    assert test["golden"]["cosine_min"] > 0.9999 and test["golden"]["samples"] == manifest.golden.count
    done = run_runner(root, *map(str, images), "--topk", "3", "--json")
    assert done.returncode == 0, done.stderr
    for theirs, ours in zip(json.loads(done.stdout), predictions):
        assert [label for label, _ in theirs["top"]] == [label for label, _ in ours.top]
        assert np.allclose([p for _, p in theirs["top"]], [p for _, p in ours.top], atol=1e-5)


def test_cli_package_verify_run(artifact, any_backend: str, images: list[Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    name = any_backend
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    out = tmp_path / "cli.tar.gz"
    code, text, _ = cli("package", str(artifact(name)), "--out", str(out), "--labels", str(labels), "--latency",
                        capsys=capsys)
    assert code == 0 and f"wrote {out}" in text and f"sha256 {sha256_file(out)}" in text
    assert read_manifest(extract_bundle(out, tmp_path / "x")).latency.source == "package"
    code, _, err = cli("package", str(artifact(name)), "--out", str(out), capsys=capsys)
    assert code == 1 and "exists; pass --force" in err
    code, text, _ = cli("verify", str(out), "--json", capsys=capsys)
    assert code == 0 and json.loads(text)["passed"] is True
    code, text, _ = cli("run", str(out), str(images[0]), "--topk", "2", capsys=capsys)
    assert code == 0 and text.splitlines()[0] == str(images[0]) and len(text.splitlines()) == 3
    for command in ("package", "verify", "run"):
        code, text, _ = cli(command, "--help", capsys=capsys)
        assert code == 0 and "Example:" in text


# ---------------------------------------------------------------- integrity and numbers

@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_tampered_model_file_fails_its_checksum(name: str, bundle, tmp_path: Path) -> None:
    archive, _ = bundle(name)
    root = extracted(archive, tmp_path / "x")
    model = root / weights_file(root)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(DeployError, match=f"checksum mismatch: {weights_file(root)}"):
        verify_bundle(root)
    with pytest.raises(DeployError, match=f"checksum mismatch: {weights_file(root)}"):
        run_bundle(root, [root / "README.md"])
    repacked = tmp_path / "repacked.tar.gz"
    with tarfile.open(repacked, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    with pytest.raises(DeployError, match=f"checksum mismatch: {weights_file(root)}"):
        verify_bundle(repacked)
    done = run_runner(root, "--self-test")
    assert done.returncode == 1 and f"checksum mismatch: {weights_file(root)}" in done.stderr


def test_unlisted_extra_file_and_missing_file_are_refused(bundle, any_backend: str, tmp_path: Path) -> None:
    root = extracted(bundle(any_backend)[0], tmp_path / "x")
    (root / "model" / "extra.py").write_text("print('hi')\n")
    with pytest.raises(DeployError, match="model/extra.py is in the bundle but not listed in manifest.json"):
        verify_bundle(root)
    (root / "model" / "extra.py").unlink()
    (root / "golden.npz").unlink()
    with pytest.raises(DeployError, match="golden.npz is listed in manifest.json but missing"):
        verify_bundle(root)


def _rewrite(root: Path, edit) -> None:
    """Change the manifest (and re-hash the files) as a consistent but different bundle."""
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest, root)
    manifest["files"] = {rel: sha256_file(root / rel) for rel in manifest["files"]}
    (root / MANIFEST).write_text(json.dumps(manifest))


def test_golden_mismatch_is_a_quality_gate_failure(bundle, any_backend: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = extracted(bundle(any_backend)[0], tmp_path / "x")

    def wrong_outputs(manifest: dict, root: Path) -> None:
        with np.load(root / "golden.npz") as golden:
            inputs, outputs = golden["inputs"], golden["outputs"]
        np.savez(root / "golden.npz", inputs=inputs, outputs=outputs[::-1].copy())  # outputs of other inputs

    _rewrite(root, wrong_outputs)
    with pytest.raises(QualityGateError, match="golden self-test failed on 8 inputs: cosine similarity"):
        verify_bundle(root)
    code, _, err = cli("verify", str(root), capsys=capsys)
    assert code == 3 and err.startswith("error: golden self-test failed")
    done = run_runner(root, "--self-test")
    assert done.returncode == 3 and "self-test FAILED: cosine_min" in done.stdout


def test_latency_band(bundle, any_backend: str, tmp_path: Path) -> None:
    from deploykit.device import device_fingerprint

    root = extracted(bundle(any_backend)[0], tmp_path / "x")
    here = {k: device_fingerprint()[k] for k in ("cpu", "arch", "id")}

    def band(low: float, high: float, device: dict):
        def edit(manifest: dict, root: Path) -> None:
            manifest["latency"] = {"median_ms": high / 2, "band_ms": [low, high], "batch": 1, "threads": 2,
                                   "iterations": 50, "source": "package", "device": device}
        return edit

    _rewrite(root, band(1e-9, 2e-9, here))  # no model runs in picoseconds
    with pytest.raises(QualityGateError, match="above the band"):
        verify_bundle(root, latency=True)
    assert verify_bundle(root).latency is None  # judged only when asked
    done = run_runner(root, "--self-test", "--latency", "--json")
    assert done.returncode == 3 and "above the band" in json.loads(done.stdout)["problems"][0]
    _rewrite(root, band(0.0, 1e9, here))
    assert verify_bundle(root, latency=True).latency["band"] == "within"
    _rewrite(root, band(1e-9, 2e-9, {"cpu": "Cortex-A76", "arch": "aarch64", "id": "pi"}))
    report = verify_bundle(root, latency=True)
    assert report.latency["band"] == "not comparable" and "recorded on Cortex-A76" in report.warnings[0]
    # The same model name on another core design (a VM's bare "AMD EPYC" spans generations 2x apart
    # in speed): not comparable, in deploykit's verify and in the bundle's own runner.
    design = device_fingerprint()["cpu_id"]
    if design is None:
        pytest.skip("this machine's /proc/cpuinfo names no core design")
    _rewrite(root, band(1e-9, 2e-9, {**here, "cpu_id": design}))
    with pytest.raises(QualityGateError, match="above the band"):
        verify_bundle(root, latency=True)
    _rewrite(root, band(1e-9, 2e-9, {**here, "cpu_id": "SomeVendor family 99 model 99"}))
    report = verify_bundle(root, latency=True)
    assert report.latency["band"] == "not comparable"
    assert f"this is {here['cpu']} ({design})" in report.warnings[0], report.warnings
    done = run_runner(root, "--self-test", "--latency", "--json")
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["passed"], done.stdout
    assert any("family 99 model 99" in w and "not judged" in w for w in result["warnings"]), result["warnings"]


# ---------------------------------------------------------------- manifest schema, versions, labels

@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("labels"), "labels: Field required"),
    (lambda m: m.update(precision=3), "precision: Input should be a valid string"),
    (lambda m: m.update(surprise=1), "surprise: Extra inputs are not permitted"),
    (lambda m: m["files"].update({"../escape": "0" * 64}), "not a plain relative path"),
    (lambda m: m.update(labels=["a", "b"]), "2 labels for 10 outputs"),
    (lambda m: m.update(schema_version=99), "schema version 99; this deploykit reads up to 1: upgrade deploykit"),
])
def test_manifest_is_validated_against_the_schema(edit, message: str, bundle, any_backend: str, tmp_path: Path) -> None:
    root = extracted(bundle(any_backend)[0], tmp_path / "x")
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DeployError, match=message.replace("(", r"\(").replace(")", r"\)")):
        verify_bundle(root)


def test_runtime_version_rule() -> None:
    ort = Runtime(backend="onnxruntime", module="onnxruntime", version="1.32.0")
    assert check_runtime(ort, "1.32.0") == [] and check_runtime(ort, "1.32.4") == []
    assert "bundle built with onnxruntime 1.32.0; this machine has 1.20.1" in check_runtime(ort, "1.20.1")[0]
    with pytest.raises(DeployError, match="needs onnxruntime .* not installed"):
        check_runtime(ort, None)
    trt = Runtime(backend="tensorrt", module="tensorrt", version="10.9.0")
    with pytest.raises(DeployError, match="built with tensorrt 10.9.0; this machine has 10.9.1"):
        check_runtime(trt, "10.9.1")
    assert set(packageable()) >= set(CPU_BACKENDS) | {"tensorrt"}


def test_bundle_from_another_runtime_version_says_so(bundle, any_backend: str, tmp_path: Path) -> None:
    root = extracted(bundle(any_backend)[0], tmp_path / "x")
    _rewrite(root, lambda manifest, root: manifest["runtime"].update(version="0.1.0"))
    installed = get_backend(any_backend).version()
    report = verify_bundle(root)
    assert report.warnings == [f"bundle built with {any_backend} 0.1.0; this machine has {installed}: "
                               "the golden self-test decides whether it runs the same"]
    done = run_runner(root, "--self-test")
    assert done.returncode == 0 and f"warning: bundle built with {any_backend} 0.1.0" in done.stderr


def test_labels_come_from_the_caller_the_build_or_are_generated() -> None:
    def record(**fields):  # the labels' sources in a build record
        return ArtifactRecord(target="onnxruntime", precision="fp32", files={}, **fields)

    assert resolve_labels(None, record(), 3) == (["class_0", "class_1", "class_2"], "generated (no class names known)")
    assert resolve_labels(None, record(classes=["a", "b"]), 2) == (["a", "b"], "build.json")
    assert resolve_labels(["x", "y"], record(classes=["a", "b"]), 2) == (["x", "y"], "given")
    with pytest.raises(UsageError, match="3 labels for a model with 2 outputs"):
        resolve_labels(["x", "y", "z"], record(), 2)


def test_package_refuses_a_changed_artifact_and_a_bad_name(artifact, any_backend: str, tmp_path: Path) -> None:
    copy = shutil.copytree(artifact(any_backend), tmp_path / "artifact")
    with pytest.raises(UsageError, match="name the bundle NAME.tar.gz"):
        package_artifact(copy, tmp_path / "bundle.zip")
    model = next(p for p in copy.iterdir() if p.name != "build.json" and p.suffix != ".bin")
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(DeployError, match=f"{model.name} changed since the build"):
        package_artifact(copy, tmp_path / "b.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()


def test_package_refuses_an_emit_only_tensorrt_artifact(tmp_path: Path) -> None:
    artifact = tmp_path / "trt"
    artifact.mkdir()
    (artifact / "build.json").write_text(json.dumps(
        {"target": "tensorrt", "precision": "fp16", "files": {}, "backend": {"emit_only": True, "model_file": None}}))
    with pytest.raises(DeployError, match="holds no runnable model .*build it on the device, then package"):
        package_artifact(artifact, tmp_path / "trt.tar.gz")


# ---------------------------------------------------------------- hostile archives

def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, None


HOSTILE = {
    "absolute path": ([_file("/tmp/deploykit-escape.txt")], "absolute path"),
    "dot-dot path": ([_file("b/../../escape.txt")], "'..' path component"),
    "symlink": ([_file("b/manifest.json"), _special("b/link", tarfile.SYMTYPE, "/etc/passwd")], "a symlink"),
    "hard link": ([_file("b/manifest.json"), _special("b/hard", tarfile.LNKTYPE, "b/manifest.json")], "a hard link"),
    "device file": ([_special("b/dev", tarfile.CHRTYPE)], "a device file"),
    "fifo": ([_special("b/fifo", tarfile.FIFOTYPE)], "a FIFO"),
    "duplicate": ([_file("b/a", b"1"), _file("b/a", b"2")], "appears twice"),
    "two roots": ([_file("a/manifest.json"), _file("b/manifest.json")], "one top-level directory"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_write_nothing(case: str, tmp_path: Path) -> None:
    members, message = HOSTILE[case]
    archive = _archive(tmp_path / f"{case.replace(' ', '-')}.tar.gz", members)
    dest = tmp_path / "sub" / "dest"
    before = set(tmp_path.rglob("*"))
    with pytest.raises(DeployError, match=message):
        extract_bundle(archive, dest)
    assert set(tmp_path.rglob("*")) == before | {tmp_path / "sub"}  # the parent may be created; nothing else
    assert not Path("/tmp/deploykit-escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    with pytest.raises(DeployError, match=message):
        verify_bundle(archive)


@pytest.mark.parametrize("members, limits, message", [
    ([_file("b/big", b"\0" * 4096)], ExtractLimits(max_file_bytes=1024), "4096 bytes, over the 1024-byte limit"),
    ([_file("b/one", b"\0" * 700), _file("b/two", b"\0" * 700)], ExtractLimits(max_total_bytes=1024),
     "exceed the 1024-byte limit in total"),
    ([_file(f"b/{i}") for i in range(5)], ExtractLimits(max_members=3), "more than 3 members"),
], ids=["file-over-limit", "total-over-limit", "too-many-members"])
def test_archive_bombs_are_refused(members, limits: ExtractLimits, message: str, tmp_path: Path) -> None:
    archive = _archive(tmp_path / "bomb.tar.gz", members)
    with pytest.raises(DeployError, match=message):
        extract_bundle(archive, tmp_path / "dest", limits=limits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.tar.gz"]


def test_truncated_and_non_archives_are_clean_errors(bundle, any_backend: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = bundle(any_backend)[0].read_bytes()
    for label, content in (("truncated", data[: len(data) // 2]), ("garbage", b"not a tarball at all")):
        broken = tmp_path / f"{label}.tar.gz"
        broken.write_bytes(content)
        with pytest.raises(DeployError, match="is not a complete bundle archive"):
            extract_bundle(broken, tmp_path / f"{label}-dest")
        assert not (tmp_path / f"{label}-dest").exists()
        code, _, err = cli("verify", str(broken), capsys=capsys)
        assert code == 1 and err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1

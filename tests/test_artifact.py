"""The artifact record (build.json), the model-or-artifact resolver, the backend protocol's facts,
and the small helpers every layer uses (output comparison, device identity)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from deploykit.artifact import BUILD_JSON, Artifact, ArtifactRecord, read_record, write_record
from deploykit.backends.base import BACKENDS, Backend, get_backend
from deploykit.device import DISTRIBUTIONS, _macos_cpu, device_fingerprint, device_id
from deploykit.errors import DeployError
from deploykit.resolve import model_spec, resolve
from deploykit.verify import compare

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "deploykit" / "package" / "runner_template" / "deploykit_runner.py"

# What deploykit.build wrote before the record was typed (schema 1, from a real build.json).
SCHEMA_1 = {
    "schema_version": 1, "deploykit_version": "0.1.0", "created_utc": "2026-11-23T10:00:00+00:00",
    "target": "onnxruntime", "profile": None, "precision": "fp32", "threads": 2,
    "options": {"optimization_level": "extended"},
    "model": {"name": "repvgg_a0", "source": "zoo", "spec": {"name": "repvgg_a0", "num_classes": 10, "cifar": True},
              "form": "train", "fusion": None},
    "export": {"opset": 17, "sha256": "0" * 64, "report": None},
    "inputs": [{"name": "input", "shape": [1, 3, 32, 32], "dtype": "float32"}],
    "outputs": [{"name": "logits", "shape": [1, 10], "dtype": "float32"}],
    "preprocessing": {"size": 32}, "calibration": None, "classes": None, "max_drop": None,
    "backend": {"model_file": "model.onnx", "batch": 1, "options": {}},
    "verification": {"passed": True}, "versions": {"onnxruntime": "1.32.0"}, "device": {"id": "x"},
    "warnings": [], "size_bytes": 4, "files": {"model.onnx": "0" * 64}, "build_seconds": 1.5,
}


def _write(root: Path, data: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / BUILD_JSON).write_text(json.dumps(data))
    return root


def test_a_schema_1_build_json_loads(tmp_path: Path) -> None:
    record = read_record(_write(tmp_path / "a", SCHEMA_1))
    assert record.target == "onnxruntime" and record.preprocessing.size == 32
    assert record.model.spec == {"name": "repvgg_a0", "num_classes": 10, "cifar": True}
    assert record.inputs[0].shape == [1, 3, 32, 32] and record.backend["model_file"] == "model.onnx"


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(surprise=1), "does not match the artifact schema (unknown key 'surprise'); rebuild the artifact"),
    (lambda d: d["model"].update(argument="x"), "unknown key 'model.argument'"),
    (lambda d: d.pop("files"), "lacks 'files'; rebuild the artifact"),
    (lambda d: d.update(threads="two"), "threads: "),
    (lambda d: d.update(schema_version=9), "schema version 9; this deploykit reads up to 1: upgrade deploykit"),
])
def test_a_bad_build_json_fails_in_one_line(change, message: str, tmp_path: Path) -> None:
    data = json.loads(json.dumps(SCHEMA_1))
    change(data)
    with pytest.raises(DeployError) as err:
        Artifact.open(_write(tmp_path / "a", data))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_writer_records_files_and_reads_back(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"weights")
    record = write_record(tmp_path, target="onnxruntime", precision="int8", backend={"model_file": "model.bin"})
    assert record.files == {"model.bin": hashlib.sha256(b"weights").hexdigest()}
    assert record.size_bytes == 7 and record.versions["deploykit"] and record.created_utc
    assert read_record(tmp_path) == record
    with pytest.raises(DeployError, match="unknown key 'colour'"):
        write_record(tmp_path, target="onnxruntime", precision="int8", colour="red")


def test_adding_an_optional_fact_is_one_field() -> None:
    """Every field beyond what a runtime needs has a default: old files keep loading."""
    required = {name for name, field in ArtifactRecord.model_fields.items() if field.is_required()}
    assert required == {"target", "precision", "files"}


def test_the_resolver_classifies_subjects(tmp_path: Path) -> None:
    artifact = _write(tmp_path / "art", SCHEMA_1)
    assert resolve(artifact).kind == "artifact"
    assert model_spec(resolve(artifact)) == SCHEMA_1["model"]["spec"]
    assert resolve(tmp_path / "m.onnx").kind == "onnx" and resolve("repvgg_a0").kind == "model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeployError, match="folder without build.json: not an artifact"):
        resolve(tmp_path / "empty")
    with pytest.raises(DeployError, match="not ONNX"):
        model_spec(resolve(tmp_path / "m.onnx"))


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_answers_the_whole_protocol(name: str) -> None:
    backend = get_backend(name)
    assert isinstance(backend, Backend)
    assert backend.device in ("cpu", "gpu") and backend.distributions
    assert set(backend.distributions) <= set(DISTRIBUTIONS), "device.DISTRIBUTIONS must record its versions"
    reason = backend.missing_reason()
    assert reason.startswith(f"target {name} needs") and "\n" not in reason
    assert isinstance(backend.clock(), str) and backend.export_batch
    if backend.version() is None:
        assert not backend.can_build({})
        with pytest.raises(DeployError):
            backend.require()


def test_compare_refuses_other_shapes_with_a_user_error() -> None:
    with pytest.raises(DeployError, match=r"output shapes differ: reference \(2, 10\), artifact \(2, 5\)"):
        compare(np.zeros((2, 10)), np.zeros((2, 5)))


def test_the_runner_compares_like_deploykit() -> None:
    """The standalone runner carries its own copy of verify.compare: same figures on the same arrays."""
    spec = importlib.util.spec_from_file_location("deploykit_runner_copy", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    rng = np.random.default_rng(0)
    expected = rng.standard_normal((16, 10)).astype(np.float32)
    cases = [expected + 0.05 * rng.standard_normal((16, 10)).astype(np.float32), expected.copy(),
             np.zeros_like(expected), np.where(np.arange(10) == 3, np.nan, expected).astype(np.float32)]
    for actual in cases:
        ours, theirs = compare(expected, actual).to_dict(), runner.compare(expected, actual)
        for key, value in theirs.items():
            np.testing.assert_allclose(value, ours[key], rtol=1e-12, err_msg=key)


def test_the_runner_knows_every_packageable_backend() -> None:
    from deploykit.backends.base import packageable

    spec = importlib.util.spec_from_file_location("deploykit_runner_copy2", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    assert runner.RUNTIMES == {name: distributions for name, (_, distributions) in packageable().items()}
    assert set(runner.EXACT_VERSION) == {n for n in packageable() if get_backend(n).exact_version}


def test_device_id_survives_kernel_and_driver_upgrades() -> None:
    facts = {k: v for k, v in device_fingerprint().items() if k != "id"}
    gpu = {"name": "NVIDIA H100", "compute_capability": "9.0", "memory_bytes": 1, "driver": "550.1", "cuda_runtime": "12.4"}
    before = device_id({**facts, "os": "Linux-6.1.0-x86_64", "gpus": [gpu]})
    after = device_id({**facts, "os": "Linux-6.8.0-x86_64", "gpus": [{**gpu, "driver": "570.2", "cuda_runtime": "12.8"}]})
    assert before == after
    assert device_id({**facts, "gpus": [{**gpu, "name": "NVIDIA A100"}]}) != before
    assert device_id({**facts, "memory_bytes": 1}) != device_id({**facts, "memory_bytes": 2})


ZEN1 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 23
model		: 1
model name	: AMD EPYC
stepping	: 2
flags		: fpu sse4_1 avx avx2 fma f16c
processor	: 1
vendor_id	: AuthenticAMD
cpu family	: 23
model		: 1
model name	: AMD EPYC
"""


def test_one_cpu_name_on_two_core_designs_is_two_devices() -> None:
    """A VM names Zen 1 and Zen 3 both "AMD EPYC" with one ISA list; CPUID family/model tells them apart."""
    from deploykit.device import _cpuinfo, describe_cpu, same_cpu

    zen1, zen3 = _cpuinfo(ZEN1), _cpuinfo(ZEN1.replace("cpu family\t: 23", "cpu family\t: 25"))
    assert zen1["cpu_id"] == "AuthenticAMD family 23 model 1" and zen3["cpu_id"] == "AuthenticAMD family 25 model 1"
    assert zen1["model"] == zen3["model"] == "AMD EPYC" and zen1["flags"] == zen3["flags"]
    arm = _cpuinfo("processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n")
    assert arm["cpu_id"] == "implementer 0x41 part 0xd0c"
    assert _cpuinfo("flags\t: avx2\n")["cpu_id"] is None

    facts = {k: v for k, v in device_fingerprint().items() if k != "id"}
    one, other = ({**facts, "cpu": "AMD EPYC", "cpu_id": c["cpu_id"]} for c in (zen1, zen3))
    assert device_id(one) != device_id(other)
    assert not same_cpu(one, other) and same_cpu(one, dict(one))
    assert same_cpu(one, {**other, "cpu_id": None})  # recorded before cpu_id existed: by name
    assert describe_cpu(one) == "AMD EPYC (AuthenticAMD family 23 model 1)"
    assert describe_cpu({"cpu": "Apple M2", "cpu_id": None}) == "Apple M2"


def test_macos_isa_from_sysctl() -> None:
    apple = _macos_cpu({"machdep.cpu.brand_string": "Apple M2\n", "hw.physicalcpu": "8\n", "hw.optional.neon": "1\n",
                        "hw.optional.arm.FEAT_DotProd": "1\n", "hw.optional.arm.FEAT_I8MM": "0\n"})
    assert apple["model"] == "Apple M2" and apple["physical_cores"] == 8
    assert apple["flags"] == {"asimd", "asimddp"}

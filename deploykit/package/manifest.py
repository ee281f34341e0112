"""The bundle manifest (``manifest.json``): what a bundle holds, how to run it, how to check it.

A bundle is one directory, shipped as ``NAME.tar.gz``::

    NAME/
      manifest.json          this schema; lists the sha256 of every other file
      model/                 the artifact as built (model files + build.json)
      golden.npz             seeded inputs and the outputs the artifact gave at package time
      deploykit_runner.py    standalone runner: numpy + the runtime (+ Pillow for images)
      README.md              for the device

Runtime versions (``check_runtime``): a bundle records the runtime version that built it.
The rule, applied by ``deploykit verify`` and by the runner alike:

- runtime not installed: error;
- a backend with ``exact_version`` (TensorRT: an engine loads only in the version that built
  it): any other version is an error;
- any other runtime, another major.minor: a warning; the golden self-test then decides;
- same major.minor: fine.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deploykit.artifact import TensorSpec
from deploykit.calib.preprocess import Preprocessing
from deploykit.errors import DeployError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL_DIR = "model"
GOLDEN = "golden.npz"
RUNNER = "deploykit_runner.py"
README = "README.md"

# Which backends a bundle can hold, their modules and distributions: the backends declare it
# (``Backend.runtime_module``, ``distributions``, ``exact_version``; ``backends.base.packageable``).
# The standalone runner carries its own copy (it cannot import deploykit); a test keeps them equal.
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SelfTestTolerance(_Strict):
    """Bounds on golden outputs recomputed on the device against those recorded at package time."""

    min_cosine: float | None = None  # every sample
    min_mean_cosine: float | None = None
    max_rel_error: float | None = None  # max |error| / max |golden output|
    min_top1_agreement: float | None = None


# The device may pick other kernels than the packaging machine (ARM vs x86, fp16 arithmetic
# where the CPU has it, other int8 rounding): bounds wider than the build's, still tight
# enough that a wrong model, wrong runtime or corrupted weights fail.
SELF_TEST_TOLERANCES: dict[str, SelfTestTolerance] = {
    "fp32": SelfTestTolerance(min_cosine=0.9999, max_rel_error=1e-3),
    "fp16": SelfTestTolerance(min_cosine=0.995, max_rel_error=5e-2),
    "bf16": SelfTestTolerance(min_cosine=0.995, max_rel_error=5e-2),  # also: a device without bf16 units (f32)
    "w8": SelfTestTolerance(min_cosine=0.98, min_mean_cosine=0.99),
    "int8": SelfTestTolerance(min_cosine=0.95, min_mean_cosine=0.98),
}


class Runtime(_Strict):
    backend: str
    module: str
    version: str | None  # the version that built the artifact
    device: dict[str, Any] | None = None  # TensorRT: the GPU the engine was built for
    config: dict[str, str] = Field(default_factory=dict)  # settings the runtime loads the model with


class Golden(_Strict):
    file: str = GOLDEN
    count: int = Field(gt=0)
    seed: int
    inputs: str  # how they were made
    produced_with: str  # runtime and version that computed the outputs


class LatencyBand(_Strict):
    """Median latency of one batch at ``threads``, and the band ``verify --latency`` accepts."""

    median_ms: float = Field(gt=0)
    band_ms: tuple[float, float]
    batch: int = Field(gt=0)
    threads: int = Field(gt=0)
    iterations: int = Field(gt=0)
    source: Literal["build", "package"]
    device: dict[str, Any]  # cpu, arch, id: the band is compared only on a matching device


class Manifest(_Strict):
    schema_version: Literal[1]
    name: str
    created_utc: str
    deploykit_version: str
    model: str
    target: str  # the profile or backend the artifact was built for
    backend: str
    precision: str
    threads: int = Field(gt=0)
    model_file: str  # relative to the bundle root
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    preprocessing: Preprocessing
    labels: list[str] = Field(min_length=1)
    labels_source: str
    runtime: Runtime
    versions: dict[str, str]
    verification: dict[str, Any]
    tolerance: SelfTestTolerance
    golden: Golden
    latency: LatencyBand | None = None
    runner: str = RUNNER
    files: dict[str, str] = Field(min_length=1)

    @field_validator("files")
    @classmethod
    def _check_files(cls, files: dict[str, str]) -> dict[str, str]:
        for rel, digest in files.items():
            parts = rel.split("/")
            if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"file path {rel!r} is not a plain relative path")
            if not _SHA256.match(digest):
                raise ValueError(f"sha256 of {rel} is not 64 hex digits")
        if MANIFEST in files:
            raise ValueError(f"{MANIFEST} cannot list itself")
        return files

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        for what, rel in (("model_file", self.model_file), ("golden.file", self.golden.file), ("runner", self.runner)):
            if rel not in self.files:
                raise ValueError(f"{what} {rel} is not among the listed files")
        from deploykit.backends.base import packageable

        if self.backend not in packageable():
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(packageable())}")
        classes = self.outputs[0].shape[-1] if self.outputs[0].shape else None
        if isinstance(classes, int) and len(self.labels) != classes:
            raise ValueError(f"{len(self.labels)} labels for {classes} outputs")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def read_manifest(root: Path) -> Manifest:
    """The bundle's manifest, validated; a missing, unreadable or invalid one is a DeployError."""
    path = root / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise DeployError(f"{root} is not a deploykit bundle (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DeployError(f"{MANIFEST} is not valid JSON: {err}") from err
    if isinstance(data, dict) and isinstance(data.get("schema_version"), int) and data["schema_version"] > SCHEMA_VERSION:
        raise DeployError(
            f"{MANIFEST} has schema version {data['schema_version']}; this deploykit reads up to {SCHEMA_VERSION}: "
            "upgrade deploykit"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise DeployError(f"{MANIFEST} does not match the bundle schema: {where}: {first['msg']}") from err


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(re.split(r"[.+-]", version)[:2])


def check_runtime(runtime: Runtime, installed: str | None) -> list[str]:
    """Warnings for a runtime version other than the one that built the bundle (the rule above)."""
    if installed is None:
        raise DeployError(f"this bundle needs {runtime.module} (the {runtime.backend} runtime); it is not installed")
    if runtime.version is None or installed == runtime.version:
        return []
    from deploykit.backends.base import get_backend

    if get_backend(runtime.backend).exact_version:
        raise DeployError(
            f"this bundle was built with {runtime.backend} {runtime.version}; this machine has {installed}. "
            "An engine loads only in the version that built it: rebuild and package on this machine"
        )
    if _major_minor(installed) != _major_minor(runtime.version):
        return [f"bundle built with {runtime.backend} {runtime.version}; this machine has {installed}: "
                "the golden self-test decides whether it runs the same"]
    return []

"""The artifact record (``build.json``): one typed schema, one writer, one reader.

Every path that makes an artifact (``deploykit.build``, the bench cache's module builds, the
max-drop trials) writes it with ``write_record``; every consumer (eval, analyze, package,
bench, the backends' ``load``) reads it through ``Artifact.open``. Unknown keys are an error,
so a typo or a file from a newer deploykit never passes silently.

Adding a fact is one line: an optional field below (``name: type | None = None``). Facts a
backend wants to keep go into its open ``backend`` section (no schema change needed).

build.json (schema 1)::

    schema_version, deploykit_version, created_utc, build_seconds
    target, profile, precision, threads, options         what was asked (options with defaults)
    model: {name, source, spec, form, fusion}            what was built (fusion: the certificate)
    export: {opset, sha256, report}                      the intermediate ONNX
    inputs / outputs: [{name, shape, dtype}]             the artifact's interface
    preprocessing                                        image -> input tensor (deploykit.calib)
    calibration: {source, recipe, synthetic, count, held_out, seed, shape, sha256} | null
    classes, max_drop                                    class names; the --max-drop search
    backend: {model_file, batch, options, ...}           facts the backend reports (open)
    verification: {reference, inputs, samples, cosine_min, cosine_mean, max_abs_error,
                   max_rel_error, top1_agreement, tolerance, passed, problems}
    versions, device, warnings, size_bytes, built_by
    files: {relative path: sha256}                       every file except build.json
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploykit.calib.preprocess import Preprocessing
from deploykit.errors import DeployError

BUILD_JSON = "build.json"
SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(_Strict):
    name: str
    shape: list[int | str]
    dtype: str


class ModelFacts(_Strict):
    """What the artifact was built from; ``spec`` is what ``deploykit build`` was given (or the
    zoo keywords of a bench build), enough to load the model again."""

    name: str
    source: str | None = None  # zoo, file, checkpoint, onnx, ...
    spec: str | dict[str, Any] | None = None
    form: str | None = None  # train (multi-branch) or deploy (fused)
    fusion: dict[str, Any] | None = None  # the fusion certificate


class ArtifactRecord(_Strict):
    """The typed ``build.json``. Required: what a runtime needs to load the files."""

    schema_version: int = SCHEMA_VERSION
    target: str
    precision: str
    files: dict[str, str]
    backend: dict[str, Any] = Field(default_factory=dict)  # the backend's own facts (open section)
    deploykit_version: str | None = None
    created_utc: str | None = None
    build_seconds: float | None = None
    profile: str | None = None
    threads: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    model: ModelFacts | None = None
    export: dict[str, Any] | None = None
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    preprocessing: Preprocessing | None = None
    calibration: dict[str, Any] | None = None
    classes: list[str] | None = None
    max_drop: dict[str, Any] | None = None
    int8_fix: dict[str, Any] | None = None  # a named INT8 fix (build --int8-fix) and what it did
    verification: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None  # a measured median (median_ms, threads, iterations) if any
    versions: dict[str, str] = Field(default_factory=dict)
    device: dict[str, Any] | None = None
    warnings: list[str] = Field(default_factory=list)
    size_bytes: int | None = None
    built_by: str | None = None  # who wrote it when not the pipeline (e.g. the bench cache)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=False), indent=2, default=str) + "\n"

    @property
    def input_shape(self) -> list[int | str]:
        if not self.inputs:
            raise DeployError(f"{BUILD_JSON} records no inputs; rebuild the artifact")
        return self.inputs[0].shape


def parse_record(data: Any, where: str) -> ArtifactRecord:
    """Validate a build.json dict; anything wrong is one DeployError line saying what to do."""
    if not isinstance(data, dict):
        raise DeployError(f"{where} is not a JSON object; rebuild the artifact")
    version = data.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise DeployError(f"{where} has schema version {version}; this deploykit reads up to {SCHEMA_VERSION}: "
                          "upgrade deploykit")
    for key in ("target", "precision", "files"):
        if key not in data:
            raise DeployError(f"{where} lacks {key!r}; rebuild the artifact")
    try:
        return ArtifactRecord.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        what = f"unknown key {loc!r}" if first["type"] == "extra_forbidden" else f"{loc}: {first['msg']}"
        raise DeployError(f"{where} does not match the artifact schema ({what}); rebuild the artifact") from err


def read_record(path: str | Path) -> ArtifactRecord:
    """The record of the artifact directory ``path``."""
    path = Path(path)
    build_json = path / BUILD_JSON
    if not build_json.is_file():
        raise DeployError(f"{path} is not a deploykit artifact (no {BUILD_JSON})")
    try:
        data = json.loads(build_json.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DeployError(f"{build_json} is unreadable: {err}") from err
    if isinstance(data, dict) and "backend" not in data:  # every build writes its backend's facts
        raise DeployError(f"{build_json} lacks 'backend'; rebuild the artifact")
    return parse_record(data, str(build_json))


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / BUILD_JSON).is_file()


def write_record(directory: Path, **fields: Any) -> ArtifactRecord:
    """Write ``directory/build.json``: the given fields plus what the writer knows (version, time,
    tool versions, the sha256 and total size of every file already in ``directory``)."""
    from deploykit import __version__
    from deploykit.device import tool_versions
    from deploykit.files import sha256_tree

    files = sha256_tree(directory)
    files.pop(BUILD_JSON, None)
    defaults: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "deploykit_version": __version__,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": tool_versions(),
        "size_bytes": sum((directory / name).stat().st_size for name in files),
        "files": files,
    }
    data = json.loads(json.dumps({**defaults, **fields}, default=str))  # plain JSON types, as it will be read
    record = parse_record(data, f"{directory / BUILD_JSON} (being written)")
    (directory / BUILD_JSON).write_text(record.to_json())
    return record


@dataclass(frozen=True)
class Artifact:
    """A built artifact: a directory holding model files and its record."""

    path: Path
    record: ArtifactRecord

    @classmethod
    def open(cls, path: str | Path) -> Artifact:
        return cls(Path(path), read_record(path))

    @classmethod
    def staged(cls, path: Path, target: str, precision: str, backend: dict[str, Any]) -> Artifact:
        """Files a backend just built, before the record is written (to load them for checks)."""
        return cls(Path(path), ArtifactRecord(target=target, precision=precision, files={}, backend=backend))

    @property
    def target(self) -> str:
        return self.record.target

    @property
    def precision(self) -> str:
        return self.record.precision

    @property
    def backend(self) -> dict[str, Any]:
        """The backend's own facts (what its ``build`` returned)."""
        return self.record.backend

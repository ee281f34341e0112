"""The backend protocol and the name -> module table.

A backend is one module answering a small protocol: is it available (and which version),
build an artifact from an ONNX model, load an artifact into a runner. Backends are found
through ``BACKENDS`` and imported on first use, so a missing optional runtime never breaks
``import deploykit`` nor any other backend.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from deploykit.errors import DeployError, UsageError

if TYPE_CHECKING:
    import numpy as np

BUILD_JSON = "build.json"
BUILD_SCHEMA_VERSION = 1

# target name -> "module:class"; a module is imported only when its target is used.
BACKENDS: dict[str, str] = {
    "torch": "deploykit.backends.torch_cpu:TorchBackend",
    "onnxruntime": "deploykit.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "deploykit.backends.openvino:OpenVINOBackend",
    "mnn": "deploykit.backends.mnn:MNNBackend",
    "torch-cuda": "deploykit.backends.torch_cuda:TorchCudaBackend",
    "tensorrt": "deploykit.backends.tensorrt:TensorRTBackend",
}


@dataclass(frozen=True)
class BuildConfig:
    """What to build. ``options`` holds backend-specific settings, validated by the backend."""

    precision: str = "fp32"
    threads: int = 2
    calibration: Any = None  # a deploykit.calib.CalibrationSet, or None for no calibration
    options: dict[str, Any] = field(default_factory=dict)
    # The fused nn.Module when the pipeline has one; only backends that build from PyTorch
    # (the torch target) read it. Never recorded in build.json.
    source_model: Any = None


@dataclass(frozen=True)
class Artifact:
    """A built artifact: a directory holding model files and ``build.json``."""

    path: Path
    meta: dict[str, Any]

    @property
    def target(self) -> str:
        return self.meta["target"]

    @property
    def precision(self) -> str:
        return self.meta["precision"]

    @classmethod
    def open(cls, path: str | Path) -> Artifact:
        path = Path(path)
        build_json = path / BUILD_JSON
        if not build_json.is_file():
            raise DeployError(f"{path} is not a deploykit artifact (no {BUILD_JSON})")
        try:
            meta = json.loads(build_json.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DeployError(f"{build_json} is unreadable: {err}") from err
        if not isinstance(meta, dict):
            raise DeployError(f"{build_json} is not a JSON object; rebuild the artifact")
        for key in ("target", "precision", "files", "backend"):
            if key not in meta:
                raise DeployError(f"{build_json} lacks {key!r}; rebuild the artifact")
        if not isinstance(meta["backend"], dict) or not isinstance(meta["files"], dict):
            raise DeployError(f"{build_json}: 'backend' and 'files' must be objects; rebuild the artifact")
        return cls(path, meta)


class Runner(Protocol):
    """A loaded model: NCHW float32 batch in, outputs (logits) out."""

    threads: int

    def __call__(self, inputs: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Backend(Protocol):
    name: str
    precisions: tuple[str, ...]
    extra: str  # the pip extra that installs it: deploykit[<extra>]
    options: dict[str, Option]  # settings it accepts (--option key=value), validated by resolve_options

    def version(self) -> str | None:
        """The runtime's version, or None when it is not installed."""

    def build(self, onnx_path: Path, out_dir: Path, config: BuildConfig) -> dict[str, Any]:
        """Write model files into ``out_dir``; return backend facts for build.json."""

    def load(self, artifact: Artifact, *, threads: int) -> Runner: ...


@dataclass(frozen=True)
class Option:
    """One backend setting: ``--option name=value`` on the command line, ``options:`` in a profile."""

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    precisions: tuple[str, ...] | None = None  # None: every precision
    kind: type | None = None  # the value's type when the default (None) does not say it
    bounds: tuple[float, float] | None = None  # inclusive range of a number

    def parse(self, backend: str, name: str, value: Any) -> Any:
        kind = self.kind or (type(self.default) if self.default is not None else str)
        if value is None and self.default is None:
            return None
        if isinstance(value, str) and kind is not str:
            text = value.strip().lower()
            try:
                if kind is bool:
                    if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(value)
                    value = text in ("1", "true", "yes", "on")
                else:
                    value = kind(text)
            except ValueError:
                raise UsageError(f"option {name}={value!r} for target {backend}: expected {kind.__name__}") from None
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, kind):
            raise UsageError(f"option {name}={value!r} for target {backend}: expected {kind.__name__}")
        if self.choices is not None:
            folded = {str(c).lower(): c for c in self.choices}
            if str(value).lower() not in folded:
                raise UsageError(
                    f"option {name}={value!r} for target {backend}: choose from {', '.join(map(str, self.choices))}"
                )
            value = folded[str(value).lower()]
        if self.bounds is not None and not self.bounds[0] <= value <= self.bounds[1]:
            low, high = self.bounds
            raise UsageError(f"option {name}={value!r} for target {backend}: must be between {low:g} and {high:g}")
        return value


def resolve_options(backend: str, specs: dict[str, Option], given: dict[str, Any], precision: str) -> dict[str, Any]:
    """Validate ``given`` against ``specs``; return every option for ``precision``, defaults filled in."""
    unknown = sorted(set(given) - set(specs))
    if unknown:
        valid = ", ".join(sorted(specs)) or "none"
        raise UsageError(f"unknown option {', '.join(unknown)} for target {backend}; valid options: {valid}")
    resolved: dict[str, Any] = {}
    for name, spec in specs.items():
        applies = spec.precisions is None or precision in spec.precisions
        if name in given and not applies:
            raise UsageError(
                f"option {name} for target {backend} applies to precision {'/'.join(spec.precisions or ())}, "
                f"not {precision}"
            )
        if applies:
            resolved[name] = spec.parse(backend, name, given[name]) if name in given else spec.default
    return resolved


def run_in_batches(run: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch: int | None) -> np.ndarray:
    """Call ``run`` on chunks of ``batch`` rows (a model exported with a fixed batch); None: all at once."""
    import numpy as np

    if batch is None or len(inputs) == batch:
        return run(inputs)
    if len(inputs) % batch:
        raise DeployError(f"this artifact takes batches of {batch}; got {len(inputs)} inputs")
    return np.concatenate([run(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])


def installed_version(module: str, distribution: str) -> str | None:
    """Version of ``distribution`` when ``module`` is importable; cheap: nothing is imported."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    try:
        if importlib.util.find_spec(module) is None:
            return None
        return version(distribution)
    except (PackageNotFoundError, ValueError):
        return None


def check_precision(backend: Backend, precision: str) -> None:
    if precision not in backend.precisions:
        raise UsageError(
            f"target {backend.name} does not build precision {precision}; choose from {', '.join(backend.precisions)}"
        )


def get_backend(name: str) -> Backend:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise DeployError(f"unknown target {name!r}; choose from {', '.join(sorted(BACKENDS))}") from None
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)()

"""The backend protocol and the name -> module table.

A backend is one module answering a small protocol: is it available (and which version),
build an artifact from an ONNX model (or from the nn.Module), load an artifact into a runner,
plus every fact a caller needs about it (its pip distributions, why it is missing, the batch it
is exported with, what has run, how it is timed, its max-drop switches). Callers never name a
backend nor probe it with getattr: what differs is declared here, with defaults in
``BackendBase``. Backends are found through ``BACKENDS`` and imported on first use, so a
missing optional runtime never breaks ``import deploykit`` nor any other backend.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, runtime_checkable

from deploykit.artifact import BUILD_JSON, Artifact  # noqa: F401  (re-exported for the backends)
from deploykit.errors import DeployError, MissingBackendError, UsageError

if TYPE_CHECKING:
    import numpy as np

# Threads a build or a runner uses when nobody says: the one default for every entry point.
DEFAULT_THREADS = 2
HOST_CLOCK = "host perf_counter around each call"
Measure = Callable[[int], "np.ndarray"]  # run n times -> each iteration's seconds

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
    threads: int = DEFAULT_THREADS
    calibration: Any = None  # a deploykit.calib.CalibrationSet, or None for no calibration
    options: dict[str, Any] = field(default_factory=dict)
    # The fused nn.Module when the pipeline has one; only backends that build from PyTorch
    # (the torch target) read it. Never recorded in build.json.
    source_model: Any = None


class Runner(Protocol):
    """A loaded model: NCHW float32 batch in, outputs (logits) out."""

    threads: int

    def __call__(self, inputs: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class MaxDropKnobs:
    """A backend's names for the switches ``deploykit.quant.max_drop`` turns."""

    per_channel: tuple[str, Any] | None  # (option, value) turning per-channel weights on; None: always per channel
    bias_correction: tuple[str, Any] | None  # the backend's own full bias correction; None: deploykit's
    float_layers: str | None  # option taking comma-separated op names kept in float; None: not possible
    op_name: Callable[[Any], str] = lambda node: node.name  # ONNX Conv/Gemm NodeProto -> the option's name
    why_no_float: str | None = None  # when float_layers is None: the reason, for the report


@runtime_checkable
class Backend(Protocol):
    name: str
    precisions: tuple[str, ...]
    extra: str  # the pip extra that installs it: deploykit[<extra>]
    options: dict[str, Option]  # settings it accepts (--option key=value), validated by resolve_options
    distributions: tuple[str, ...]  # pip distributions whose version names the runtime
    runtime_module: str | None  # what a standalone bundle runner imports; None: cannot be packaged
    exact_version: bool  # an artifact loads only in the runtime version that built it
    device: Literal["cpu", "gpu"]  # where it computes
    builds_from_module: bool  # built from the fused nn.Module (BuildConfig.source_model), not from ONNX
    export_batch: int | str  # the batch the pipeline exports the ONNX with ("dynamic": symbolic)
    max_drop_knobs: MaxDropKnobs | None  # None: deploykit's max-drop search does not apply
    native_max_drop_option: str | None  # an option doing the search itself (top-1 points), used instead

    def version(self) -> str | None:
        """The runtime's version, or None when it is not installed."""

    def missing_reason(self) -> str:
        """One line: why the target cannot run here and what to install."""

    def status(self) -> str | None:
        """What has and has not been run of this target (None: built and run in deploykit's tests)."""

    def can_build(self, options: dict[str, Any]) -> bool:
        """Whether ``build`` can run here with these (resolved) options; default: installed."""

    def require(self) -> None:
        """Raise the one-line DeployError saying why this target cannot run here (`doctor --require`)."""

    def timer(self, runner: Runner, inputs: Any) -> Measure | None:
        """The runner's own clock (device events); None: the harness times with the host clock."""

    def clock(self) -> str:
        """What ``timer`` measures, for result rows."""

    def built_with(self, facts: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
        """(runtime version, device) the built files are tied to, from its build facts; (None, None):
        not tied (the version is then the one tool_versions recorded)."""

    def runtime_config(self, facts: dict[str, Any]) -> dict[str, str]:
        """Settings the runtime is given when it loads the built files, from their build facts (a
        bundle's runner applies them too, so a device computes as the build was verified)."""

    def variants(self, precision: str, flags: frozenset[str]) -> dict[str, dict[str, Any]]:
        """Option sets, beside the defaults, that ``deploykit advise`` also builds, scores and times at
        ``precision`` on a CPU with ``flags``: name -> options. Each trades exactness for speed in a
        way only a measurement on the model can judge; {}: the defaults are the only candidate."""

    def build(self, onnx_path: Path, out_dir: Path, config: BuildConfig) -> dict[str, Any]:
        """Write model files into ``out_dir``; return backend facts for build.json."""

    def load(self, artifact: Artifact, *, threads: int) -> Runner: ...


class BackendBase:
    """Defaults of the protocol's facts; a backend overrides what differs."""

    name: str
    extra: str
    distributions: tuple[str, ...] = ()
    runtime_module: str | None = None
    exact_version = False
    device: Literal["cpu", "gpu"] = "cpu"
    builds_from_module = False
    export_batch: int | str = 1
    max_drop_knobs: MaxDropKnobs | None = None
    native_max_drop_option: str | None = None

    def version(self) -> str | None:
        module = self.runtime_module or (self.distributions[0] if self.distributions else self.name)
        return next((v for d in self.distributions if (v := installed_version(module, d))), None)

    def missing_reason(self) -> str:
        return str(MissingBackendError(self.name, self.name, self.extra))

    def status(self) -> str | None:
        return None

    def can_build(self, options: dict[str, Any]) -> bool:
        return self.version() is not None

    def require(self) -> None:
        if self.version() is None:
            raise DeployError(self.missing_reason())

    def timer(self, runner: Runner, inputs: Any) -> Measure | None:
        return None

    def clock(self) -> str:
        return HOST_CLOCK

    def built_with(self, facts: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
        return None, None

    def runtime_config(self, facts: dict[str, Any]) -> dict[str, str]:
        return {}

    def variants(self, precision: str, flags: frozenset[str]) -> dict[str, dict[str, Any]]:
        return {}


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


def packageable() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Backends a bundle can hold: name -> (module the runner imports, distributions naming its version)."""
    found = {}
    for name in BACKENDS:
        backend = get_backend(name)
        if backend.runtime_module is not None:
            found[name] = (backend.runtime_module, backend.distributions)
    return found


def get_backend(name: str) -> Backend:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise DeployError(f"unknown target {name!r}; choose from {', '.join(sorted(BACKENDS))}") from None
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)()

"""What a sweep measures: models x forms x targets x precisions x batch sizes x threads x input sizes.

Given as a YAML file (``sweeps/*.yaml``) or built from command-line flags; validated on
creation, and an unknown key is an error that lists the valid ones. ``configurations()``
expands the grid in a fixed order; configurations sharing batch size, threads and input size
form one *group*, timed with their rounds interleaved (A B C A B C ...).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from deploykit.errors import UsageError

FORMS = ("deploy", "train")  # deploy: re-parameterized (fused); train: as built, multi-branch
AXES = ("model", "form", "target", "precision")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One model of the sweep. ``weights_from`` names another entry whose weights it reuses."""

    name: str
    label: str = ""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights_from: str | None = None

    @model_validator(mode="after")
    def _default_label(self) -> ModelSpec:
        if not self.label:
            extra = ",".join(f"{k}={v}" for k, v in sorted(self.kwargs.items()))
            object.__setattr__(self, "label", f"{self.name}[{extra}]" if extra else self.name)
        return self


class TargetSpec(_Strict):
    """A target with build options; ``label`` tells apart variants of one target."""

    name: str
    label: str = ""
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _default_label(self) -> TargetSpec:
        if not self.label:
            extra = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
            object.__setattr__(self, "label", f"{self.name}[{extra}]" if extra else self.name)
        return self


class Claim(_Strict):
    """What the literature expects of candidate vs baseline on some targets."""

    text: str
    expect: Literal["candidate_faster", "baseline_faster", "same"]
    targets: list[str] = Field(default_factory=list)  # target names or labels; empty: every target


class Comparison(_Strict):
    """A paired comparison the report computes: candidate / baseline along one axis."""

    name: str
    axis: Literal["model", "form", "target", "precision"]
    baseline: str
    candidate: str
    claims: list[Claim] = Field(default_factory=list)
    noise: float = Field(0.05, gt=0, lt=1)  # |ratio - 1| below this is "within noise"


def _as_mapping(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class SweepSpec(_Strict):
    name: str = "adhoc"
    description: str = ""
    models: list[ModelSpec] = Field(min_length=1)
    forms: list[Literal["deploy", "train"]] = ["deploy"]
    targets: list[TargetSpec] = Field(default_factory=lambda: [TargetSpec(name="onnxruntime")], min_length=1)
    precisions: list[str] = Field(default_factory=lambda: ["fp32"], min_length=1)
    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    threads: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    input_sizes: list[PositiveInt | None] = Field(default_factory=lambda: [None], min_length=1)
    num_classes: PositiveInt = 1000
    cifar: bool = False
    seed: int = 0  # model initialisation and inputs
    calib: str | None = None  # int8 calibration data or recipe; None: synthetic tensors
    calib_samples: PositiveInt = 128
    rounds: int = Field(5, ge=2)
    min_round_time: float = Field(0.5, gt=0)  # seconds per round
    warmup_min_time: float = Field(0.2, ge=0)
    warmup_max_time: float = Field(10.0, gt=0)
    warmup_tolerance: float = Field(0.02, gt=0)
    memory: bool = False  # peak RSS of inference in a fresh subprocess per configuration
    memory_iterations: PositiveInt = 10
    compare: list[Comparison] = Field(default_factory=list)
    cache_dir: str = "build/bench-cache"

    @field_validator("models", "targets", mode="before")
    @classmethod
    def _strings(cls, value: Any) -> Any:
        return [_as_mapping(v) for v in value] if isinstance(value, list) else value

    @field_validator("threads", mode="after")
    @classmethod
    def _bounded_threads(cls, value: list[int]) -> list[int]:
        from deploykit.device import bound_threads

        return list(dict.fromkeys(bound_threads(t, what="threads") for t in value))  # capped, duplicates dropped

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        labels = [m.label for m in self.models]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"model labels must be unique: {', '.join(dupes)}")
        for m in self.models:
            if m.weights_from is not None and m.weights_from not in labels:
                raise ValueError(f"model {m.label}: weights_from {m.weights_from!r} is not a model label")
        for c in self.compare:
            values = {"model": labels, "form": list(self.forms), "precision": list(self.precisions),
                      "target": [t.label for t in self.targets]}[c.axis]
            for side in (c.baseline, c.candidate):
                if side not in values:
                    raise ValueError(f"comparison {c.name}: {side!r} is not one of the sweep's {c.axis}s ({', '.join(values)})")
        return self

    def model(self, label: str) -> ModelSpec:
        return next(m for m in self.models if m.label == label)


@dataclass(frozen=True)
class Config:
    """One point of the grid."""

    model: ModelSpec
    form: str
    target: TargetSpec
    precision: str
    batch: int
    threads: int
    input_size: int | None

    @property
    def group(self) -> tuple[int | None, int, int]:
        return (self.input_size, self.batch, self.threads)

    def describe(self) -> dict[str, Any]:
        """The row's ``config``: every field that identifies this measurement."""
        return {
            "model": self.model.label,
            "model_name": self.model.name,
            "model_kwargs": dict(self.model.kwargs),
            "weights_from": self.model.weights_from,
            "form": self.form,
            "target": self.target.label,
            "target_name": self.target.name,
            "target_options": dict(self.target.options),
            "precision": self.precision,
            "batch": self.batch,
            "threads": self.threads,
            "input_size": self.input_size,
        }

    def short(self) -> str:
        size = f" {self.input_size}px" if self.input_size else ""
        return (f"{self.model.label} {self.form} {self.target.label} {self.precision} "
                f"b{self.batch} t{self.threads}{size}")


def config_id(config: Config, spec: SweepSpec) -> str:
    """Stable id of a measurement: same id = same thing measured (resume skips it)."""
    identity = {**config.describe(), "num_classes": spec.num_classes, "cifar": spec.cifar, "seed": spec.seed,
                "calib": spec.calib if config.precision == "int8" else None}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def configurations(spec: SweepSpec) -> list[Config]:
    """The grid, group by group (input size, batch, threads), each group in model-major order."""
    return [
        Config(model, form, target, precision, batch, threads, size)
        for size in spec.input_sizes
        for batch in spec.batch_sizes
        for threads in spec.threads
        for model in spec.models
        for form in spec.forms
        for target in spec.targets
        for precision in spec.precisions
    ]


def load_sweep(path: Path, **overrides: Any) -> SweepSpec:
    """Read a sweep YAML; ``overrides`` (flags given on the command line) win over the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UsageError(f"sweep file {path} does not exist") from None
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        from deploykit.configfile import yaml_error_line

        raise UsageError(f"{path}{yaml_error_line(err)}") from err
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of sweep keys to values")
    data.setdefault("name", path.stem)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return make_sweep(origin=str(path), **data)


def make_sweep(*, origin: str = "sweep", **fields: Any) -> SweepSpec:
    """A sweep from keyword arguments (flags or a file); any problem is one UsageError line."""
    from pydantic import ValidationError

    try:
        return SweepSpec.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            valid = _valid_keys(first["loc"])
            raise UsageError(f"{origin}: unknown key {where!r}; valid keys: {valid}") from err
        message = first["msg"].removeprefix("Value error, ")
        raise UsageError(f"{origin}: {where + ': ' if where else ''}{message}") from err


def _valid_keys(loc: tuple[Any, ...]) -> str:
    """The keys allowed where an unknown key was found (top level or a nested entry)."""
    nested = {"models": ModelSpec, "targets": TargetSpec, "compare": Comparison}
    model: type[BaseModel] = SweepSpec
    if loc and loc[0] in nested:
        model = nested[loc[0]]
        if loc[0] == "compare" and "claims" in loc:
            model = Claim
    return ", ".join(model.model_fields)

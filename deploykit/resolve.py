"""One resolver for "a model or an artifact": what build, eval, analyze, bench and package are given.

A SUBJECT is one of

- an artifact directory (it holds ``build.json``): ``kind == "artifact"``;
- an ``.onnx`` file: ``kind == "onnx"``;
- anything else is a MODEL spec for ``deploykit.loading.load_model`` (zoo name,
  ``file.py:factory``, a checkpoint, ...): ``kind == "model"``.

A folder without ``build.json`` is an error (not an artifact), never a model. The PyTorch model
behind an artifact is found from what its record says it was built from (``model.spec``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deploykit.artifact import BUILD_JSON, Artifact, is_artifact
from deploykit.errors import DeployError

Kind = Literal["artifact", "onnx", "model"]


@dataclass(frozen=True)
class Subject:
    text: str  # as given
    kind: Kind
    artifact: Artifact | None = None  # kind == "artifact"

    @property
    def path(self) -> Path:
        return Path(self.text)


def resolve(subject: str | Path) -> Subject:
    """Classify ``subject``; an artifact's record is read (and validated) here."""
    text = str(subject)
    path = Path(text)
    if is_artifact(path):
        return Subject(text, "artifact", Artifact.open(path))
    if path.is_dir():
        raise DeployError(f"{path} is a folder without {BUILD_JSON}: not an artifact")
    if path.suffix == ".onnx":
        return Subject(text, "onnx")
    return Subject(text, "model")


def open_artifact(subject: str | Path) -> Artifact:
    """``subject`` as an artifact directory, or a DeployError saying it is not one."""
    resolved = resolve(subject)
    if resolved.artifact is None:
        raise DeployError(f"{subject} is not a deploykit artifact (no {BUILD_JSON})")
    return resolved.artifact


def model_spec(subject: Subject) -> str | dict[str, Any]:
    """What ``load_torch`` is given for ``subject``: the MODEL spec, or the one its artifact records."""
    if subject.kind == "model":
        return subject.text
    if subject.kind == "onnx":
        raise DeployError(f"{subject.text}: this needs the PyTorch model (zoo name or checkpoint), not ONNX")
    model = subject.artifact.record.model if subject.artifact is not None else None
    spec = model.spec if model is not None else None
    if isinstance(spec, str):
        return spec  # a MODEL spec, or the .onnx file it was built from
    if isinstance(spec, dict) and spec.get("name"):
        return spec
    source = (model.source if model is not None else None) or "a model"
    name = model.name if model is not None else ""
    raise DeployError(
        f"{subject.text} was built from {source} {name} whose file {BUILD_JSON} does not record; pass the "
        "checkpoint it was built from instead"
    )


def load_torch(spec: str | dict[str, Any], *, num_classes: int | None = None, cifar: bool | None = None,
               input_size: int | None = None) -> Any:
    """A ``deploykit.loading.LoadedModel`` for a MODEL spec or a recorded zoo spec (a dict of
    ``create_model`` keywords, as the bench cache records them)."""
    from deploykit.loading import LoadedModel, load_model

    if isinstance(spec, dict):
        from deploykit.models import create_model

        keywords = dict(spec)
        name = keywords.pop("name")
        keywords.pop("label", None)
        keywords.pop("weights_from", None)
        keywords = {**keywords.pop("kwargs", {}), **keywords}
        model = create_model(name, **keywords).eval()
        size = input_size or int(getattr(model, "default_input_size", 224))
        return LoadedModel(model=model, name=name, input_size=size, form="train", source="zoo", spec=dict(spec))
    return load_model(spec, num_classes=num_classes, cifar=cifar, input_size=input_size)

"""What ``deploykit analyze`` looks at: the fused PyTorch model behind an artifact or a MODEL.

An artifact directory names its model in ``build.json`` and stores the calibration it was
built with, so the analysis defaults to the same calibration set. A MODEL is anything
``deploykit build`` takes except ``.onnx`` (the analysis needs the PyTorch modules).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import DeployError


@dataclass
class Subject:
    name: str
    fused: Any  # nn.Module, deploy form, eval mode
    train_model: Any  # the model as loaded (train form) or None when it was loaded fused
    sources: dict[str, list[str]]  # fused module -> the train-time modules folded into it
    input_size: int
    calibration: dict[str, Any] = field(default_factory=dict)  # the artifact's calibration summary, if any
    preprocessing: dict[str, Any] | None = None


def _model_argument(path: Path, meta: dict[str, Any]) -> str | dict[str, Any]:
    model = meta.get("model") or {}
    argument = model.get("argument")
    if argument:
        return argument
    spec = model.get("spec")
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and model.get("source") == "zoo":
        return spec
    raise DeployError(
        f"{path} was built from {model.get('source', 'a model')} {model.get('name', '')!s} whose file build.json "
        "does not record; run `deploykit analyze CHECKPOINT` on the checkpoint it was built from"
    )


def open_subject(subject: str, *, num_classes: int | None = None, cifar: bool | None = None) -> Subject:
    """The fused model (and what it came from) for an artifact directory or a MODEL spec."""
    from deploykit.backends.base import BUILD_JSON, Artifact
    from deploykit.fuse import reparameterize
    from deploykit.loading import load_model

    path = Path(subject)
    calibration: dict[str, Any] = {}
    preprocessing = None
    if (path / BUILD_JSON).is_file():
        meta = Artifact.open(path).meta
        argument = _model_argument(path, meta)
        calibration = meta.get("calibration") or {}
        preprocessing = meta.get("preprocessing")
    else:
        argument = subject
    if isinstance(argument, str) and argument.endswith(".onnx"):
        raise DeployError(f"{argument}: analyze needs the PyTorch model (zoo name or checkpoint), not ONNX")
    if isinstance(argument, dict):
        from deploykit.models import create_model

        spec = dict(argument)
        model = create_model(spec.pop("name"), **spec).eval()
        name, form, size = argument["name"], "train", int(getattr(model, "default_input_size", 224))
    else:
        loaded = load_model(argument, num_classes=num_classes, cifar=cifar)
        model, name, form, size = loaded.model, loaded.name, loaded.form, loaded.input_size
    if form == "deploy":
        return Subject(name, model, None, {}, size, calibration, preprocessing)
    result = reparameterize(model, input_shape=(2, 3, size, size))
    sources = {b.module: list(b.sources) for b in result.certificate.blocks}
    return Subject(name, result.model, model, sources, size, calibration, preprocessing)

"""What ``deploykit analyze`` looks at: the fused PyTorch model behind an artifact or a MODEL.

An artifact directory names its model in ``build.json`` and stores the calibration it was
built with, so the analysis defaults to the same calibration set. A MODEL is anything
``deploykit build`` takes except ``.onnx`` (the analysis needs the PyTorch modules).
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


def open_subject(subject: str, *, num_classes: int | None = None, cifar: bool | None = None) -> Subject:
    """The fused model (and what it came from) for an artifact directory or a MODEL spec."""
    from deploykit.fuse import reparameterize
    from deploykit.resolve import load_torch, model_spec, resolve

    resolved = resolve(subject)
    calibration: dict[str, Any] = {}
    preprocessing = None
    if resolved.artifact is not None:
        record = resolved.artifact.record
        calibration = record.calibration or {}
        preprocessing = record.preprocessing.to_dict() if record.preprocessing is not None else None
    if resolved.kind == "onnx":
        raise DeployError(f"{subject}: analyze needs the PyTorch model (zoo name or checkpoint), not ONNX")
    spec = model_spec(resolved)
    if isinstance(spec, str) and spec.endswith(".onnx"):
        raise DeployError(f"{spec}: analyze needs the PyTorch model (zoo name or checkpoint), not ONNX")
    loaded = load_torch(spec, num_classes=num_classes, cifar=cifar)
    model, name, form, size = loaded.model, loaded.name, loaded.form, loaded.input_size
    if form == "deploy":
        return Subject(name, model, None, {}, size, calibration, preprocessing)
    result = reparameterize(model, input_shape=(2, 3, size, size))
    sources = {b.module: list(b.sources) for b in result.certificate.blocks}
    return Subject(name, result.model, model, sources, size, calibration, preprocessing)

"""Top-1 accuracy of an artifact (or a PyTorch model, or an .onnx file) on a labeled image folder.

An artifact is fed with the preprocessing stored in its ``build.json``; a model or .onnx file
with the default recipe for its input size (or the recipe named).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.artifact import BUILD_JSON
from deploykit.backends.base import DEFAULT_THREADS, Runner, get_backend
from deploykit.calib import Preprocessing, default_recipe, load_recipe, open_source
from deploykit.calib.recipes import fit_recipe
from deploykit.calib.sources import labeled_subset
from deploykit.errors import DeployError


@dataclass(frozen=True)
class EvalResult:
    subject: str
    data: str
    top1: float
    correct: int
    count: int
    per_class: dict[str, float]
    seconds: float
    preprocessing: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Evaluable:
    """Something to evaluate: a runner and the preprocessing that belongs to it."""

    runner: Runner
    preprocessing: Preprocessing
    description: str


def open_evaluable(
    subject: str, *, threads: int = DEFAULT_THREADS, num_classes: int | None = None, cifar: bool | None = None,
    calib_recipe: str | None = None,
) -> Evaluable:
    """An artifact directory, an ``.onnx`` file, or any MODEL spec ``deploykit build`` takes
    (``deploykit.resolve``); ``calib_recipe`` overrides the preprocessing."""
    from deploykit.resolve import load_torch, resolve

    resolved = resolve(subject)
    path = resolved.path
    if resolved.artifact is not None:
        artifact = resolved.artifact
        if artifact.record.preprocessing is None:
            raise DeployError(f"{path / BUILD_JSON} stores no preprocessing; rebuild the artifact")
        pre = artifact.record.preprocessing
        if calib_recipe:
            pre = fit_recipe(load_recipe(calib_recipe), pre.size).preprocessing
        runner = get_backend(artifact.target).load(artifact, threads=threads)
        return Evaluable(runner, pre, f"{path} ({artifact.target} {artifact.precision})")
    if resolved.kind == "onnx":
        from deploykit.backends.onnxruntime import OnnxRuntimeRunner
        from deploykit.onnxio import check_image_model

        size = check_image_model(path)  # the same checks as `deploykit build`
        runner: Runner = OnnxRuntimeRunner(path, threads=threads)
        description = f"{path} (onnxruntime fp32)"
    else:
        from deploykit.backends.torch_cpu import TorchRunner

        loaded = load_torch(subject, num_classes=num_classes, cifar=cifar)
        size, runner = loaded.input_size, TorchRunner(loaded.model, threads=threads)
        description = f"{loaded.name} (torch eager)"
    chosen = fit_recipe(load_recipe(calib_recipe), size) if calib_recipe else default_recipe(size)
    return Evaluable(runner, chosen.preprocessing, description)


def evaluate(
    evaluable: Evaluable,
    data: str | Path,
    *,
    split: str | None = "test",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Top-1 of ``evaluable`` on the labeled images at ``data``; ``limit``: a seeded subset."""
    source, labels, indices = labeled_subset(data, split, limit, seed)
    start = time.perf_counter()
    predicted = np.full(len(source), -1, dtype=np.int64)
    done = 0
    for chunk, tensors in source.iter_load(indices, evaluable.preprocessing, batch_size):
        logits = evaluable.runner(tensors)
        if logits.ndim != 2:
            raise DeployError(f"{evaluable.description} returns outputs of shape {logits.shape}, not (N, classes)")
        predicted[chunk] = logits.argmax(axis=1)
        done += len(chunk)
        if progress is not None:
            progress(done, len(indices))
    hits = predicted[indices] == labels[indices]
    classes = source.classes or tuple(str(i) for i in range(int(labels.max()) + 1))
    per_class = {
        name: float(hits[labels[indices] == k].mean())
        for k, name in enumerate(classes)
        if (labels[indices] == k).any()
    }
    return EvalResult(
        subject=evaluable.description,
        data=source.description,
        top1=float(hits.mean()),
        correct=int(hits.sum()),
        count=len(indices),
        per_class=per_class,
        seconds=time.perf_counter() - start,
        preprocessing=evaluable.preprocessing.to_dict(),
    )

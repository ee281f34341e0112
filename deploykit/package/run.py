"""``run_bundle``: classify images with a bundle's own model, preprocessing and labels.

The bundle's checksums are checked first (a changed model is never run); the golden
self-test is ``verify``'s job.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.errors import DeployError, UsageError, one_line
from deploykit.package.manifest import read_manifest
from deploykit.package.verify import check_files, load_bundle_model, open_bundle

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (label, softmax probability), most likely first


def softmax(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted.astype(np.float64))
    return exp / exp.sum(axis=1, keepdims=True)


def _load_images(paths: list[Path], preprocessing: Any) -> np.ndarray:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    rows = []
    for path in paths:
        try:
            with Image.open(path) as image:
                rows.append(preprocessing.apply(image, name=str(path)))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            raise DeployError(f"cannot read image {path}: {one_line(err)}") from err
    return np.stack(rows)


def run_bundle(path: str | Path, images: list[str | Path], topk: int = 5, *,
               threads: int | None = None) -> list[Prediction]:
    """Top-``topk`` labels and probabilities for each image."""
    import numpy as np

    if not images:
        raise UsageError("give at least one image")
    if topk < 1:
        raise UsageError("topk must be at least 1")
    paths = [Path(p) for p in images]
    with open_bundle(path) as root:
        manifest = read_manifest(root)
        check_files(root, manifest)
        runner, _, _ = load_bundle_model(root, manifest, threads or manifest.threads)
        inputs = _load_images(paths, manifest.preprocessing)
        logits = np.asarray(runner(inputs), dtype=np.float32).reshape(len(paths), -1)
    probs = softmax(logits)
    k = min(topk, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        Prediction(str(p), [(manifest.labels[i], float(row[i])) for i in idx])
        for p, row, idx in zip(paths, probs, order)
    ]

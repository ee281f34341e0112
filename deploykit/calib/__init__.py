"""Calibration sets: the same preprocessed tensors for every backend, chosen reproducibly.

``load_calibration(spec, input_size=...)`` takes a recipe name (``calib/<name>.yaml``), a
recipe file, or data (image folder, ``.tar.gz`` tree, ``.npy``/``.npz``). It draws a seeded
subset: the first ``num_samples`` items calibrate, the next ``num_verify`` are held out to
verify the built artifact. Without data (``spec=None``) it falls back to seeded standard-normal
tensors, marked ``synthetic``: enough to exercise INT8 kernels, not to set accurate ranges.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.calib.preprocess import Preprocessing
from deploykit.calib.recipes import Recipe, default_recipe, fit_recipe, list_recipes, load_recipe
from deploykit.calib.sources import open_source
from deploykit.configfile import find_config
from deploykit.errors import DeployError

__all__ = [
    "CalibrationSet", "Preprocessing", "Recipe", "load_calibration", "synthetic_inputs",
    "list_recipes", "load_recipe", "default_recipe", "open_source", "MIN_RECOMMENDED_SAMPLES",
]

logger = logging.getLogger(__name__)

MIN_RECOMMENDED_SAMPLES = 300
SYNTHETIC_SOURCE = "synthetic: standard normal tensors"


@dataclass(frozen=True)
class CalibrationSet:
    inputs: np.ndarray  # (N, C, H, W) float32, preprocessed
    preprocessing: Preprocessing
    source: str
    seed: int
    recipe: str | None
    synthetic: bool
    held_out: np.ndarray  # verification inputs, never used for calibration
    labels: np.ndarray | None = None
    held_out_labels: np.ndarray | None = None
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def batches(self, batch_size: int = 1) -> Iterator[np.ndarray]:
        for start in range(0, len(self.inputs), batch_size):
            yield self.inputs[start : start + batch_size]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.inputs, dtype=np.float32).tobytes()).hexdigest()

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "recipe": self.recipe,
            "synthetic": self.synthetic,
            "count": len(self.inputs),
            "held_out": len(self.held_out),
            "seed": self.seed,
            "shape": list(self.inputs.shape),
            "sha256": self.sha256,
        }


def synthetic_inputs(count: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *shape)).astype(np.float32)


def _resolve(spec: str | None, input_size: int, recipe_name: str | None) -> tuple[Recipe, str | None]:
    """(recipe, data location) for ``spec``: a recipe name/file, or data with the default recipe."""
    recipe = load_recipe(recipe_name) if recipe_name else None
    if spec is not None and find_config("calib", spec) is not None:
        if recipe is not None:
            raise DeployError(f"--calib {spec} is a recipe already; give data with --calib PATH")
        recipe = load_recipe(spec)
        if recipe.source is None:
            raise DeployError(f"calibration recipe {recipe.name} names no data; pass --calib PATH")
        if not Path(recipe.source).expanduser().exists():
            raise DeployError(
                f"calibration recipe {recipe.name} reads {recipe.source}, which does not exist here; "
                "pass the data with --calib PATH (and --calib-recipe NAME for its preprocessing)"
            )
        return fit_recipe(recipe, input_size), recipe.source
    return fit_recipe(recipe, input_size) if recipe else default_recipe(input_size), spec


def load_calibration(
    spec: str | None,
    *,
    input_size: int,
    num_samples: int | None = None,
    num_verify: int = 64,
    seed: int | None = None,
    recipe: str | None = None,
) -> CalibrationSet:
    """The calibration set ``spec`` names (see the module docstring); ``spec=None``: synthetic."""
    chosen, data = _resolve(spec, input_size, recipe)
    count = num_samples or chosen.num_samples
    seed = chosen.seed if seed is None else seed
    pre = chosen.preprocessing
    if data is None:
        return CalibrationSet(
            inputs=synthetic_inputs(count, pre.input_shape, seed),
            preprocessing=pre, source=SYNTHETIC_SOURCE, seed=seed, recipe=chosen.name, synthetic=True,
            held_out=synthetic_inputs(num_verify, pre.input_shape, seed + 1),
        )
    source = open_source(data, chosen.split)
    order = np.random.default_rng(seed).permutation(len(source))
    verify_count = min(num_verify, len(source) // 2)
    calib_idx = order[: min(count, len(source) - verify_count)]
    verify_idx = order[len(calib_idx) : len(calib_idx) + verify_count]
    if len(calib_idx) == 0:
        raise DeployError(f"calibration data {source.description} holds too few samples ({len(source)})")
    labels = source.labels()
    rows = source.load(np.concatenate([calib_idx, verify_idx]), pre)  # one pass over an archive
    logger.info("calibration: %d samples from %s (seed %d)", len(calib_idx), source.description, seed)
    return CalibrationSet(
        inputs=rows[: len(calib_idx)],
        preprocessing=pre, source=source.description, seed=seed, recipe=chosen.name, synthetic=False,
        held_out=rows[len(calib_idx) :],
        labels=None if labels is None else labels[calib_idx],
        held_out_labels=None if labels is None else labels[verify_idx],
        classes=source.classes,
    )

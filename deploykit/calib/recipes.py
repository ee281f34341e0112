"""Calibration recipes: ``calib/<name>.yaml`` = preprocessing + default data + count + seed."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from deploykit.calib.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from deploykit.configfile import find_config, list_configs, load_config
from deploykit.errors import UsageError

DEFAULT_NUM_SAMPLES = 512
SMALL_INPUT = 64  # inputs up to this size are CIFAR-style (no resize), larger ImageNet-style


class Recipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    source: str | None = Field(default=None, description="default data location; --calib PATH overrides it")
    split: str | None = "train"
    num_samples: int = Field(default=DEFAULT_NUM_SAMPLES, gt=0)
    seed: int = 0
    preprocessing: Preprocessing


def list_recipes() -> dict[str, Path]:
    return list_configs("calib")


def load_recipe(name_or_path: str) -> Recipe:
    path = find_config("calib", name_or_path)
    if path is None:
        known = ", ".join(list_recipes()) or "none found"
        raise UsageError(f"no calibration recipe {name_or_path!r} (recipes: {known})")
    return load_config(path, Recipe, name=path.stem)


def default_recipe(input_size: int) -> Recipe:
    """The recipe used when none is named: cifar10 for small inputs, imagenet-style otherwise."""
    name = "cifar10" if input_size <= SMALL_INPUT else "imagenet-style"
    if name in list_recipes():
        recipe = load_recipe(name)
    elif input_size <= SMALL_INPUT:  # no calib/ folder (an installed wheel): the same numbers
        recipe = Recipe(name=name, preprocessing=Preprocessing(
            size=input_size, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)))
    else:
        recipe = Recipe(name=name, preprocessing=Preprocessing(
            size=input_size, resize=round(input_size / 0.875), mean=IMAGENET_MEAN, std=IMAGENET_STD))
    return fit_recipe(recipe, input_size)


def fit_recipe(recipe: Recipe, input_size: int) -> Recipe:
    """``recipe`` for a model taking ``input_size`` pixels; rescale an ImageNet-style resize."""
    pre = recipe.preprocessing
    if pre.size == input_size:
        return recipe
    if input_size <= SMALL_INPUT and pre.resize is None and pre.size > SMALL_INPUT:
        raise UsageError(f"recipe {recipe.name} is for {pre.size}x{pre.size} inputs; the model takes {input_size}")
    resize = None if pre.resize is None else round(pre.resize * input_size / pre.size)
    return recipe.model_copy(update={"preprocessing": pre.model_copy(update={"size": input_size, "resize": resize})})

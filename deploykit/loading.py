"""Resolve a MODEL argument: a zoo name, ``path/to/file.py:factory``, or a checkpoint."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.checkpoint import CHECKPOINT_SUFFIXES, read_checkpoint
from deploykit.errors import DeployError


@dataclass
class LoadedModel:
    model: Any  # nn.Module in eval mode
    name: str
    input_size: int
    form: str = "train"  # "train" or "deploy"
    source: str = "zoo"  # "zoo", "python", "checkpoint"
    spec: dict[str, Any] = field(default_factory=dict)  # rebuild recipe (zoo models)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.input_size, self.input_size)


def _from_zoo(spec: dict[str, Any]) -> Any:
    from deploykit.models import create_model

    spec = dict(spec)
    return create_model(spec.pop("name"), **spec)


def _from_python(path_and_factory: str) -> Any:
    path_text, _, factory_name = path_and_factory.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise DeployError(f"{path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"deploykit_user_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)  # the user asked us to run this file
    except Exception as err:
        raise DeployError(f"{path} failed to import: {type(err).__name__}: {err}") from err
    factory = getattr(module, factory_name, None)
    if factory is None:
        raise DeployError(f"{path} has no {factory_name!r}")
    return factory()


def _from_checkpoint(path: Path, overrides: dict[str, Any]) -> tuple[Any, dict[str, Any], str]:
    from deploykit.fuse import reparameterize

    state, meta = read_checkpoint(path)
    if not meta or "model" not in meta:
        raise DeployError(
            f"checkpoint {path} does not say which model it belongs to (no deploykit metadata); "
            "save it with deploykit (train/fuse) or load the state_dict into your own model"
        )
    spec = {**meta["model"], **overrides}
    model = _from_zoo(spec).eval()
    form = meta.get("form", "train")
    if form == "deploy":
        model = reparameterize(model, check=False).model
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise DeployError(f"checkpoint {path} does not fit model {spec['name']}: {first}") from err
    return model, spec, form


def load_model(
    spec: str,
    *,
    num_classes: int | None = None,
    cifar: bool | None = None,
    input_size: int | None = None,
) -> LoadedModel:
    """Build the model that ``spec`` names, in eval mode."""
    overrides: dict[str, Any] = {}
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if cifar is not None:
        overrides["cifar"] = cifar
    path = Path(spec)
    if path.suffix in CHECKPOINT_SUFFIXES or (path.exists() and not spec.endswith(".py")):
        model, recipe, form = _from_checkpoint(path, overrides)
        name, source = recipe["name"], "checkpoint"
    elif ".py:" in spec:
        model, recipe, form = _from_python(spec), {}, "train"
        name, source = spec, "python"
    else:
        recipe = {"name": spec, "num_classes": 1000, "cifar": False, **overrides}
        model, form, name, source = _from_zoo(recipe), "train", spec, "zoo"
    size = input_size or int(getattr(model, "default_input_size", 224))
    return LoadedModel(model.eval(), name, size, form, source, recipe)


def check_input(loaded: LoadedModel, batch: int = 1) -> None:
    """Run one forward pass so a wrong input size fails here with the expected shape."""
    import torch

    shape = (batch, 3, loaded.input_size, loaded.input_size)
    try:
        with torch.no_grad():
            loaded.model(torch.zeros(shape))
    except RuntimeError as err:
        default = int(getattr(loaded.model, "default_input_size", 0)) or None
        expected = f"; expected (N, 3, {default}, {default})" if default else ""
        raise DeployError(
            f"model {loaded.name} does not accept input {shape}{expected}: {str(err).splitlines()[0][:160]}"
        ) from err

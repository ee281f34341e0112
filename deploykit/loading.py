"""Resolve a MODEL argument: a zoo name, ``timm:NAME`` / ``torchvision:NAME``, ``path/to/file.py:factory``,
or a deploykit checkpoint; ``weights`` fills the model from a checkpoint (safetensors, or a torch
file read with ``weights_only=True``; foreign RepVGG naming renamed by ``models.keymaps``)."""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.checkpoint import CHECKPOINT_SUFFIXES, read_checkpoint
from deploykit.errors import DeployError

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any  # nn.Module in eval mode
    name: str
    input_size: int
    form: str = "train"  # "train" or "deploy"
    source: str = "zoo"  # "zoo", "external", "python", "checkpoint"
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


def _load_state(model: Any, path: Path, label: str, family: str | None = None) -> tuple[Any, str, str | None]:
    """Fill ``model`` from the checkpoint at ``path``: (model, form, key map used)."""
    from deploykit.fuse import reparameterize
    from deploykit.models.keymaps import to_zoo

    state, meta = read_checkpoint(path)
    form = (meta or {}).get("form", "train")
    if form == "deploy":  # the fused graph is deterministic: rebuild it, then fill it
        model = reparameterize(model, check=False).model
    key_map = None
    if family is not None:
        state, key_map = to_zoo(state, family)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        result = model.load_state_dict(state, strict=False) if "size mismatch" not in str(err) else None
        if result is not None:
            parts = [f"{len(result.missing_keys)} missing (first: {result.missing_keys[0]})"] if result.missing_keys else []
            parts += [f"{len(result.unexpected_keys)} unexpected (first: {result.unexpected_keys[0]})"] if result.unexpected_keys else []
            detail = ", ".join(parts)
        else:
            detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
        raise DeployError(f"checkpoint {path} does not fit model {label}: {detail[:300]}") from err
    return model, form, key_map


def _from_checkpoint(path: Path, overrides: dict[str, Any]) -> tuple[Any, dict[str, Any], str, str]:
    """A deploykit checkpoint: (model, rebuild recipe, form, name)."""
    _, meta = read_checkpoint(path)
    if not meta or "model" not in meta:
        raise DeployError(
            f"checkpoint {path} does not say which model it belongs to (no deploykit metadata); "
            f"name the model and pass the file as weights, e.g. `deploykit build repvgg_a0 --weights {path}` "
            f"or `deploykit build timm:NAME --weights {path}`"
        )
    spec = {**meta["model"], **overrides}
    if "python" in spec:
        raise DeployError(
            f"checkpoint {path} was made from Python code ({spec['python']}); deploykit never runs code that a "
            f"checkpoint names: pass the code yourself, `deploykit build {spec['python']} --weights {path}`"
        )
    if "external" in spec:
        from deploykit.models.external import create_external

        name = spec["external"]
        model = create_external(name, num_classes=spec.get("num_classes"))
    else:
        name = spec["name"]
        model = _from_zoo(spec).eval()
    model, form, _ = _load_state(model, path, name)
    return model, spec, form, name


def load_model(
    spec: str,
    *,
    num_classes: int | None = None,
    cifar: bool | None = None,
    input_size: int | None = None,
    weights: str | Path | None = None,
) -> LoadedModel:
    """Build the model that ``spec`` names, in eval mode, filled from ``weights`` when given.

    ``weights="pretrained"`` (timm/torchvision only) asks the library for its pretrained weights.
    """
    overrides: dict[str, Any] = {}
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if cifar is not None:
        overrides["cifar"] = cifar
    path = Path(spec)
    family = None
    pretrained = str(weights) == "pretrained"
    if pretrained and not _is_external(spec):
        raise DeployError(f"--weights pretrained works for timm:NAME and torchvision:NAME models, not {spec}")
    if path.suffix in CHECKPOINT_SUFFIXES or (path.exists() and not spec.endswith(".py")):
        if weights is not None:
            raise DeployError(f"{spec} is a checkpoint already; --weights names the weights of a model given by name")
        model, recipe, form, name = _from_checkpoint(path, overrides)
        source = "checkpoint"
    elif ".py:" in spec:
        model, recipe, form = _from_python(spec), {"python": spec}, "train"
        name, source = spec, "python"
    elif _is_external(spec):
        from deploykit.models.external import create_external

        model = create_external(spec, num_classes=num_classes, pretrained=pretrained)
        recipe, form, name, source = {"external": spec, "num_classes": num_classes}, "train", spec, "external"
    else:
        from deploykit.models import get_entry

        recipe = {"name": spec, "num_classes": 1000, "cifar": False, **overrides}
        model, form, name, source = _from_zoo(recipe), "train", spec, "zoo"
        family = get_entry(spec).family
    if weights is not None and not pretrained:
        model, form, key_map = _load_state(model.eval(), Path(weights), name, family)
        if key_map:
            logger.info("weights %s: keys renamed from the %s naming", weights, key_map)
    size = input_size or int(getattr(model, "default_input_size", 0)) or _declared_size(model)
    return LoadedModel(model.eval(), name, size, form, source, recipe)


def _is_external(spec: str) -> bool:
    from deploykit.models.external import is_external

    return is_external(spec)


def _declared_size(model: Any) -> int:
    from deploykit.models.external import input_size_of

    return input_size_of(model)


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

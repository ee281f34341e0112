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
from deploykit.errors import DeployError, one_line

# Files that are models, but not PyTorch ones: what they are, for the error that says so.
OTHER_MODEL_FILES = {
    ".onnx": "an ONNX model",
    ".engine": "a TensorRT engine",
    ".plan": "a TensorRT engine",
    ".trt": "a TensorRT engine",
    ".xml": "an OpenVINO IR model",
    ".mnn": "an MNN model",
}
BUILD_JSON = "build.json"  # deploykit.backends.base.BUILD_JSON, not imported: loading stays light

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


INIT_SEED = 0  # an untrained model's initial weights: the same in every command (advise, build, eval)


def _from_zoo(spec: dict[str, Any]) -> Any:
    import torch

    from deploykit.models import create_model

    spec = dict(spec)
    with torch.random.fork_rng(devices=[]):  # seeded init, the caller's random state untouched
        torch.manual_seed(INIT_SEED)
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
    if not callable(factory):
        raise DeployError(f"{path}: {factory_name} is a {type(factory).__name__}, not a function returning a model")
    try:
        model = factory()  # the user's code: any exception it raises is its own problem to report
    except Exception as err:
        raise DeployError(f"{path_and_factory}: {factory_name}() raised {type(err).__name__}: {one_line(err)}") from err
    import torch

    if not isinstance(model, torch.nn.Module):
        raise DeployError(f"{path_and_factory}: {factory_name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def refuse_non_pytorch(spec: str, what: str = "this command") -> None:
    """A model file of another kind (ONNX, engine, IR) or an artifact folder, given where a PyTorch
    MODEL is expected: one error that says what the file is."""
    path = Path(spec)
    if path.is_dir():
        kind = "a deploykit artifact" if (path / BUILD_JSON).is_file() else "a folder"
        raise DeployError(f"{path} is {kind}, not a model; {what} takes a zoo name, file.py:factory or checkpoint")
    kind = OTHER_MODEL_FILES.get(path.suffix.lower())
    if kind is not None:
        raise DeployError(f"{path} is {kind}, not a PyTorch model; {what} takes a zoo name, file.py:factory "
                          "or checkpoint (eval and bench take the artifact folder that holds a built model)")


def _mismatch(model: Any, state: dict[str, Any]) -> str:
    """The first tensor of ``state`` that does not fit ``model``: expected vs found shape, or a missing key."""
    expected = model.state_dict()
    for name, want in expected.items():  # in the model's order: the first layer that does not fit
        if name in state and tuple(state[name].shape) != tuple(want.shape):
            return f"tensor {name} has shape {tuple(state[name].shape)}, the model expects {tuple(want.shape)}"
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    return "; ".join(parts) or "the tensors do not fit"


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
        raise DeployError(f"checkpoint {path} does not fit model {label}: {_mismatch(model, state)}") from err
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
        try:
            model = _from_zoo(spec).eval()
        except (TypeError, ValueError) as err:  # wrong keywords or values in the recorded recipe
            raise DeployError(f"checkpoint {path}: its model recipe {spec} does not build: {one_line(err)}") from err
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
    refuse_non_pytorch(spec)
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

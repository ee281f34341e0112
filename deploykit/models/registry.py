"""The model zoo registry: a decorator and a dict.

Every factory takes ``num_classes`` and ``cifar`` (32x32 inputs, stem without the early
downsampling) plus family-specific keywords, and returns an ``nn.Module`` in its train-time
form. The deploy form is always ``deploykit.fuse.reparameterize(model)``: no model carries
its own ``switch_to_deploy``.
"""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deploykit.errors import DeployError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., Any]
    family: str
    paper: str
    # Figures from the paper at 224x224, 1000 classes (RepVGG: the deploy form; others: the
    # model as built, which fusion changes by <2%). None: not given.
    paper_params: float | None = None
    paper_macs: float | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def doc(self) -> str:
        return (self.factory.__doc__ or "").strip().splitlines()[0] if self.factory.__doc__ else ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    *,
    family: str,
    paper: str,
    paper_params: float | None = None,
    paper_macs: float | None = None,
    tags: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a factory under its function name."""

    def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
        name = factory.__name__
        if name in _REGISTRY:
            raise RuntimeError(f"model {name} registered twice")
        _REGISTRY[name] = ModelEntry(name, factory, family, paper, paper_params, paper_macs, tags)
        return factory

    return decorate


def _load_families() -> None:
    # Importing the family modules registers their factories.
    from deploykit.models import convnext, g_ghost, ghostnet, qarepvgg, repopt, repvgg  # noqa: F401


def list_models(pattern: str = "*") -> list[str]:
    _load_families()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_entry(name: str) -> ModelEntry:
    _load_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `deploykit models`"
        raise DeployError(f"unknown model {name!r}{hint}") from None


def create_model(name: str, num_classes: int = 1000, cifar: bool = False, **kwargs: Any):
    """Build zoo model ``name`` in its train-time form (eval mode is the caller's choice)."""
    entry = get_entry(name)
    try:
        model = entry.factory(num_classes=num_classes, cifar=cifar, **kwargs)
    except TypeError as err:
        raise DeployError(f"model {name}: {err}") from err
    # Recorded so checkpoints and artifacts can name how to rebuild the model.
    model.deploykit_spec = {"name": name, "num_classes": num_classes, "cifar": cifar, **kwargs}
    return model

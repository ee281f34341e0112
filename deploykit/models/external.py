"""Models from other libraries by name: ``timm:NAME`` and ``torchvision:NAME``.

Nothing is downloaded unless weights="pretrained" asks for the library's own pretrained
weights (its own download mechanism; without a network that is one clean error line).
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any

from deploykit.errors import DeployError

LIBRARIES = ("timm", "torchvision")
INSTALL_HINT = (
    "pip install 'deploykit[timm]' and a torchvision built for torch {torch}: on a CPU-only machine "
    "pip install torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu (see README, 'Models from timm')"
)


def is_external(spec: str) -> bool:
    library, sep, name = spec.partition(":")
    return bool(sep and name) and library in LIBRARIES


def _import(library: str) -> Any:
    import torch

    hint = INSTALL_HINT.format(torch=torch.__version__.split("+")[0])
    try:
        return importlib.import_module(library)
    except ImportError as err:
        raise DeployError(f"{library} models need {library} installed ({err}): {hint}") from err
    except Exception as err:  # a torchvision built for another torch fails with RuntimeError at import
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DeployError(f"{library} fails to import ({type(err).__name__}: {first[:160]}): {hint}") from err


def _unknown(library: str, name: str, known: list[str]) -> DeployError:
    close = difflib.get_close_matches(name, known, n=3)
    tail = f"; did you mean {', '.join(close)}?" if close else ""
    return DeployError(f"{library} has no model {name!r}{tail}")


def create_external(spec: str, *, num_classes: int | None = None, pretrained: bool = False) -> Any:
    """The model ``spec`` (``timm:NAME`` / ``torchvision:NAME``) in eval mode."""
    library, _, name = spec.partition(":")
    module = _import(library)
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    try:
        if library == "timm":
            if name not in module.list_models():
                raise _unknown(library, name, module.list_models())
            model = module.create_model(name, pretrained=pretrained, **kwargs)
        else:
            known = module.models.list_models()
            if name not in known:
                raise _unknown(library, name, known)
            model = module.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    except DeployError:
        raise
    except Exception as err:  # network errors, bad keyword combinations: the library's own types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        what = "downloading pretrained weights" if pretrained else "creating the model"
        raise DeployError(f"{spec}: {what} failed ({type(err).__name__}: {first[:200]})") from err
    return model.eval()


def input_size_of(model: Any, default: int = 224) -> int:
    """The input size a timm model declares in its pretrained config, else ``default``."""
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = config.get("input_size") if isinstance(config, dict) else None
    return int(size[-1]) if size else default

"""Checkpoints that never execute code: safetensors, or torch files read with weights_only=True.

A deploykit checkpoint records how to rebuild its model (zoo name and keywords) and its form:
"train" (the zoo model) or "deploy" (the zoo model after ``deploykit.fuse.reparameterize``,
whose structure is deterministic, so the fused graph is rebuilt and then filled).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from deploykit.errors import DeployError
from deploykit.files import atomic_file

META_KEY = "deploykit"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def save_checkpoint(model: Any, path: Path, *, spec: dict[str, Any], form: str, force: bool = False, extra: dict | None = None) -> Path:
    """Write ``model``'s tensors and rebuild recipe; ``.safetensors`` or ``.pt`` by suffix."""
    import torch

    meta = json.dumps({"model": spec, "form": form, **(extra or {})})
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_file(path, force=force) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={META_KEY: meta})
        else:
            torch.save({"state_dict": tensors, META_KEY: meta}, tmp)
    return path


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state_dict, deploykit metadata or None). Raises DeployError for anything unreadable."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DeployError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = (fh.metadata() or {}).get(META_KEY)
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise DeployError(f"checkpoint {path} is corrupt or not safetensors: {err}") from err
        return state, json.loads(meta) if meta else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; we judge ourselves
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise DeployError(
                f"checkpoint {path} needs code to load (a pickled object, not plain tensors); "
                "deploykit loads checkpoints with weights_only=True and never executes code: "
                "save a state_dict or safetensors instead"
            ) from err
        raise DeployError(f"checkpoint {path} is corrupt or not a torch file: {text.splitlines()[0][:200]}") from err
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        meta = data.get(META_KEY)
        return data["state_dict"], json.loads(meta) if isinstance(meta, str) else None
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        return data, None
    raise DeployError(f"checkpoint {path} holds no state_dict")

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

from deploykit.errors import DeployError, one_line
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


# How a torch.save file starts: a zip archive (torch >= 1.6) or a pickle (protocol 2+: 0x80).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _is_whole_pickle(path: Path) -> bool:
    """The file's pickle (``data.pkl`` inside a torch zip) parses to its end: a real pickle that the
    weights-only loader refused, not corrupt bytes. ``pickletools`` only reads opcodes; nothing runs."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(name) if name else b""
        else:
            data = path.read_bytes()
        ops = list(pickletools.genops(data))
    except Exception:  # noqa: BLE001 - any failure to parse means "not a whole pickle"
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def _parse_meta(path: Path, meta: Any) -> dict[str, Any] | None:
    """The deploykit metadata as a dict, checked; None when there is none."""
    if meta is None:
        return None
    try:
        data = json.loads(meta) if isinstance(meta, (str, bytes)) else meta
    except json.JSONDecodeError as err:
        raise DeployError(f"checkpoint {path}: its {META_KEY!r} metadata is not valid JSON ({err.msg})") from err
    if not isinstance(data, dict):
        raise DeployError(f"checkpoint {path}: its {META_KEY!r} metadata is not a JSON object")
    model = data.get("model")
    if model is not None and not isinstance(model, dict):
        raise DeployError(f"checkpoint {path}: its {META_KEY!r} metadata names the model as "
                          f"{type(model).__name__}, not an object of zoo name and keywords")
    if isinstance(model, dict) and "name" in model and not isinstance(model["name"], str):
        raise DeployError(f"checkpoint {path}: model name {model['name']!r} in its metadata is not a string")
    if data.get("form", "train") not in ("train", "deploy"):
        raise DeployError(f"checkpoint {path}: form {data.get('form')!r} in its metadata is not 'train' or 'deploy'")
    return data


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state_dict, deploykit metadata or None). Raises DeployError for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"checkpoint {path} does not exist" if not path.exists() else f"{path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise DeployError(f"checkpoint {path} is empty (0 bytes)")
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = (fh.metadata() or {}).get(META_KEY)
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise DeployError(f"checkpoint {path} is corrupt or not safetensors: {one_line(err)}") from err
        return state, _parse_meta(path, meta)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head.startswith(_TORCH_MAGIC):
        raise DeployError(f"{path} is not a torch checkpoint (neither a torch.save zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; we judge ourselves
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        if "GLOBAL" in text or "Unsupported global" in text or _is_whole_pickle(path):  # refused, not broken
            raise DeployError(
                f"checkpoint {path} needs code to load (a pickled object, not plain tensors); "
                "deploykit loads checkpoints with weights_only=True and never executes code: "
                "save a state_dict or safetensors instead"
            ) from err
        # torch's weights_only errors open with generic advice; the line naming the problem comes later
        detail = next((line.strip() for line in text.splitlines() if "Unsupported operand" in line
                       or "WeightsUnpickler error:" in line and line.split("error:", 1)[1].strip()), one_line(err, 200))
        raise DeployError(f"checkpoint {path} is corrupt or not a torch file: {detail[:200]}") from err
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        meta = data.get(META_KEY)
        return data["state_dict"], _parse_meta(path, meta) if meta is not None else None
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        return data, None
    raise DeployError(f"checkpoint {path} holds no state_dict")

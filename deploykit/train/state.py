"""A run's state on disk: ``checkpoint/`` (weights + optimizer, scheduler, RNG, position) and JSON.

``checkpoint/model.safetensors`` is a normal deploykit checkpoint (build/eval take it);
``checkpoint/state.safetensors`` holds the optimizer's tensors and the RNG state, with the
rest (epoch, step, scheduler, history, recipe) as JSON metadata. Both are replaced together
in one ``atomic_dir`` rename, so they always belong to the same step.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploykit.checkpoint import META_KEY, read_checkpoint, save_checkpoint
from deploykit.errors import DeployError
from deploykit.files import atomic_dir, atomic_file

CHECKPOINT_DIR = "checkpoint"
NOT_RECIPE = {"keep_every", "eval_every", "compile"}  # config keys a resumed run may change: not the schedule
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"


def save_state(path: Path, *, model: nn.Module, spec: dict[str, Any], optimizer: torch.optim.Optimizer,
               scheduler: Any, meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
    """model.safetensors + state.safetensors into ``path/checkpoint`` as one atomic replacement.

    ``tensors``: more training state (the EMA of the weights), stored as given.
    """
    from safetensors.torch import save_file

    optim_state = optimizer.state_dict()
    tensors = {**(tensors or {}), "rng.torch": torch.get_rng_state()}
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous().clone()
    record = {**meta, "param_groups": optim_state["param_groups"], "scheduler": scheduler.state_dict()}
    with atomic_dir(path / CHECKPOINT_DIR, force=True) as tmp:
        save_checkpoint(model, tmp / MODEL_FILE, spec=spec, form="train",
                        extra={"epoch": meta["epoch"], "step": meta["step"]})
        save_file(tensors, str(tmp / STATE_FILE), metadata={META_KEY: json.dumps(record)})


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state_dict, training tensors, training metadata) of ``path/checkpoint``."""
    from safetensors import safe_open

    folder = path / CHECKPOINT_DIR
    if not (folder / STATE_FILE).is_file():
        raise DeployError(f"nothing to resume in {path}: no {CHECKPOINT_DIR}/{STATE_FILE}; start without --resume")
    model_state, _ = read_checkpoint(folder / MODEL_FILE)
    try:
        with safe_open(str(folder / STATE_FILE), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})[META_KEY])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # a corrupt header raises safetensors' own types
        raise DeployError(f"{folder / STATE_FILE} is unreadable ({err}); start the run again without --resume") from err
    return model_state, tensors, meta


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def check_same_run(saved: dict[str, Any], config: Any, spec: dict[str, Any], out: Path) -> None:
    """A resumed run must train the same model with the same recipe (``config``: a TrainConfig)."""
    if saved["spec"] != spec:
        raise DeployError(f"{out} trains {saved['spec']}, not {spec}; resume with the same model")
    import dataclasses

    # A key the saved run predates had its default then (runs from before the fast-path switches).
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    changed = [k for k, v in config.to_dict().items()
               if k not in NOT_RECIPE and saved["config"].get(k, defaults.get(k)) != v]
    if changed:
        was = ", ".join(f"{k}={saved['config'].get(k)}" for k in changed)
        raise DeployError(
            f"{out} was started with {was}; resume with the same settings (they set the schedule and data order)"
        )

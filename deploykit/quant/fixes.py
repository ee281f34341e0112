"""Named INT8 fixes a user picks without an accuracy budget (``deploykit build --int8-fix NAME``).

``--max-drop`` searches for the cheapest recipe within a budget; a named fix applies a fixed
recipe, the one the diagnosis of re-parameterized models points to (``deploykit analyze``):

- ``zero-dead``: zero the weights on input channels that are always 0 on the calibration set
  (exact on it: ``deploykit.quant.dead_channels``);
- ``repvgg``: zero-dead, then per-channel weights (where the backend has the switch),
  cross-layer equalization of conv -> ReLU -> conv pairs and bias correction (the backend's
  own where it has one, else deploykit's in PyTorch).

The rewrites return a new model; the backend switches come back as options.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from deploykit.errors import DeployError

logger = logging.getLogger(__name__)

INT8_FIXES = {
    "zero-dead": "zero the weights on always-zero input channels (exact on the calibration set)",
    "repvgg": "zero-dead + per-channel weights + cross-layer equalization + bias correction",
}


@dataclass
class AppliedFix:
    name: str
    model: Any  # the rewritten fused model
    options: dict[str, Any]  # backend options the fix turns on
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": INT8_FIXES[self.name], "options": self.options, "steps": self.steps}


def apply_int8_fix(name: str, model: Any, calibration: Any, *, backend: str) -> AppliedFix:
    """Apply the named fix to the fused ``model`` with ``calibration`` (a CalibrationSet) for ``backend``."""
    import numpy as np
    import torch

    from deploykit.quant.dead_channels import zero_dead_weights
    from deploykit.backends.base import get_backend

    if name not in INT8_FIXES:
        raise DeployError(f"unknown int8 fix {name!r}; choose from {', '.join(INT8_FIXES)}")
    inputs = calibration.inputs
    zeroed = zero_dead_weights(model, inputs, held_out=getattr(calibration, "held_out", None))
    model, options = zeroed.model, {}
    steps = [{"step": "zero_dead", **zeroed.to_dict()}]
    if name == "repvgg":
        from deploykit.quant.equalize import correct_bias, equalize

        knobs = get_backend(backend).max_drop_knobs
        per_channel = knobs is None or knobs.per_channel is None
        if knobs is not None and knobs.per_channel is not None:
            option, value = knobs.per_channel
            options[option], per_channel = value, True
        steps.append({"step": "per_channel", "options": dict(options),
                      "note": None if knobs is not None else f"{backend}: its own weight scheme is kept"})
        example = torch.from_numpy(np.ascontiguousarray(inputs[:8], dtype=np.float32))
        model, facts = equalize(model, example=example)
        steps.append({"step": "equalize", **facts})
        if knobs is not None and knobs.bias_correction is not None:
            option, value = knobs.bias_correction
            options[option] = value
            steps.append({"step": "bias_correction", "options": {option: value}})
        else:
            model, facts = correct_bias(model, inputs, per_channel=per_channel)
            steps.append({"step": "bias_correction", "pytorch": facts})
    logger.info("int8 fix %s: %s", name, INT8_FIXES[name])
    return AppliedFix(name, model, options, steps)

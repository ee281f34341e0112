"""Input channels that are always zero, and the weights that multiply them.

After a ReLU some channels never fire on real data (RepVGG: channels whose identity-branch
BN sees ~zero variance; QARepVGG's paper, Sec. 3). Whatever weight multiplies such a channel
contributes nothing in FP32, yet it sets the int8 scale of its output channel (per channel)
or of the whole tensor (per tensor): in a fused RepVGG those are the huge |gamma|/sigma
centre taps. ``zero_dead_weights`` sets them to zero. On every input where the channels are
zero (the whole calibration set, by construction) the model is unchanged; the result carries
the measured max error on the calibration set (must be within the fuser's tolerance) and on
held-out inputs (where a channel dead on calibration could fire: reported, not assumed).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deploykit.errors import FusionError
from deploykit.quant.fakequant import as_batches, observe_inputs, quantizable_layers

logger = logging.getLogger(__name__)

__all__ = ["ZeroDeadResult", "dead_inputs", "input_weights", "zero_dead_weights"]


@torch.no_grad()
def dead_inputs(model: nn.Module, inputs: Any, *, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per Conv2d/Linear: a bool mask of its input channels that are exactly 0 on every sample of ``inputs``."""
    layers = quantizable_layers(model)
    alive: dict[str, torch.Tensor] = {}

    def observe(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            axis = 1 if isinstance(module, nn.Conv2d) else x.dim() - 1
            fired = (x != 0).any(dim=[d for d in range(x.dim()) if d != axis])
            alive[name] = alive[name] | fired if name in alive else fired

        return hook

    observe_inputs(model, layers, observe, inputs, batch_size)
    return {name: ~mask for name, mask in alive.items()}


def input_weights(module: nn.Module, channels: torch.Tensor) -> torch.Tensor:
    """A bool mask over ``module.weight``: the weights that multiply the input ``channels`` (a bool mask)."""
    weight = module.weight
    mask = torch.zeros_like(weight, dtype=torch.bool)
    if isinstance(module, nn.Linear):
        mask[:, channels] = True
        return mask
    groups = module.groups
    per_group_in, per_group_out = weight.shape[1], weight.shape[0] // groups
    for c in torch.nonzero(channels).flatten().tolist():
        group = c // per_group_in
        mask[group * per_group_out : (group + 1) * per_group_out, c % per_group_in] = True
    return mask


@dataclass
class ZeroDeadResult:
    model: nn.Module
    layers: dict[str, int]  # layer -> dead input channels whose weights were zeroed
    weights_zeroed: int  # non-zero weights set to zero
    calibration_error: dict[str, float]  # max abs / max rel error of the logits on the calibration set
    held_out_error: dict[str, float] | None = None
    tolerance_rel: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "weights_zeroed": self.weights_zeroed,
                "calibration_error": self.calibration_error, "held_out_error": self.held_out_error,
                "tolerance_rel": self.tolerance_rel, "notes": self.notes}


@torch.no_grad()
def _outputs(model: nn.Module, inputs: Any, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(batch) for batch in as_batches(inputs, batch_size)])


@torch.no_grad()
def zero_dead_weights(
    model: nn.Module, calibration: Any, *, held_out: Any = None, batch_size: int = 64,
    tolerance_rel: float | None = None,
) -> ZeroDeadResult:
    """A copy of ``model`` with every weight on an input channel that is 0 on all of ``calibration`` set to 0.

    Raises FusionError when the copy's outputs on ``calibration`` differ by more than the
    fuser's tolerance (it would mean the channels were not dead after all: a bug).
    """
    from deploykit.fuse import DEFAULT_TOLERANCE_REL
    from deploykit.fuse.certificate import ErrorFigures

    tolerance = DEFAULT_TOLERANCE_REL if tolerance_rel is None else tolerance_rel
    result = copy.deepcopy(model).eval()
    dead = dead_inputs(result, calibration, batch_size=batch_size)
    layers, zeroed = {}, 0
    for name, module in quantizable_layers(result).items():
        if name not in dead or not dead[name].any():
            continue
        mask = input_weights(module, dead[name])
        zeroed += int((module.weight[mask] != 0).sum())
        module.weight[mask] = 0.0
        layers[name] = int(dead[name].sum())
    reference = _outputs(model, calibration, batch_size)
    errors = ErrorFigures.between(reference, _outputs(result, calibration, batch_size))
    if errors.max_rel_error > tolerance:
        raise FusionError(f"zeroing the weights of dead input channels changed the outputs on the calibration set "
                          f"(relative error {errors.max_rel_error:.2e} > {tolerance:.0e})")
    held = None
    notes = []
    if held_out is not None and len(held_out):
        figures = ErrorFigures.between(_outputs(model, held_out, batch_size), _outputs(result, held_out, batch_size))
        held = {"max_abs_error": figures.max_abs_error, "max_rel_error": figures.max_rel_error}
        if figures.max_rel_error > tolerance:
            notes.append(f"on held-out inputs a channel dead on the calibration set fired: relative error "
                         f"{figures.max_rel_error:.2e}")
    if not layers:
        notes.append("no input channel is always zero on the calibration set: nothing to zero")
    logger.info("zeroed %d weights on dead input channels of %d layers (calibration rel error %.1e)",
                zeroed, len(layers), errors.max_rel_error)
    return ZeroDeadResult(result, layers, zeroed,
                          {"max_abs_error": errors.max_abs_error, "max_rel_error": errors.max_rel_error},
                          held, tolerance, notes)

"""Function-preserving rewrites that make a fused model easier to quantize (Nagel et al.,
"Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019):

- cross-layer equalization (CLE): for conv1 -> ReLU -> conv2, ReLU(x / s) = ReLU(x) / s for
  s > 0, so output channel i of conv1 can be divided by s_i and input channel i of conv2
  multiplied by it without changing the function. s_i = sqrt(r1_i / r2_i) (r = per-channel
  absmax) gives both the same range sqrt(r1_i r2_i): no channel wastes the int8 grid of its
  tensor, and conv1's output (conv2's input activation) is rebalanced the same way.
- bias correction: int8 rounding of a weight shifts the expected output by (W_q - W) E[x];
  measured on calibration data and subtracted from the bias (the empirical variant).

Both work on any torch.fx-traceable model and return a corrected copy; ``equalize`` checks
that the function is unchanged.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from deploykit.errors import DeployError, FusionError
from deploykit.quant.fakequant import fake_quant_weight, observe_inputs, quantizable_layers

logger = logging.getLogger(__name__)

CLE_ITERATIONS = 20  # pairs in a chain share layers; a few sweeps converge (DFQ uses ~ the same)
CLE_TOLERANCE_REL = 1e-4


def _graph(model: nn.Module) -> Any:
    from torch import fx

    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types for untraceable Python
        raise DeployError(
            f"cannot trace {type(model).__name__} with torch.fx to find conv -> ReLU -> conv pairs: {err}"
        ) from err


def _is_relu(gm: Any, node: Any) -> bool:
    import torch.nn.functional as F

    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    return node.op in ("call_function", "call_method") and node.target in (torch.relu, F.relu, "relu")


def conv_relu_conv_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(first, second) module names of every conv whose only use is a ReLU whose only use is a conv."""
    gm = _graph(model)
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Conv2d):
            continue
        users = list(node.users)
        if len(users) != 1 or not _is_relu(gm, users[0]):
            continue
        after = list(users[0].users)
        if len(after) != 1 or after[0].op != "call_module":
            continue
        second = gm.get_submodule(after[0].target)
        first = gm.get_submodule(node.target)
        plain = first.groups == 1 and getattr(second, "groups", 0) == 1
        if isinstance(second, nn.Conv2d) and plain and second.in_channels == first.out_channels:
            pairs.append((node.target, after[0].target))
    return pairs


@torch.no_grad()
def equalize(
    model: nn.Module, *, example: torch.Tensor | None = None, iterations: int = CLE_ITERATIONS
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` with every conv -> ReLU -> conv pair equalized; (model, facts)."""
    result = copy.deepcopy(model).eval()
    pairs = conv_relu_conv_pairs(result)
    if not pairs:
        return result, {"pairs": 0, "max_range_ratio_before": None, "max_range_ratio_after": None}

    def imbalance() -> float:
        worst = 1.0
        for first, _ in pairs:
            r = result.get_submodule(first).weight.abs().reshape(result.get_submodule(first).out_channels, -1).amax(1)
            worst = max(worst, float(r.max() / r.clamp_min(1e-12).min()))
        return worst

    before = imbalance()
    for _ in range(iterations):
        for first_name, second_name in pairs:
            first, second = result.get_submodule(first_name), result.get_submodule(second_name)
            w1, w2 = first.weight.double(), second.weight.double()
            r1 = w1.abs().reshape(w1.shape[0], -1).amax(1)
            r2 = w2.abs().transpose(0, 1).reshape(w2.shape[1], -1).amax(1)
            alive = (r1 > 0) & (r2 > 0)
            scale = torch.where(alive, (r1 / r2.clamp_min(1e-300)).sqrt(), torch.ones_like(r1))
            first.weight.copy_((w1 / scale.view(-1, 1, 1, 1)).to(first.weight.dtype))
            if first.bias is not None:
                first.bias.copy_((first.bias.double() / scale).to(first.bias.dtype))
            second.weight.copy_((w2 * scale.view(1, -1, 1, 1)).to(second.weight.dtype))
    after = imbalance()
    if example is not None:
        ref, got = model.eval()(example), result(example)
        error = float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-12))
        if error > CLE_TOLERANCE_REL:
            raise FusionError(f"cross-layer equalization changed the model's outputs (relative error {error:.2e})")
    logger.info("equalized %d conv pairs: worst channel range ratio %.1f -> %.1f", len(pairs), before, after)
    return result, {"pairs": len(pairs), "max_range_ratio_before": before, "max_range_ratio_after": after}


@torch.no_grad()
def correct_bias(
    model: nn.Module, calibration: Any, *, per_channel: bool, batch_size: int = 64
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` whose biases absorb the mean output shift of int8 weight rounding."""
    result = copy.deepcopy(model).eval()
    layers = {name: m for name, m in quantizable_layers(result).items() if m.bias is not None}
    deltas = {name: fake_quant_weight(m.weight, per_channel) - m.weight for name, m in layers.items()}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if isinstance(module, nn.Conv2d):
                shift = module._conv_forward(x, deltas[name], None)
                dims = (0, 2, 3)
            else:
                shift = nn.functional.linear(x, deltas[name])
                dims = tuple(range(shift.dim() - 1))
            sums[name] = sums.get(name, 0) + shift.double().sum(dims)
            channels = shift.shape[1] if isinstance(module, nn.Conv2d) else shift.shape[-1]
            counts[name] = counts.get(name, 0) + shift.numel() // channels

        return hook

    observe_inputs(result, layers, observe, calibration, batch_size)
    largest = 0.0
    for name, module in layers.items():
        shift = (sums[name] / counts[name]).to(module.bias.dtype)
        module.bias.sub_(shift)
        largest = max(largest, float(shift.abs().max()))
    logger.info("bias correction on %d layers (largest shift %.3g)", len(layers), largest)
    return result, {"layers": len(layers), "largest_shift": largest, "per_channel": per_channel}

"""Parameter and MAC counts of zoo models, the way the papers count them.

MACs are multiply-accumulates of convolutions, linear layers and matrix products (what most
CNN papers call "FLOPs"); normalisation, activations, pooling and element-wise ops are not
counted. ``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per MAC for exactly
those ops, so MACs = FLOPs / 2.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["count_macs", "count_params", "model_summary"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics are not parameters)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, batch: int = 1) -> int:
    """MACs of one forward pass on a (batch, 3, input_size, input_size) input.

    Runs on the model's device; a model built on the ``meta`` device is counted without
    computing anything, which is how ``model_summary`` counts large models quickly.
    """
    from torch.utils.flop_counter import FlopCounterMode

    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    x = torch.zeros(batch, 3, input_size, input_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def model_summary(name: str, input_size: int | None = None, **kw: Any) -> dict[str, Any]:
    """Train-form params and MACs of zoo model ``name`` next to the paper's figures.

    ``input_size`` defaults to the model's ``default_input_size``. The deploy-form keys are
    left as None here; ``deploykit.fuse`` fills them from the re-parameterized model.
    """
    from deploykit.models.registry import create_model, get_entry

    entry = get_entry(name)
    with torch.device("meta"):
        model = create_model(name, **kw)
    size = input_size or model.default_input_size
    return {
        "name": name,
        "family": entry.family,
        "input_size": size,
        "params": count_params(model),
        "macs": count_macs(model, size),
        "deploy_params": None,
        "deploy_macs": None,
        "paper": entry.paper,
        "paper_params": entry.paper_params,
        "paper_macs": entry.paper_macs,
    }

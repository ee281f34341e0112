"""Describe a zoo model: params and MACs of its train and deploy forms next to the paper's."""
from __future__ import annotations

from typing import Any


def deploy_form(model: Any, input_size: int) -> Any:
    """The re-parameterized model (structure only; ``deploykit fuse`` certifies it).

    Kernel algebra does not depend on the input size, so the graph is traced on a small
    input; callers count MACs at the real size.
    """
    from deploykit.fuse import reparameterize

    size = min(input_size, 64)
    return reparameterize(model, input_shape=(1, 3, size, size), check=False).model


def describe(name: str, *, num_classes: int = 1000, cifar: bool = False, input_size: int | None = None) -> dict[str, Any]:
    from deploykit.models.profile import count_macs, count_params
    from deploykit.models.registry import create_model, get_entry

    entry = get_entry(name)
    import torch

    # Only shapes matter here: skip weight initialization (slow for 80M-parameter models).
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, cifar=cifar).eval()
    model = model.to_empty(device="cpu")
    for buf_name, buf in model.named_buffers():
        buf.fill_(1.0 if buf_name.endswith("running_var") else 0.0)
    size = input_size or int(model.default_input_size)
    fused = deploy_form(model, size)
    blocks = sum(1 for n, _ in fused.named_modules() if n.split(".")[-1].startswith("fused"))
    # Counting on the meta device computes nothing: fast even for 18 GMAC models.
    model, fused = model.to("meta"), fused.to("meta")
    return {
        "name": name,
        "family": entry.family,
        "paper": entry.paper,
        "input_size": size,
        "train_params": count_params(model),
        "train_macs": count_macs(model, size),
        "deploy_params": count_params(fused),
        "deploy_macs": count_macs(fused, size),
        "fused_blocks": blocks,
        "deploy_note": "deploykit.fuse on the fx graph" if blocks else "nothing to fuse",
        # Paper figures are at 224x224 with 1000 classes.
        "paper_params": entry.paper_params if (num_classes == 1000 and not cifar) else None,
        "paper_macs": entry.paper_macs if (num_classes == 1000 and not cifar and size == 224) else None,
    }

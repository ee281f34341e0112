"""A tiny RepVGG (the zoo's class, 1 block per stage, width 0.25) for fast CPU-target tests.

Random convolution features with a least-squares linear classifier fitted on CIFAR-10 train
images: no training loop, a few seconds, and logits with real class structure (top-1 well
above chance), so INT8 agreement and ``deploykit eval`` figures mean something. Without the
dataset the classifier stays random.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

FACTORY_SOURCE = '''\
"""Tiny CIFAR RepVGG for deploykit's tests; weights in tiny.pt beside this file."""
from pathlib import Path

import torch

from deploykit.models.repvgg import RepVGG


def tiny():
    model = RepVGG((1, 1, 1, 1), (0.25, 0.25), num_classes=10, cifar=True)
    model.load_state_dict(torch.load(Path(__file__).with_name("tiny.pt"), weights_only=True))
    return model
'''

PROBE_SAMPLES = 512
RIDGE = 1e-2


def _fit_probe(model, images: np.ndarray, labels: np.ndarray) -> None:
    """Set ``model.linear`` to the ridge-regression fit of one-hot labels on pooled features."""
    import torch

    from deploykit.quant.fakequant import observe_inputs

    features = []
    observe_inputs(model, {"linear": model.linear}, lambda name: lambda mod, args: features.append(args[0]),
                   images, 256)
    f = torch.cat(features).double()
    mean = f.mean(0)
    f = f - mean
    target = torch.nn.functional.one_hot(torch.from_numpy(labels), 10).double()
    target = target - target.mean(0)
    w = torch.linalg.solve(f.T @ f + RIDGE * len(f) * torch.eye(f.shape[1], dtype=f.dtype), f.T @ target)
    with torch.no_grad():
        model.linear.weight.copy_(w.T.float())
        model.linear.bias.copy_((-mean @ w).float())


def write_tiny_model(folder: Path, cifar_tgz: Path | None) -> str:
    """Write tiny.py + tiny.pt into ``folder``; return the MODEL spec ``folder/tiny.py:tiny``."""
    import torch

    from deploykit.models.repvgg import RepVGG

    folder.mkdir(parents=True, exist_ok=True)
    spec = f"{folder / 'tiny.py'}:tiny"
    if (folder / "tiny.pt").is_file():
        return spec
    torch.manual_seed(0)
    model = RepVGG((1, 1, 1, 1), (0.25, 0.25), num_classes=10, cifar=True).eval()
    if cifar_tgz is not None and cifar_tgz.is_file():
        from deploykit.calib import load_calibration

        data = load_calibration(str(cifar_tgz), input_size=32, num_samples=PROBE_SAMPLES, num_verify=1, seed=99)
        _fit_probe(model, data.inputs, data.labels)
    (folder / "tiny.py").write_text(FACTORY_SOURCE)
    torch.save(model.state_dict(), folder / "tiny.pt")
    return spec

"""Tiny fused-style CNNs with one planted quantization problem each, for analyze and max-drop tests.

conv1 -> ReLU -> conv2 -> ReLU -> global pool -> linear, 8x8 inputs. Each variant computes
(nearly) the same kind of function as the clean one but has one outlier that INT8 handles
badly, and a known cure:

- ``weight``: output channel 0 of conv1 has 100x weights and a huge negative bias, so it is
  always cut by the ReLU: only conv1's *weights* have an outlier. Cure: per-channel scales.
- ``activation``: conv1's channel 0 scaled up 100x and conv2's input channel 0 down 100x (the
  same function): conv2's *input* has an outlier channel. Cure: cross-layer equalization.
- ``input``: the data's channel 0 is 100x larger, conv1's weights for it 100x smaller: the
  first layer's input cannot share one scale. Cure: keep conv1 in float.

Labels are the float model's own predictions (FP32 top-1 = 100%) on the half of the samples
it is most sure about, spread over 4 classes.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

SIZE = 8
OUTLIER = 100.0


class TwoConv(nn.Module):
    default_input_size = SIZE

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.linear(torch.flatten(self.gap(x), 1))


@torch.no_grad()
def outlier_model(kind: str, seed: int = 0, count: int = 768) -> tuple[TwoConv, np.ndarray, np.ndarray]:
    """(model in eval mode, inputs (count, 3, 8, 8), labels) with the ``kind`` outlier planted."""
    torch.manual_seed(seed)
    model = TwoConv().eval()
    inputs = np.random.default_rng(seed).standard_normal((2 * count, 3, SIZE, SIZE)).astype(np.float32)
    if kind == "weight":
        model.conv1.weight[0] *= OUTLIER
        model.conv1.bias[0] = -1e4  # always negative: ReLU removes the channel, activations stay clean
    elif kind == "activation":
        model.conv1.weight[0] *= OUTLIER
        model.conv1.bias[0] *= OUTLIER
        model.conv2.weight[:, 0] /= OUTLIER
    elif kind == "input":
        inputs[:, 0] *= OUTLIER
        model.conv1.weight[:, 0] /= OUTLIER
    elif kind != "clean":
        raise ValueError(kind)
    x = torch.from_numpy(inputs)
    model.linear.bias -= model(x).mean(0)  # centre the logits: every class gets predicted
    logits = model(x)
    # Keep the samples the float model is sure about (top-2 margin in the upper half): near-ties
    # flip under any rounding and would blur what the tests measure.
    top2 = logits.topk(2, dim=1).values
    confident = (top2[:, 0] - top2[:, 1]).argsort(descending=True)[:count].sort().values
    return model, inputs[confident.numpy()], logits.argmax(1)[confident].numpy()

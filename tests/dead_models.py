"""A tiny train-form RepVGG-style model with known dead channels, for analyze and the zero-dead fix.

stem conv -> ReLU -> block (3x3 conv+BN + 1x1 conv+BN + identity BN) -> ReLU -> pool -> linear,
8x8 inputs. Stem channels ``DEAD`` have zero weights and bias -1: after the ReLU they are 0 on
every input. The identity BN has running variance 0 and gamma ``GAMMA`` on them, so its
|gamma|/sigma is GAMMA / sqrt(eps) (632 with the default eps): fused, the block's kernel gets
that weight at the centre tap of (c, c) for c in DEAD, multiplying an input that is always 0
(what the QARepVGG paper found in trained RepVGGs).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

SIZE = 8
CHANNELS = 8
DEAD = (1, 5)
GAMMA = 2.0
EPS = 1e-5
RATIO = GAMMA / math.sqrt(EPS)


def _conv_bn(k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, k, 1, k // 2, bias=False), nn.BatchNorm2d(CHANNELS))


class DeadStemRep(nn.Module):
    default_input_size = SIZE

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, CHANNELS, 3, padding=1)
        self.stem_relu = nn.ReLU()
        self.dense, self.one = _conv_bn(3), _conv_bn(1)
        self.identity = nn.BatchNorm2d(CHANNELS, eps=EPS)
        self.relu = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(CHANNELS, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem(x))
        x = self.relu(self.dense(x) + self.one(x) + self.identity(x))
        return self.linear(torch.flatten(self.gap(x), 1))


@torch.no_grad()
def dead_model(seed: int = 0, count: int = 512) -> tuple[DeadStemRep, np.ndarray, np.ndarray]:
    """(train-form model in eval mode, inputs (count, 3, 8, 8), labels: the model's own confident predictions)."""
    from deploykit.fuse import _randomize_bn

    torch.manual_seed(seed)
    model = DeadStemRep().eval()
    _randomize_bn(model, seed)
    for c in DEAD:
        model.stem.weight[c] = 0.0
        model.stem.bias[c] = -1.0
        model.identity.running_var[c] = 0.0
        model.identity.running_mean[c] = 0.0
        model.identity.weight[c] = GAMMA
    inputs = np.random.default_rng(seed).standard_normal((2 * count, 3, SIZE, SIZE)).astype(np.float32)
    x = torch.from_numpy(inputs)
    model.linear.bias -= model(x).mean(0)
    logits = model(x)
    top2 = logits.topk(2, dim=1).values
    confident = (top2[:, 0] - top2[:, 1]).argsort(descending=True)[:count].sort().values
    return model, inputs[confident.numpy()], logits.argmax(1)[confident].numpy()


def make() -> DeadStemRep:
    """For ``deploykit build tests/dead_models.py:make`` style factories."""
    return dead_model()[0]

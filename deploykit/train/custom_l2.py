"""The official RepVGG recipe's custom L2 (Ding et al., CVPR 2021; the authors' ``get_custom_L2``).

Plain weight decay on the 3x3 and 1x1 kernels of a RepVGG block penalizes each branch, not
the kernel the block deploys as. The custom L2 instead decays the equivalent kernel: the
eight outer 3x3 taps as usual, and the centre tap as the centre of the merged kernel,

    eq = K3[:, :, 1, 1] * t3 + K1 * t1        t = gamma / sqrt(running_var + eps), detached
    L2 = sum(outer taps ** 2) + sum(eq ** 2 / (t3 ** 2 + t1 ** 2))

(the denominator keeps the coefficient comparable to plain L2). Training adds
``weight_decay / 2 * L2`` to the loss and drops the plain decay on those two kernels; the
identity BN is not involved. QARepVGG's paper names this term as one cause of RepVGG's
INT8 collapse, hence the switch (``deploykit train --custom-l2``).
"""
from __future__ import annotations

import torch
from torch import nn

from deploykit.errors import DeployError

__all__ = ["CustomL2", "repvgg_blocks"]


def repvgg_blocks(model: nn.Module) -> list[nn.Module]:
    """RepVGG blocks: a 3x3 conv+BN branch ``rbr_dense`` and a 1x1 conv+BN branch ``rbr_1x1``."""
    from deploykit.models.repvgg import RepVGGBlock

    return [m for m in model.modules() if isinstance(m, RepVGGBlock)]


class CustomL2:
    """The penalty over every RepVGG block of ``model`` and the kernels it replaces plain decay on."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = repvgg_blocks(model)
        if not self.blocks:
            raise DeployError(
                f"--custom-l2 is the RepVGG recipe's decay on the equivalent kernel; {type(model).__name__} has no "
                "RepVGG block (3x3 conv+BN and 1x1 conv+BN branches): train it without --custom-l2"
            )

    def kernels(self) -> set[int]:
        """ids of the weights the penalty covers (the optimizer must not decay them again)."""
        return {id(p) for b in self.blocks for p in (b.rbr_dense.conv.weight, b.rbr_1x1.conv.weight)}

    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.blocks[0].rbr_dense.conv.weight.device)
        for block in self.blocks:
            k3, k1 = block.rbr_dense.conv.weight, block.rbr_1x1.conv.weight
            t3, t1 = (_bn_scale(branch.bn) for branch in (block.rbr_dense, block.rbr_1x1))
            centre = k3[:, :, 1:2, 1:2]
            outer = (k3**2).sum() - (centre**2).sum()
            equivalent = centre * t3 + k1 * t1
            total = total + outer + (equivalent**2 / (t3**2 + t1**2)).sum()
        return total


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    return (bn.weight / (bn.running_var + bn.eps).sqrt()).reshape(-1, 1, 1, 1).detach()

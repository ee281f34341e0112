"""QARepVGG: the block of Chu et al. (AAAI 2024) and the fuser's BN-after-a-sum fold."""
from __future__ import annotations

import torch
from torch import nn

from deploykit.fuse import _randomize_bn, reparameterize
from deploykit.models import create_model


class SumThenBN(nn.Module):
    """Written here, not from the zoo: conv3x3+BN ∥ bare conv1x1 ∥ identity, summed, then one BN."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels))
        self.k1 = nn.Conv2d(channels, channels, 1, bias=True)
        self.post = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.post(x + self.k3(x) + self.k1(x)))


def test_bn_after_a_sum_of_branches_folds_into_the_merged_kernel() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), SumThenBN(8), SumThenBN(8))
    _randomize_bn(model, seed=3)
    result = reparameterize(model.eval(), input_shape=(2, 3, 16, 16))
    assert result.certificate.passed, result.certificate.failures()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(c.kernel_size == (3, 3) for c in convs)
    folded = [b for b in result.certificate.blocks if any(s.endswith("post") for s in b.sources)]
    assert len(folded) == 2 and all("identity" in b.sources for b in folded)


def test_qarepvgg_block_has_bn_only_on_the_3x3_branch_and_after_the_sum() -> None:
    model = create_model("qarepvgg_a0", num_classes=10, cifar=True, width=0.25)
    block = model.stage2[1]
    assert isinstance(block.rbr_1x1, nn.Conv2d) and isinstance(block.rbr_dense[1], nn.BatchNorm2d)
    assert isinstance(block.bn, nn.BatchNorm2d) and block.has_identity
    assert not model.stage2[0].has_identity  # stride 2: no identity branch


def test_qarepvgg_deploy_form_is_repvgg_deploy_form() -> None:
    """Same plain VGG after fusion: layer for layer the same conv shapes as RepVGG's."""
    torch.manual_seed(0)

    def shapes(name: str) -> list[tuple[int, ...]]:
        model = create_model(name, num_classes=10, cifar=True, width=0.25).eval()
        fused = reparameterize(model, input_shape=(1, 3, 16, 16), check=False).model
        return [tuple(m.weight.shape) for m in fused.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    assert shapes("qarepvgg_a0") == shapes("repvgg_a0")

"""The generic re-parameterizer, on models defined only here (not from the zoo)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deploykit.errors import DeployError, FusionError
from deploykit.fuse import _randomize_bn, reparameterize


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class LocalRepBlock(nn.Module):
    """A RepVGG-style block written independently of the zoo: 3x3 ∥ 1x1 ∥ identity BN."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.k3 = ConvBN(cin, cout, 3, stride, groups)
        self.k1 = ConvBN(cin, cout, 1, stride, groups)
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.k3(x) + self.k1(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return self.act(y)


class LocalRepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            LocalRepBlock(3, 16, 2),
            LocalRepBlock(16, 16, 1),
            LocalRepBlock(16, 32, 2, groups=2),
            LocalRepBlock(32, 32, 1, groups=4),
            LocalRepBlock(32, 32, 1),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


class ResidualWithReLU(nn.Module):
    """ResNet-style: a non-linearity inside the residual branch cannot be merged."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc, self.bn1d = nn.Linear(8, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + x)
        y = self.scale * self.c3(y) + y  # scaled conv branch + identity: mergeable
        return self.bn1d(self.fc(y.mean((2, 3))))


def _randomized(model: nn.Module, seed: int = 1) -> nn.Module:
    _randomize_bn(model, seed)
    return model.eval()


def test_repvgg_style_model_defined_in_tests_fuses_to_single_convs() -> None:
    model = _randomized(LocalRepNet())
    result = reparameterize(model, input_shape=(2, 3, 32, 32))
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5, "each block must become one conv"
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [c.groups for c in convs] == [1, 1, 2, 4, 1]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    kinds = [b.kind for b in result.certificate.blocks]
    assert kinds.count("2 conv + 1 identity/BN branches") == 3
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, got = model(x), result.model(x)
    assert torch.allclose(ref, got, rtol=1e-4, atol=1e-5)
    assert result.certificate.passed and result.certificate.max_rel_error < 1e-5


def test_certificate_has_per_block_and_end_to_end_figures_with_caller_inputs() -> None:
    model = _randomized(LocalRepNet())
    given = torch.randn(4, 3, 32, 32)
    cert = reparameterize(model, input_shape=(2, 3, 32, 32), example_inputs=given).certificate
    data = cert.to_dict()
    assert {c["inputs"] for c in data["end_to_end"]} == {"random (randomized BN statistics)", "random", "caller inputs"}
    assert len(data["blocks"]) == 5
    for block in data["blocks"]:
        assert block["random_bn"]["max_rel_error"] < 1e-5
        assert block["given"]["max_abs_error"] >= 0
    assert data["params_after"] < data["params_before"]


def test_residual_with_nonlinearity_is_left_alone_and_reported() -> None:
    model = _randomized(ResidualWithReLU())
    result = reparameterize(model, input_shape=(2, 8, 16, 16))
    cert = result.certificate
    assert len(cert.unfused) == 1 and "non-linear" in cert.unfused[0]["reason"]
    kinds = sorted(b.kind for b in cert.blocks)
    assert kinds == ["1 conv + 1 identity/BN branches", "conv+bn", "conv+bn", "conv+bn"]  # incl. Linear+BN1d
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.model.modules())
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), result.model(x), rtol=1e-4, atol=1e-5)


def test_original_model_is_untouched() -> None:
    model = _randomized(LocalRepNet())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reparameterize(model, input_shape=(1, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fusion_over_tolerance_is_an_error_not_a_silent_result() -> None:
    with pytest.raises(FusionError, match="not equivalent"):
        reparameterize(_randomized(LocalRepNet()), input_shape=(2, 3, 32, 32), tolerance_rel=1e-12)


def test_wrong_fold_is_caught_by_the_certificate(monkeypatch: pytest.MonkeyPatch) -> None:
    from deploykit.fuse import kernels

    real = kernels.bn_scale_shift

    def off_by_eps(bn):  # a subtly wrong fold: forgets eps
        scale, shift = real(bn)
        return scale * 1.01, shift

    monkeypatch.setattr(kernels, "bn_scale_shift", off_by_eps)
    with pytest.raises(FusionError):
        reparameterize(_randomized(LocalRepNet()), input_shape=(2, 3, 32, 32))


def test_untraceable_model_gives_a_clear_error() -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(DeployError, match="cannot trace"):
        reparameterize(DataDependent(), input_shape=(1, 3, 8, 8))

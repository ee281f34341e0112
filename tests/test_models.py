"""The model zoo, generically: every registered model builds, runs, traces and matches its paper."""
from __future__ import annotations

import re
from decimal import Decimal

import pytest
import torch
from torch import nn

from deploykit.errors import DeployError
from deploykit.models import create_model, get_entry, list_models
from deploykit.models.profile import count_macs, count_params, model_summary

MODELS = list_models()
WITH_PAPER_FIGURES = [n for n in MODELS if get_entry(n).paper_params or get_entry(n).paper_macs]
# ImageNet-size forward passes only for models up to this many train-form parameters.
IMAGENET_FORWARD_MAX_PARAMS = 15e6


def test_zoo_has_every_family() -> None:
    families = {get_entry(n).family for n in MODELS}
    assert families == {"repvgg", "qarepvgg", "repopt", "convnext", "ghostnet", "g_ghost"}


@pytest.mark.parametrize("name", MODELS)
def test_cifar_forward_and_fx_trace(name: str) -> None:
    """CIFAR form: (2, 3, 32, 32) -> (2, 10); torch.fx traces it and the trace computes the same."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, cifar=True).eval()
    assert model.default_input_size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()

    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), y, rtol=0, atol=0)


def _small_models() -> list[str]:
    with torch.device("meta"):  # counting on the meta device allocates and computes nothing
        return [n for n in MODELS if count_params(create_model(n)) <= IMAGENET_FORWARD_MAX_PARAMS]


@pytest.mark.parametrize("name", _small_models())
def test_imagenet_forward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    assert model.default_input_size == 224
    with torch.no_grad():
        y = model(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 1000)
    assert torch.isfinite(y).all()


def _repvgg_deploy_form(model: nn.Module) -> nn.Module:
    """Each RepVGG block replaced by the one 3x3 conv (with bias) that re-parameterization yields."""
    from deploykit.models.repvgg import RepVGGBlock

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, RepVGGBlock):
                conv = child.rbr_dense.conv
                plain = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, groups=conv.groups, bias=True)
                setattr(parent, child_name, nn.Sequential(plain, nn.ReLU()))
    return model


# Families whose paper figures describe the deploy form; the rest are counted as built.
# (Once deploykit.fuse exists, its reparameterize() can replace this local helper.)
DEPLOY_FORMS = {"repvgg": _repvgg_deploy_form}


def _tolerance(figure: float) -> float:
    """2% of a paper figure, or half a unit of its last printed digit if that is coarser.

    "1.4G" only says 1.35G-1.45G, so a measured 1.36G agrees with it.
    """
    exponent = Decimal(repr(figure)).normalize().as_tuple().exponent
    return max(0.02 * figure, 0.5 * 10.0 ** exponent)


@pytest.mark.parametrize("name", WITH_PAPER_FIGURES)
def test_params_and_macs_match_paper(name: str) -> None:
    entry = get_entry(name)
    with torch.device("meta"):
        model = create_model(name)
        model = DEPLOY_FORMS.get(entry.family, lambda m: m)(model)
    params, macs = count_params(model), count_macs(model, 224)
    if entry.paper_params:
        assert abs(params - entry.paper_params) <= _tolerance(entry.paper_params), (params, entry.paper_params)
    if entry.paper_macs:
        assert abs(macs - entry.paper_macs) <= _tolerance(entry.paper_macs), (macs, entry.paper_macs)


def test_count_macs_counts_convs_and_linears() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    assert count_macs(model, 4) == 8 * 4 * 4 * 3 * 9 + 8 * 4 * 4 * 5
    assert count_macs(model, 4, batch=3) == 3 * (8 * 4 * 4 * 3 * 9 + 8 * 4 * 4 * 5)
    assert count_params(model) == 8 * 27 + 8 + 16 + 128 * 5 + 5


def test_model_summary_reports_train_form_and_paper() -> None:
    summary = model_summary("repvgg_a0")
    assert summary["input_size"] == 224
    assert summary["params"] == count_params(create_model("repvgg_a0"))
    assert summary["paper_params"] == get_entry("repvgg_a0").paper_params
    assert summary["deploy_params"] is None and summary["deploy_macs"] is None
    assert model_summary("ghostnet_050", cifar=True)["input_size"] == 32


@pytest.mark.parametrize(
    ("name", "kw", "message"),
    [
        ("convnext_atto", {"mlp": "mlp"}, "ConvNeXt mlp must be one of linear, conv1x1, not 'mlp'"),
        ("repopt_vgg_a0", {"mode": "search"}, "RepOpt-VGG mode must be one of target, hs, csla, not 'search'"),
        ("ghostnet_100", {"depth": 3}, "model ghostnet_100: "),
    ],
)
def test_bad_model_options_are_user_errors(name: str, kw: dict, message: str) -> None:
    with pytest.raises(DeployError, match="^" + re.escape(message)):
        create_model(name, cifar=True, **kw)


def test_width_scales_repvgg_and_repopt_for_small_budgets() -> None:
    """`width` multiplies both width multipliers (the CIFAR training budget uses 0.25)."""
    from deploykit.models import create_model
    from deploykit.models.profile import count_params

    for name in ("repvgg_a0", "repopt_vgg_a0", "repopt_vgg_a0_hs"):
        small = create_model(name, num_classes=10, cifar=True, width=0.25)
        full = create_model(name, num_classes=10, cifar=True)
        assert count_params(small) < count_params(full) / 10
        first_conv = next(m for m in small.modules() if isinstance(m, torch.nn.Conv2d))
        assert first_conv.out_channels == 12  # min(64, 64 * 0.75 * 0.25)


def test_an_untrained_zoo_model_has_the_same_weights_in_every_load() -> None:
    """advise compares artifacts built in separate loads with an eager reference: all must be one model."""
    import torch

    from deploykit.loading import load_model

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_model("repvgg_a0", cifar=True, num_classes=10).model.state_dict()
    b = load_model("repvgg_a0", cifar=True, num_classes=10).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.rand(1), before)  # the caller's random state is untouched

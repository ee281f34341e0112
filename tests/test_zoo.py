"""Generic tests over the whole zoo: fuse equivalence, ONNX export, paper figures.

A model registered in deploykit.models is covered here the moment it is registered.
"""
from __future__ import annotations

import pytest
import torch

from deploykit.fuse import _randomize_bn, reparameterize
from deploykit.models import create_model, get_entry, list_models

ZOO = list_models()
# Equivalence does not depend on the spatial size: 16x16 (every CIFAR variant downsamples
# at most 16x) keeps the zoo-wide tests fast.
SIZE = 16


@pytest.fixture(scope="module", params=ZOO)
def cifar_model(request: pytest.FixtureRequest):
    torch.manual_seed(0)
    model = create_model(request.param, num_classes=10, cifar=True).eval()
    _randomize_bn(model, seed=1)  # fresh BNs are identities and would hide a wrong fold
    return request.param, model


def test_deploy_form_is_equivalent_with_randomized_bn(cifar_model) -> None:
    name, model = cifar_model
    result = reparameterize(model, input_shape=(1, 3, SIZE, SIZE))
    assert result.certificate.passed, result.certificate.failures()
    assert result.certificate.max_rel_error <= 1e-4
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref, got = model(x), result.model(x)
    assert ((ref - got).abs().max() / ref.abs().max()).item() <= 1e-4
    if get_entry(name).family in ("repvgg", "qarepvgg"):
        # RepVGG's and QARepVGG's deploy form is a plain VGG: no BN, no parallel branches left.
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in result.model.modules())


def test_onnx_export_matches_pytorch(cifar_model, tmp_path) -> None:
    from deploykit.export import export_onnx

    name, model = cifar_model
    fused = reparameterize(model, input_shape=(1, 3, SIZE, SIZE), check=False).model
    report = export_onnx(fused, tmp_path / f"{name}.onnx", input_size=SIZE, batch="dynamic")
    assert (tmp_path / f"{name}.onnx").is_file()
    assert report.onnxruntime["checked"], report.onnxruntime
    assert report.onnxruntime["max_rel_error"] < 1e-4
    assert list((tmp_path).glob("*.data")) == [], "export must be a single file"
    from deploykit.onnxio import summed_branches

    assert summed_branches(tmp_path / f"{name}.onnx") == [], "fused, yet parallel conv branches are summed"


ONE_PER_FAMILY = list({get_entry(n).family: n for n in reversed(ZOO)}.values())  # the first of each family


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_a_users_own_export_of_the_train_form_shows_its_branches(name: str, tmp_path) -> None:
    """torch.onnx.export of the model as trained (what a user hands over instead of the checkpoint):
    every RepVGG / QARepVGG block is found as summed branches; the other families (residual shortcuts,
    Ghost modules' concatenations, RepOpt-VGG's plain training form) show none."""
    import warnings

    from deploykit.models.qarepvgg import QARepVGGBlock
    from deploykit.models.repvgg import RepVGGBlock
    from deploykit.onnxio import summed_branches

    torch.manual_seed(0)
    model = create_model(name, num_classes=10, cifar=True).eval()
    path = tmp_path / "user.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, torch.randn(1, 3, SIZE, SIZE), str(path), dynamo=False, opset_version=17)
    blocks = sum(isinstance(m, (RepVGGBlock, QARepVGGBlock)) for m in model.modules())
    if get_entry(name).family in ("repvgg", "qarepvgg"):
        assert blocks > 0 and len(summed_branches(path)) == blocks
    else:
        assert summed_branches(path) == []


PAPER_MODELS = [n for n in ZOO if get_entry(n).paper_params or get_entry(n).paper_macs]


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_deploy_form_matches_paper_params_and_macs(name: str) -> None:
    """Papers give the deploy (inference-time) form at 224x224 with 1000 classes."""
    from deploykit.models.info import describe

    info = describe(name)
    entry = get_entry(name)
    if entry.paper_params:
        assert info["deploy_params"] == pytest.approx(entry.paper_params, rel=0.02), info
    if entry.paper_macs:
        # Papers round MACs to 2 significant digits (1.36G is printed as 1.4G).
        rounded = float(f"{info['deploy_macs']:.2g}")
        assert rounded == pytest.approx(entry.paper_macs, rel=0.02) or info["deploy_macs"] == pytest.approx(
            entry.paper_macs, rel=0.02
        ), info

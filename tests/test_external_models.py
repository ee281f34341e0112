"""Conformance of the fuser on models we did not write.

Parametrized over the timm models of issue 12 when timm imports here, and always over the
faithful re-creations in ``external_patterns`` of the structures those models trace to.
For each: no BatchNorm left, as many convs as timm's own ``reparameterize_model`` leaves,
relative error <= 1e-5, and an ONNX export of the fused model; a couple also build INT8 on
ONNX Runtime from the fused ONNX at 224x224 with CIFAR images as calibration.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_cli
from deploykit.errors import DeployError, PartialFusionError
from deploykit.fuse import _randomize_bn, reparameterize
from external_patterns import PATTERNS, BatchNormAct2d, resnet_like

TIMM_MODELS = ("repvgg_a0", "mobileone_s0", "resnet18", "ghostnet_100", "repghostnet_050", "fastvit_t8", "convnext_atto")


def _timm():
    """timm, or a skip saying why it cannot be used here."""
    try:
        import timm
    except Exception as err:  # ImportError, or torchvision's RuntimeError beside a torch it was not built for
        pytest.skip(f"timm not usable here ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    return timm


def _model_and_expected(case: str) -> tuple[nn.Module, int, int]:
    """(model with randomized BN, convs after timm's reparameterization, input size)."""
    if case.startswith("timm:"):
        timm = _timm()
        from timm.utils.model import reparameterize_model

        model = timm.create_model(case[5:], pretrained=False, num_classes=10).eval()
        _randomize_bn(model, 3)
        reference = reparameterize_model(model)  # timm copies the model first
        convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in reference.modules())
        return model, convs, 64
    factory, convs = PATTERNS[case]
    model = factory().eval()
    _randomize_bn(model, 3)
    return model, convs, 32


CASES = [*PATTERNS, *(f"timm:{name}" for name in TIMM_MODELS)]


@pytest.mark.parametrize("case", CASES)
def test_fuses_completely_like_timm_and_exports(case: str, tmp_path: Path) -> None:
    from deploykit.export import export_onnx

    model, expected_convs, size = _model_and_expected(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = reparameterize(model, input_shape=(2, 3, size, size))
    cert = result.certificate
    assert cert.batchnorm_left == 0 and not cert.left, cert.left
    assert cert.convs_after == expected_convs
    assert cert.max_rel_error <= 1e-5
    assert cert.verdict == "PASS"
    if cert.batchnorm_before:
        assert cert.blocks, "a model with BatchNorm fused nothing"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the caller's model changed"
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference, fused = model(x), result.model(x)
    assert ((reference - fused).abs().max() / reference.abs().max()).item() <= 1e-5
    report = export_onnx(result.model, tmp_path / "fused.onnx", input_size=size)
    assert report.onnxruntime.get("checked") is False or report.onnxruntime["max_rel_error"] < 1e-4


@pytest.mark.parametrize("case", ["mobileone_like", "fastvit_like"])
def test_int8_build_on_onnxruntime_from_the_fused_onnx_at_224(case: str, tmp_path: Path, capfd) -> None:
    pytest.importorskip("onnxruntime")
    from conftest import CIFAR_TGZ
    from deploykit.build import BuildRequest, build
    from deploykit.export import export_onnx

    if not CIFAR_TGZ.is_file():
        pytest.skip(f"CIFAR-10 tarball not found at {CIFAR_TGZ}")
    model, _, _ = _model_and_expected(case)
    fused = reparameterize(model, input_shape=(1, 3, 224, 224)).model
    onnx_path = export_onnx(fused, tmp_path / "fused.onnx", input_size=224).path
    result = build(BuildRequest(model=str(onnx_path), target="onnxruntime", precision="int8", calib=str(CIFAR_TGZ),
                                calib_samples=4, verify_samples=4, out=tmp_path / "art"))
    assert (result.path / "build.json").is_file()
    assert any("upscaled 8.0x" in w for w in result.warnings), result.warnings  # 32x32 CIFAR into 224x224
    assert "out-of-range" not in capfd.readouterr().err


class PreActBlock(nn.Module):
    """BN before the conv, after a ReLU: nothing for the engine to fold it into."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1)
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.act(self.conv(x)))


def test_batchnorm_left_fails_the_gate_unless_accepted() -> None:
    with pytest.raises(PartialFusionError, match=r"1 of 1 BatchNorm unfolded: bn: .*ReLU.*accept-partial"):
        reparameterize(PreActBlock().eval(), input_shape=(2, 3, 16, 16))
    cert = reparameterize(PreActBlock().eval(), input_shape=(2, 3, 16, 16), accept_partial=True).certificate
    assert cert.left[0].name == "bn" and cert.left[0].kind == "batchnorm" and "not a conv" in cert.left[0].reason
    assert cert.verdict.startswith("PARTIAL") and "PASS" not in cert.summary()
    assert cert.to_dict()["left"][0]["name"] == "bn"


def test_in_place_relu_after_folded_bn_is_not_a_false_failure() -> None:
    model = resnet_like().eval()
    _randomize_bn(model, 5)
    cert = reparameterize(model, input_shape=(2, 3, 32, 32)).certificate
    assert max(b.given.max_rel_error for b in cert.blocks) < 1e-5
    assert cert.unfused and all("residual" in u["reason"] for u in cert.unfused)


def test_batchnorm_subclass_is_randomized_for_the_structure_check() -> None:
    block = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1, bias=False), BatchNormAct2d(4))
    _randomize_bn(block, 1)
    assert not torch.equal(block[1].running_var, torch.ones(4))


def test_cli_fuse_of_python_model_then_build_reads_its_own_output(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    spec = f"{Path(__file__).parent / 'external_patterns.py'}:repvgg_like"
    fused = tmp_path / "f.pt"
    done = run_cli("fuse", spec, "--out", str(fused))
    assert done.returncode == 0, done.stderr
    assert "certificate: PASS" in done.stdout and "BatchNorm 10 -> 0" in done.stdout
    refused = run_cli("build", str(fused), "--target", "onnxruntime", "--out", str(tmp_path / "a"))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"--weights {fused}" in refused.stderr
    built = run_cli("build", spec, "--weights", str(fused), "--target", "onnxruntime", "--out", str(tmp_path / "b"),
                    "--verify-samples", "4")
    assert built.returncode == 0, built.stderr


def test_external_onnx_whose_input_is_not_an_image_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(nn.Linear(10, 2), (torch.zeros(1, 10),), str(path), dynamo=False)
    done = run_cli("build", str(path), "--target", "onnxruntime", "--out", str(tmp_path / "a"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "deploykit feeds RGB images as (N, 3, S, S)" in done.stderr


def test_ort_axis_noise_is_dropped_and_errors_pass(caplog: pytest.LogCaptureFixture) -> None:
    from deploykit.quiet import drop_log_records

    with caplog.at_level(logging.WARNING), drop_log_records("", r"^Axis -?\d+ is out-of-range for weight ", "notes"):
        logging.getLogger().warning("Axis 1 is out-of-range for weight 'bn.weight' with rank 1")
        logging.getLogger().error("Axis 1 is out-of-range for weight 'real' with rank 1")
        logging.getLogger().warning("something else")
    assert [r.getMessage()[:7] for r in caplog.records] == ["Axis 1 ", "somethi"]
    assert caplog.records[0].levelno == logging.ERROR


def test_timm_spec_without_timm_is_one_line() -> None:
    try:
        import timm  # noqa: F401

        pytest.skip("timm imports here")
    except Exception:
        pass
    from deploykit.loading import load_model

    with pytest.raises(DeployError, match=r"timm .*pip install 'deploykit\[timm\]'"):
        load_model("timm:repvgg_a0")


def test_cli_fuse_timm_repvgg_a0_certifies_22_blocks(tmp_path: Path) -> None:
    _timm()
    out = tmp_path / "x.safetensors"
    done = run_cli("fuse", "timm:repvgg_a0", "--num-classes", "10", "--input-size", "64", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "fused blocks: 22" in done.stdout and "certificate: PASS" in done.stdout
    from deploykit.loading import load_model

    loaded = load_model(str(out), input_size=64)
    assert loaded.form == "deploy" and loaded.source == "checkpoint"


class DepthwisePlusPointwise(nn.Module):
    """dw3x3(x) + pw1x1(x): one kernel would be a dense 3x3, slower than both branches."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw(x) + self.pw(x)


def test_a_merge_that_would_be_slower_is_kept_apart_and_not_a_failure() -> None:
    result = reparameterize(DepthwisePlusPointwise().eval(), input_shape=(2, 16, 8, 8))
    cert = result.certificate
    assert cert.verdict == "PASS" and cert.convs_after == 2
    assert "on purpose" in cert.unfused[0]["reason"]

"""Dead input channels: analyze's cause figures on a model with known dead channels, and the
zero-dead-weights transform (exact in FP32, certified)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deploykit.errors import FusionError
from deploykit.fuse import reparameterize
from deploykit.quant.analyze import analyze
from deploykit.quant.dead_channels import dead_inputs, zero_dead_weights
from deploykit.quant.fakequant import fake_quantize, calibrate_ranges, predict

from conftest import run_cli
from dead_models import CHANNELS, DEAD, RATIO, SIZE, dead_model


@pytest.fixture(scope="module")
def fused():
    model, inputs, labels = dead_model()
    result = reparameterize(model, input_shape=(2, 3, SIZE, SIZE))
    block = next(b for b in result.certificate.blocks if "bn:identity" in b.sources)
    return model, result.model, {b.module: list(b.sources) for b in result.certificate.blocks}, block.module, inputs, labels


def test_dead_inputs_are_the_planted_channels(fused) -> None:
    _, model, _, block, inputs, _ = fused
    dead = dead_inputs(model, inputs[:128])
    assert torch.nonzero(dead[block]).flatten().tolist() == list(DEAD)
    assert not dead["stem"].any() and not dead["linear"].any()


def test_analyze_names_bn_ratio_and_dead_weights_on_the_right_layer(fused) -> None:
    train, model, sources, block, inputs, labels = fused
    result = analyze(model, inputs[:256], inputs[256:], labels=labels[256:], per_channel=False, sources=sources,
                     train_model=train)
    layer = next(r for r in result.layers if r.name == block)
    c = layer.causes
    assert c.bn_max_module == "identity" and c.bn_max_ratio == pytest.approx(RATIO, rel=1e-6)
    assert sorted(c.bn_max_channels[:2]) == list(DEAD)
    assert c.dead_inputs == 2 and c.dead_channels == list(DEAD)
    # The fused kernel's weights on the dead inputs are the identity BN's |gamma|/sigma at the centre taps.
    assert c.dead_weight_absmax == pytest.approx(RATIO, rel=1e-3)
    assert c.dead_inflated_outputs == 2 and c.dead_range_inflation > 100
    assert {"bn_scale", "dead_weights"} <= set(c.causes) and layer.fixes[0] == "zero_dead"
    stem = next(r for r in result.layers if r.name == "stem")
    assert stem.causes.dead_inputs == 0 and "dead_weights" not in stem.causes.causes
    assert result.ranking[0] == block



def test_an_output_channel_with_weights_only_on_dead_inputs_is_infinitely_widened() -> None:
    from deploykit.quant.causes import LayerCauses, _dead_figures

    conv = torch.nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 4.0]]).reshape(2, 3, 1, 1))
    out = LayerCauses()
    _dead_figures(conv, torch.tensor([False, False, True]), out)
    # Channel 1 has no live weight: its whole range is the dead input's (mobileone_s4 printed 4.5e300x here).
    assert out.dead_range_inflation == float("inf") and out.dead_inflated_outputs == 1
    assert out.dead_weight_absmax == 4.0 and out.live_weight_absmax == 1.0

def test_zero_dead_weights_is_exact_and_restores_int8(fused) -> None:
    _, model, _, block, inputs, labels = fused
    calib, held = inputs[:256], inputs[256:]
    result = zero_dead_weights(model, calib, held_out=held)
    assert result.layers == {block: 2} and result.weights_zeroed == 2 * CHANNELS * 9
    assert result.calibration_error["max_rel_error"] <= 1e-6 and result.held_out_error["max_rel_error"] <= 1e-6
    w = result.model.get_submodule(block).weight
    assert (w[:, list(DEAD)] == 0).all() and (model.get_submodule(block).weight[:, list(DEAD)] != 0).any()
    with torch.no_grad():
        x = torch.from_numpy(held)
        assert torch.equal(predict(model, x).argmax(1), predict(result.model, x).argmax(1))

    def int8_top1(m) -> float:
        q = fake_quantize(m, calibrate_ranges(m, calib), per_channel=False)
        return float((predict(q, held).argmax(1).numpy() == labels[256:]).mean())

    assert int8_top1(result.model) > int8_top1(model) + 0.2


def test_zero_dead_certificate_fails_loudly_when_a_channel_was_not_dead(fused, monkeypatch) -> None:
    import deploykit.quant.dead_channels as dc

    _, model, _, block, inputs, _ = fused
    monkeypatch.setattr(dc, "dead_inputs", lambda m, x, batch_size=64: {
        block: torch.tensor([c in (0, 2) for c in range(CHANNELS)])})  # live channels claimed dead
    with pytest.raises(FusionError, match="changed the outputs on the calibration set"):
        zero_dead_weights(model, inputs[:64])


def test_cli_analyze_reports_the_causes(tmp_path: Path) -> None:
    factory = tmp_path / "dead.py"
    factory.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                       "from dead_models import make\n")
    data = tmp_path / "data.npz"
    _, inputs, labels = dead_model()
    np.savez(data, inputs=inputs, labels=labels)
    done = run_cli("analyze", f"{factory}:make", "--calib", str(data), "--calib-recipe", "cifar10",
                   "--calib-samples", "128", "--verify-samples", "128", "--per-tensor", "--out", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    assert "zero the weights on always-zero input channels" in done.stdout
    report = json.loads((tmp_path / "a" / "analysis.json").read_text())
    top = next(r for r in report["layers"] if r["name"] == report["ranking"][0])
    assert top["causes"]["bn_max_module"] == "identity" and top["causes"]["dead_channels"] == list(DEAD)
    markdown = (tmp_path / "a" / "analysis.md").read_text()
    assert "## Causes, every layer" in markdown and "weights on always-zero input channels set the int8 range" in markdown
    assert f"2 ({DEAD[0]}, {DEAD[1]})" in markdown


def _factory_and_data(tmp_path: Path) -> tuple[str, Path]:
    factory = tmp_path / "dead.py"
    factory.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                       "from dead_models import make\n")
    data = tmp_path / "data.npz"
    _, inputs, labels = dead_model()
    np.savez(data, inputs=inputs, labels=labels)
    return f"{factory}:make", data


def test_max_drop_zeroes_dead_weights_first(fused) -> None:
    pytest.importorskip("onnxruntime", reason="max-drop builds with ONNX Runtime")
    from deploykit.quant.max_drop import fix_quantization
    from test_max_drop import _calibration

    _, model, _, _, inputs, labels = fused
    result = fix_quantization(model, backend="onnxruntime", calibration=_calibration(inputs[:256]),
                              validation_inputs=inputs[256:], validation_labels=labels[256:], max_drop=1.0,
                              base_options={"per_channel": False}, threads=1)
    names = [s.step for s in result.steps]
    assert names[:2] == ["baseline", "zero_dead"] and result.steps[0].drop_points > 1.0
    assert result.steps[1].adopted and result.met and result.recipe.zero_dead


@pytest.mark.parametrize("fix", ["zero-dead", "repvgg"])
def test_cli_build_with_a_named_int8_fix(tmp_path: Path, fix: str) -> None:
    pytest.importorskip("onnxruntime", reason="the named fix is built with ONNX Runtime")
    model, data = _factory_and_data(tmp_path)
    common = ["--target", "onnxruntime", "--precision", "int8", "--calib", str(data), "--calib-recipe", "cifar10",
              "--calib-samples", "256", "--verify-samples", "256", "--threads", "1", "--option", "per_channel=false"]
    plain = run_cli("build", model, *common, "--out", str(tmp_path / "plain"))
    fixed = run_cli("build", model, *common, "--int8-fix", fix, "--out", str(tmp_path / "fixed"))
    assert plain.returncode == 0 and fixed.returncode == 0, plain.stderr + fixed.stderr
    before = json.loads((tmp_path / "plain" / "build.json").read_text())
    after = json.loads((tmp_path / "fixed" / "build.json").read_text())
    assert after["int8_fix"]["name"] == fix and after["int8_fix"]["steps"][0]["weights_zeroed"] == 2 * CHANNELS * 9
    assert after["int8_fix"]["steps"][0]["calibration_error"]["max_rel_error"] <= 1e-6
    assert after["verification"]["top1_agreement"] > before["verification"]["top1_agreement"] + 0.2
    if fix == "repvgg":
        assert after["options"]["per_channel"] is True
    wrong = run_cli("build", model, "--target", "onnxruntime", "--int8-fix", fix, "--out", str(tmp_path / "fp32"))
    assert wrong.returncode == 2 and "--int8-fix applies to int8 builds" in wrong.stderr

"""Quantization diagnosis: statistics on hand-computed kernels, SQNR of known quantizations,
the planted outlier found and its fix named, the rewrites (CLE, bias correction), the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from deploykit.errors import DeployError
from deploykit.quant.analyze import KernelStats, _weight_figures, analyze
from deploykit.quant.equalize import conv_relu_conv_pairs, correct_bias, equalize
from deploykit.quant.fakequant import (
    ActRange, calibrate_ranges, fake_quant_activation, fake_quant_weight, fake_quantize, predict, sqnr_db,
)

from conftest import run_cli
from outlier_models import outlier_model


def _known_kernel() -> torch.Tensor:
    """Two 3x3 kernels: surrounding positions +-1 (mean 0), centres +3 and -3."""
    ring = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 0.0, -1.0], [1.0, -1.0, 1.0]])
    w = torch.stack([ring.clone(), -ring.clone()]).unsqueeze(1)  # (2, 1, 3, 3)
    w[0, 0, 1, 1], w[1, 0, 1, 1] = 3.0, -3.0
    return w


def test_kernel_std_centre_and_surrounding_by_hand() -> None:
    stats = KernelStats.of([_known_kernel()])
    # 16 surrounding values of +-1 and 2 centres of +-3, all with mean 0 (population std):
    assert stats.std_surround == pytest.approx(1.0)
    assert stats.std_centre == pytest.approx(3.0)
    assert stats.std == pytest.approx(math.sqrt((16 * 1 + 2 * 9) / 18))
    figures = _weight_figures(_known_kernel())
    assert figures["kurtosis"] == pytest.approx(((16 * 1 + 2 * 81) / 18) / ((16 * 1 + 2 * 9) / 18) ** 2)
    assert figures["max_over_std"] == pytest.approx(3 / math.sqrt(34 / 18))
    assert figures["range_spread"] == pytest.approx(1.0) and figures["range_ratio"] == pytest.approx(1.0)
    assert KernelStats.of([torch.ones(4, 4, 1, 1)]) is None  # no 3x3 kernel: no centre/surrounding


def test_sqnr_and_fake_quant_of_known_values() -> None:
    assert sqnr_db([1.0, 1.0, 1.0, 1.0], [1.1, 0.9, 1.1, 0.9]) == pytest.approx(20.0)
    assert sqnr_db([1.0, 2.0], [1.0, 2.0]) == math.inf
    # One channel at 127, one at 0.4: a per-tensor scale of 1 rounds the small one to 0.
    w = torch.tensor([[127.0, -127.0], [0.4, -0.4]]).reshape(2, 2, 1, 1)
    per_tensor = fake_quant_weight(w, per_channel=False)
    assert torch.equal(per_tensor[1], torch.zeros_like(w[1]))
    assert sqnr_db(w, per_tensor) == pytest.approx(10 * math.log10((2 * 127**2 + 2 * 0.16) / (2 * 0.16)))
    assert sqnr_db(w, fake_quant_weight(w, per_channel=True)) > 100  # exact up to float rounding
    # uint8 activations over [0, 2.55]: steps of 0.01, zero point 0; out-of-range values clamp.
    r = ActRange(0.0, 2.55)
    assert (r.scale, r.zero_point) == (pytest.approx(0.01), 0)
    got = fake_quant_activation(torch.tensor([0.123, 1.0, 3.0, -1.0]), r)
    assert torch.allclose(got, torch.tensor([0.12, 1.0, 2.55, 0.0]))


def test_calibrated_ranges_include_zero_and_the_observed_extremes() -> None:
    model, inputs, _ = outlier_model("clean")
    ranges = calibrate_ranges(model, inputs[:64])
    assert set(ranges) == {"conv1", "conv2", "linear"}
    assert ranges["conv1"].low == pytest.approx(float(inputs[:64].min())) and ranges["conv1"].high > 0
    assert ranges["conv2"].low == 0.0  # after a ReLU
    same = predict(fake_quantize(model, ranges, layers=[]), inputs[:8])
    assert torch.equal(same, predict(model, inputs[:8]))  # quantizing no layer changes nothing


@pytest.mark.parametrize(
    "kind, per_channel, worst, fix",
    [
        ("weight", False, "conv1", "per_channel"),
        ("activation", True, "conv2", "equalize"),
        ("input", True, "conv1", "keep_fp"),
    ],
)
def test_analyze_finds_the_planted_outlier_and_names_its_fix(
    kind: str, per_channel: bool, worst: str, fix: str
) -> None:
    model, inputs, labels = outlier_model(kind)
    result = analyze(model, inputs[:256], inputs[256:512], labels=labels[256:512], per_channel=per_channel,
                     name=kind)
    layers = {layer.name: layer for layer in result.layers}
    assert result.ranking[0] == worst
    assert layers[worst].fix == fix
    assert layers[worst].top1_drop > 5.0  # alone, the layer costs real accuracy
    assert result.fp32_top1 == 1.0
    if fix == "equalize":
        assert layers[worst].previous == "conv1"
    data = result.to_dict()
    json.dumps(data)  # inf/nan written as strings: valid JSON
    assert data["layers"][0]["fix_text"]



def _amplifier() -> tuple[torch.nn.Module, np.ndarray]:
    """conv1 computes two channels that differ by ~0.01%; conv2 takes their difference x 10^4: every
    error in conv1's output reaches the logits ~80 dB louder (a network that amplifies, like a random one)."""
    gen = torch.Generator().manual_seed(0)
    conv1, conv2, head = torch.nn.Conv2d(16, 2, 1), torch.nn.Conv2d(2, 4, 1), torch.nn.Linear(4, 10)
    with torch.no_grad():
        w = torch.rand(16, generator=gen) + 0.5
        near = w * (1 + 1e-4 * torch.randn(16, generator=gen))  # int8 rounds the two channels differently
        conv1.weight.copy_(torch.stack([w, near]).reshape(2, 16, 1, 1))
        conv1.bias.zero_()
        conv2.weight.copy_(torch.tensor([[1.0, -1.0]] * 4).reshape(4, 2, 1, 1) * 1e4 * torch.rand(4, 1, 1, 1, generator=gen))
        conv2.bias.zero_()
        head.bias.zero_()  # the logits are the amplified difference, nothing constant
    model = torch.nn.Sequential(conv1, conv2, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head).eval()
    inputs = torch.rand(320, 16, 8, 8, generator=gen).numpy()
    return model, inputs


def test_analyze_names_a_network_that_amplifies_small_errors() -> None:
    from deploykit.quant.analyze import AMPLIFIED_GAIN_DB, BF16_OK_DB
    from deploykit.report.analysis import to_markdown

    model, inputs = _amplifier()
    result = analyze(model, inputs[:256], inputs[256:], per_channel=True)
    layers = {layer.name: layer for layer in result.layers}
    first = layers["0"]
    # conv1's own int8 output is fine per channel; the layers after it make the logits noise.
    assert first.output_channel_sqnr_db > 30 and first.logit_sqnr_db < 10
    assert first.error_gain_db >= AMPLIFIED_GAIN_DB and first.causes.causes[0] == "amplified"
    assert first.fix == "keep_fp"
    # bf16 (no int8 at all) breaks it too: the cause is the network, and the report says so.
    assert result.bf16_logit_sqnr_db < BF16_OK_DB
    assert "does not bear reduced precision" in to_markdown(result)
    # A well-conditioned model: bf16 is harmless and no layer is called amplified.
    clean, clean_inputs, clean_labels = outlier_model("clean")
    ok = analyze(clean, clean_inputs[:256], clean_inputs[256:512], labels=clean_labels[256:512])
    assert ok.bf16_logit_sqnr_db > BF16_OK_DB and "does not bear" not in to_markdown(ok)
    assert not any("amplified" in layer.causes.causes for layer in ok.layers)

def test_equalization_keeps_the_function_and_balances_ranges() -> None:
    model, inputs, _ = outlier_model("activation")
    assert conv_relu_conv_pairs(model) == [("conv1", "conv2")]
    x = torch.from_numpy(inputs[:16])
    balanced, facts = equalize(model, example=x)
    assert facts["max_range_ratio_before"] > 50
    assert facts["max_range_ratio_after"] < facts["max_range_ratio_before"] / 10
    assert torch.allclose(balanced(x), model(x), rtol=1e-4, atol=1e-4)
    r1 = balanced.conv1.weight.abs().reshape(8, -1).amax(1)
    r2 = balanced.conv2.weight.abs().transpose(0, 1).reshape(8, -1).amax(1)
    assert torch.allclose(r1, r2, rtol=1e-3)  # the DFQ fixed point: equal ranges per channel


def test_bias_correction_removes_the_mean_output_shift() -> None:
    model, inputs, _ = outlier_model("clean")
    x = torch.from_numpy(inputs[:256])

    def shift(m: torch.nn.Module) -> float:
        ranges = calibrate_ranges(m, inputs[:256])
        quantized = fake_quantize(m, ranges, per_channel=False, activations=False)  # weight rounding only
        with torch.no_grad():
            return float((quantized.conv1(x) - model.conv1(x)).mean((0, 2, 3)).abs().max())

    corrected, facts = correct_bias(model, inputs[:256], per_channel=False)
    assert facts["layers"] == 3
    assert shift(corrected) < shift(model) / 10


def test_cli_writes_markdown_json_and_histograms(tmp_path: Path) -> None:
    factory = tmp_path / "outlier.py"
    factory.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from outlier_models import outlier_model\n\n"
        "def model():\n    return outlier_model('weight')[0]\n"
    )
    data = tmp_path / "data.npz"
    _, inputs, labels = outlier_model("weight")
    np.savez(data, inputs=inputs, labels=labels)
    out = tmp_path / "analysis"
    done = run_cli("analyze", f"{factory}:model", "--calib", str(data), "--calib-recipe", "cifar10",
                   "--calib-samples", "128", "--verify-samples", "128", "--per-tensor", "--test-data", str(data),
                   "--test-limit", "64", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1. conv1:") and "per-channel weight scales" in done.stdout
    report = json.loads((out / "analysis.json").read_text())
    assert report["ranking"][0] == "conv1" and report["calibration"]["count"] == 128
    reference = report["reference"]  # FP32 and fake-quant INT8 on the "test" data: the report's PyTorch rows
    assert reference["count"] == 64 and reference["top1"]["fp32"] == 1.0
    assert reference["top1"]["int8_per_tensor"] < reference["top1"]["int8_per_channel"]
    markdown = (out / "analysis.md").read_text()
    assert "| 1 | `conv1` |" in markdown and "RepOpt-VGG-B1 (paper)" in markdown
    for png in ("weights.png", "activations.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    missing = run_cli("analyze", f"{factory}:model", "--out", str(tmp_path / "again"))
    assert missing.returncode == 2 and "needs calibration data" in missing.stderr


def test_analysis_needs_samples() -> None:
    model, inputs, _ = outlier_model("clean")
    with pytest.raises(DeployError, match="calibration needs at least one sample"):
        analyze(model, inputs[:0], inputs[:8])


def test_report_renders_measured_numbers_and_marks_the_rest(tmp_path: Path) -> None:
    from deploykit.report.quant_study import NOT_MEASURED, render

    work = tmp_path / "work"
    (work / "eval").mkdir(parents=True)
    (work / "eval" / "repvgg-torch-fp32.json").write_text(json.dumps({"top1": 0.8765}))
    (work / "eval" / "repvgg-onnxruntime-int8-tensor.json").write_text(json.dumps({"top1": 0.5432}))
    (work / "eval" / "repopt-torch-fp32.json").write_text(json.dumps({"top1": 0.88}))
    (work / "eval" / "repopt-onnxruntime-int8-tensor.json").write_text(json.dumps({"top1": 0.87}))
    (work / "analysis" / "repvgg").mkdir(parents=True)
    model, inputs, labels = outlier_model("weight")
    result = analyze(model, inputs[:128], inputs[128:256], labels=labels[128:256], per_channel=False, name="repvgg")
    (work / "analysis" / "repvgg" / "analysis.json").write_text(json.dumps(result.to_dict()))
    (work / "analysis" / "repvgg" / "weights.png").write_bytes(b"\x89PNG histogram")
    (work / "maxdrop").mkdir()
    (work / "maxdrop" / "repvgg-mnn.failed").write_text("error: mnn int8 loses 9.10 top-1 points\n")
    (work / "maxdrop" / "repvgg-openvino").mkdir()
    (work / "maxdrop" / "repvgg-openvino" / "build.json").write_text(
        json.dumps({"backend": {"accuracy_control": {"max_drop": 0.01, "samples": 1000}}}))
    text = render(work, tmp_path / "report.md", None)
    # WORK is not committed: the analysis files are copied beside the report and linked from it.
    assert (tmp_path / "report" / "repvgg-weights.png").read_bytes() == b"\x89PNG histogram"
    assert "[repvgg-weights.png](report/repvgg-weights.png)" in text
    # A max-drop build that found no recipe within budget leaves no artifact, only its reason.
    assert "no recipe within budget (error: mnn int8 loses 9.10 top-1 points)" in text
    assert "NNCF quantize_with_accuracy_control, max_drop 0.01 on 1000 held-out images" in text
    # The verdict is computed from the drops: +33.33 vs +1.00 points.
    assert "INT8 per-tensor weights: drop RepVGG +33.33, RepOpt-VGG +1.00 points: RepVGG loses more." in text
    assert "appears in 1 of 1 INT8 schemes" in text and "not reached with this budget" in text
    assert "| RepVGG-A0 (fused) | PyTorch | FP32 | 87.65 | |" in text
    assert "| RepVGG-A0 (fused) | onnxruntime | INT8 per-tensor weights | 54.32 | +33.33 |" in text
    assert f"| RepOpt-VGG-A0 | onnxruntime | INT8 per-channel weights | {NOT_MEASURED} | - |" in text
    assert "| 1 | `conv1` |" in text and "per-channel weight scales" in text
    assert "RepVGG-B1, fused (paper) | 0.0236 | 0.0500 | 0.0177" in text

"""The accuracy-budgeted INT8 loop on tiny models with one planted outlier, with ONNX Runtime."""
from __future__ import annotations

import json

import numpy as np
import pytest

from deploykit.backends.base import BACKENDS, get_backend
from deploykit.calib import CalibrationSet, Preprocessing
from deploykit.errors import DeployError, QualityGateError
from deploykit.quant.max_drop import fix_quantization, layer_nodes, max_drop_targets

from outlier_models import SIZE, outlier_model

pytest.importorskip("onnxruntime", reason="max-drop builds with ONNX Runtime: pip install 'deploykit[onnxruntime]'")

BUDGET = 1.0  # top-1 points


def _calibration(inputs: np.ndarray) -> CalibrationSet:
    return CalibrationSet(inputs=inputs[:256], preprocessing=Preprocessing(size=SIZE), source="outlier_models",
                          seed=0, recipe=None, synthetic=False, held_out=inputs[256:320])


def _fix(kind: str, backend: str = "onnxruntime", **kw):
    model, inputs, labels = outlier_model(kind)
    return fix_quantization(model, backend=backend, calibration=_calibration(inputs),
                            validation_inputs=inputs[256:], validation_labels=labels[256:], max_drop=BUDGET,
                            threads=1, **kw)


def _steps(result) -> dict[str, object]:
    return {s.step: s for s in result.steps}


def test_per_channel_weights_fix_a_weight_outlier() -> None:
    result = _fix("weight", base_options={"per_channel": False})
    steps = _steps(result)
    assert steps["baseline"].drop_points > 10  # one shared scale crushes conv1's other channels
    assert steps["per_channel"].adopted and steps["per_channel"].drop_points <= BUDGET
    # conv1's outlier channel is dead after its ReLU, so zeroing conv2's weights on it is tried first;
    # the search stops at the first recipe within budget.
    assert list(steps) == ["baseline", "zero_dead", "per_channel"]
    assert result.met and result.options["per_channel"] is True and result.fp32_top1 == 1.0
    json.dumps(result.to_dict())


def test_equalization_fixes_an_activation_outlier() -> None:
    result = _fix("activation")  # the backend's defaults already use per-channel weights
    steps = _steps(result)
    assert steps["baseline"].drop_points > 10
    assert steps["per_channel"].skipped == "already on"
    assert steps["equalize"].adopted and steps["equalize"].drop_points <= BUDGET
    assert result.met and result.recipe.equalize
    # The returned model is the equalized one the recipe builds from.
    c1 = result.model.conv1.weight.detach().abs().reshape(8, -1).amax(1)
    assert float(c1.max() / c1.min()) < 10


# Every backend with max-drop switches whose own accuracy control does not replace the search.
SEARCHED = [n for n in BACKENDS if get_backend(n).max_drop_knobs and not get_backend(n).native_max_drop_option]


@pytest.mark.parametrize("backend", SEARCHED)
def test_keeping_the_worst_layer_in_float_or_a_clear_gate(backend: str) -> None:
    """An input no rewrite can fix: only float for conv1 recovers it (where the backend allows)."""
    if get_backend(backend).version() is None:
        pytest.skip(f"{backend} is not installed: pip install 'deploykit[{backend}]'")
    option = get_backend(backend).max_drop_knobs.float_layers
    result = _fix("input", backend, max_fp_layers=2)
    steps = _steps(result)
    assert steps["baseline"].drop_points > BUDGET
    if option is None or option not in get_backend(backend).options:
        assert (get_backend(backend).max_drop_knobs.why_no_float or option) in steps["keep_fp"].skipped and not result.met
        with pytest.raises(QualityGateError, match=f"budget {BUDGET:.2f}") as caught:
            result.check()
        assert "keep more layers in float" not in str(caught.value)  # not advice the backend can follow
        return  # the keep-in-float step is reported as skipped with the reason, and the budget gate holds
    assert steps["keep_fp_1"].recipe["float_layers"] == ["conv1"]
    assert result.met and result.drop_points <= BUDGET


def test_layer_nodes_map_module_names_to_onnx_nodes(tmp_path) -> None:
    from deploykit.export import export_onnx

    model, _, _ = outlier_model("clean")
    export_onnx(model, tmp_path / "m.onnx", input_size=SIZE)
    nodes = layer_nodes(tmp_path / "m.onnx")
    assert set(nodes) == {"conv1", "conv2", "linear"}
    assert nodes["conv1"].op_type == "Conv" and nodes["conv1"].input[1] == "conv1.weight"


def test_bad_requests_are_clear_errors() -> None:
    model, inputs, labels = outlier_model("clean", count=300)
    common = dict(calibration=_calibration(inputs), max_drop=BUDGET)
    unsupported = next(n for n in BACKENDS if n not in max_drop_targets())
    with pytest.raises(DeployError, match="max-drop supports targets"):
        fix_quantization(model, backend=unsupported, validation_inputs=inputs, validation_labels=labels, **common)
    with pytest.raises(DeployError, match="labeled validation samples"):
        fix_quantization(model, backend="onnxruntime", validation_inputs=inputs[:0], validation_labels=labels[:0],
                         **common)
    with pytest.raises(DeployError, match=">= 0 points"):
        fix_quantization(model, backend="onnxruntime", validation_inputs=inputs, validation_labels=labels,
                         calibration=common["calibration"], max_drop=-1.0)


def test_build_with_max_drop_meets_the_budget_and_records_the_recipe(tmp_path) -> None:
    """`deploykit build --max-drop` (ORT): the planted input outlier is fixed within budget."""
    from pathlib import Path

    from deploykit.build import BuildRequest, build

    _, inputs, labels = outlier_model("input")
    data = tmp_path / "data.npz"
    np.savez(data, inputs=inputs, labels=labels)
    factory = tmp_path / "factory.py"
    factory.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from outlier_models import outlier_model\n\n"
        "def make():\n    model = outlier_model('input')[0]\n    model.default_input_size = 8\n    return model\n"
    )
    request = BuildRequest(model=f"{factory}:make", target="onnxruntime", precision="int8", calib=str(data),
                           calib_samples=256, verify_samples=512, out=tmp_path / "artifact", threads=1,
                           max_drop=BUDGET)
    meta = build(request).meta
    assert meta["max_drop"]["met"] and meta["max_drop"]["drop_points"] <= BUDGET
    assert meta["max_drop"]["steps"][0]["drop_points"] > BUDGET  # the plain INT8 build was over budget
    assert meta["options"] == meta["max_drop"]["options"]

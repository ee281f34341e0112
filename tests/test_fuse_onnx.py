"""Re-parameterization of ONNX graphs deploykit did not write (deploykit.fuse.onnx_graph)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from deploykit.models import create_model, get_entry, list_models

from conftest import run_cli

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ONE_PER_FAMILY = list({get_entry(n).family: n for n in reversed(list_models())}.values())


def users_export(model, path: Path) -> Path:
    """What a user hands over: torch.onnx.export (TorchScript exporter) of the model as it is, symbolic batch."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.randn(1, 3, 32, 32), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], dynamic_axes={"image": {0: "batch"}})
    return path


def op_count(path: Path, op: str) -> int:
    return sum(n.op_type == op for n in onnx.load(str(path)).graph.node)


def ort_runner(path: Path):
    """How a build runs the graphs it certifies: deploykit's ONNX Runtime runner."""
    from deploykit.backends.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(path, threads=2)


def ort_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_a_users_export_of_the_train_form_fuses_like_the_module_graph(name: str, tmp_path: Path) -> None:
    """The ONNX rewrite of a train-form export leaves exactly the convolutions the module-graph fuser leaves,
    no summed branches, and the same outputs (trained-like BN statistics)."""
    import torch

    from deploykit.export import export_onnx
    from deploykit.fuse import _randomize_bn, reparameterize
    from deploykit.fuse.onnx_graph import fuse_onnx_file
    from deploykit.onnxio import summed_branches

    torch.manual_seed(0)
    model = create_model(name, num_classes=10, cifar=True).eval()
    _randomize_bn(model, 0)
    given = users_export(model, tmp_path / "given.onnx")
    fused = tmp_path / "fused.onnx"
    report = fuse_onnx_file(given, fused, input_size=32, runner=ort_runner)
    export_onnx(reparameterize(model, input_shape=(2, 3, 32, 32)).model, tmp_path / "deploykit.onnx", input_size=32)
    if summed_branches(given):
        assert report is not None and report.equivalent and report.branch_sums >= len(summed_branches(given))
        assert summed_branches(fused) == []
        assert op_count(fused, "Conv") == op_count(tmp_path / "deploykit.onnx", "Conv") < op_count(given, "Conv")
        assert op_count(fused, "BatchNormalization") == 0 < op_count(given, "BatchNormalization")
        x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
        reference = ort_outputs(given, x)
        assert np.abs(ort_outputs(fused, x) - reference).max() <= 1e-4 * np.abs(reference).max()
    else:  # the exporter folded every Conv+BN already; nothing left to change, nothing written
        assert report is None and not fused.exists()


def hand_graph(path: Path) -> Path:
    """A graph written with onnx.helper, one of each case: a Conv+BN pair the exporter did not fold; a
    QARepVGG block (3x3 conv+BN, 1x1 conv, identity, one BN after the sum); a ResNet shortcut (not a
    branch sum: the conv reads another tensor); a depthwise 3x3 beside a dense 1x1 (would cost more as
    one kernel); a conv with asymmetric pads beside a 1x1 (misaligned: stays)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = []

    def w(name: str, *shape: int, positive: bool = False):
        value = rng.uniform(0.5, 2.0, shape) if positive else rng.standard_normal(shape) * 0.3
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def bn(x: str, out: str, c: int):
        return helper.make_node("BatchNormalization", [x, w(out + ".g", c), w(out + ".b", c), w(out + ".m", c),
                                                       w(out + ".v", c, positive=True)], [out], epsilon=1e-5)

    c = 8
    nodes = [
        helper.make_node("Conv", ["image", w("stem", c, 3, 3, 3)], ["s"], pads=[1, 1, 1, 1]),
        bn("s", "s_bn", c), helper.make_node("Relu", ["s_bn"], ["x"]),
        # QARepVGG block
        helper.make_node("Conv", ["x", w("q3", c, c, 3, 3)], ["q3o"], pads=[1, 1, 1, 1]), bn("q3o", "q3n", c),
        helper.make_node("Conv", ["x", w("q1", c, c, 1, 1)], ["q1o"]),
        helper.make_node("Add", ["q3n", "q1o"], ["qs"]), helper.make_node("Add", ["qs", "x"], ["qsum"]),
        bn("qsum", "qbn", c), helper.make_node("Relu", ["qbn"], ["y"]),
        # ResNet shortcut: relu(conv(relu(conv(y))) + y)
        helper.make_node("Conv", ["y", w("r1", c, c, 3, 3)], ["r1o"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["r1o"], ["r1r"]),
        helper.make_node("Conv", ["r1r", w("r2", c, c, 3, 3)], ["r2o"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["r2o", "y"], ["rs"]), helper.make_node("Relu", ["rs"], ["z"]),
        # depthwise 3x3 + dense 1x1
        helper.make_node("Conv", ["z", w("dw", c, 1, 3, 3)], ["dwo"], pads=[1, 1, 1, 1], group=c),
        helper.make_node("Conv", ["z", w("pw", c, c, 1, 1)], ["pwo"]),
        helper.make_node("Add", ["dwo", "pwo"], ["dws"]),
        # asymmetric pads
        helper.make_node("Conv", ["dws", w("a3", c, c, 3, 3)], ["a3o"], pads=[0, 0, 2, 2]),
        helper.make_node("Conv", ["dws", w("a1", c, c, 1, 1)], ["a1o"]),
        helper.make_node("Add", ["a3o", "a1o"], ["as"]),
        helper.make_node("GlobalAveragePool", ["as"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", w("fc", 10, c), w("fcb", 10)], ["scores"], transB=1),
    ]
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hand")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_hand_written_graph_fuses_what_is_fusible_and_leaves_the_rest(tmp_path: Path) -> None:
    from deploykit.fuse.onnx_graph import fuse_onnx_file

    given = hand_graph(tmp_path / "hand.onnx")
    fused = tmp_path / "fused.onnx"
    report = fuse_onnx_file(given, fused, input_size=16, runner=ort_runner)
    onnx.checker.check_model(onnx.load(str(fused)))
    assert report.equivalent and report.random_bn.max_rel_error <= 1e-5
    assert report.convs_with_bn == 3  # the stem's, the QARepVGG 3x3's and the BN after its sum
    assert report.branch_sums == 2  # 3x3 + 1x1, then + identity; not the shortcut, not the misaligned pair
    assert report.kept_apart == ["dws"]  # unnamed nodes are named by their output
    nodes = onnx.load(str(fused)).graph.node
    assert op_count(fused, "BatchNormalization") == 0
    # stem, QARepVGG (one conv), two shortcut convs, depthwise + pointwise, the misaligned pair: 8 convs
    assert op_count(fused, "Conv") == 8 and op_count(fused, "Add") == 3
    assert [n.output[0] for n in nodes if n.op_type == "Conv" and n.input[0] == "x"] == ["qbn"]
    x = np.random.default_rng(2).standard_normal((4, 3, 16, 16)).astype(np.float32)
    reference = ort_outputs(given, x)
    assert np.abs(ort_outputs(fused, x) - reference).max() <= 1e-5 * np.abs(reference).max()


def test_a_wrong_fold_fails_the_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The certificate is not a formality: a fold that ignores the BN means (invisible on an untrained export's
    statistics) is caught by the run with random BN statistics, and nothing is written."""
    from deploykit.errors import FusionError
    from deploykit.fuse import kernels
    from deploykit.fuse.onnx_graph import fuse_onnx_file

    real = kernels.affine_scale_shift
    monkeypatch.setattr(kernels, "affine_scale_shift", lambda mean, *a, **k: real(mean * 0, *a, **k))
    fused = tmp_path / "fused.onnx"
    with pytest.raises(FusionError, match="changed its outputs"):
        fuse_onnx_file(hand_graph(tmp_path / "hand.onnx"), fused, input_size=16, runner=ort_runner)
    assert not fused.exists()


def test_build_fuses_a_users_export_and_no_fuse_keeps_it(tmp_path: Path) -> None:
    """The CLI on a user's export of a RepVGG as trained: the artifact holds the fused graph (certified,
    recorded in build.json, verified against the file as given); --no-fuse builds the file as given and
    says what that costs."""
    from tiny_model import write_tiny_model

    from deploykit.loading import load_model
    from deploykit.onnxio import summed_branches

    given = users_export(load_model(write_tiny_model(tmp_path, None)).model, tmp_path / "user.onnx")
    blocks = len(summed_branches(given))
    assert blocks == 5  # the tiny RepVGG: a stem and one block per stage
    for flags, out in (((), tmp_path / "fused"), (("--no-fuse",), tmp_path / "given")):
        built = run_cli("build", str(given), "-t", "onnxruntime", "-p", "fp32", "--verify-samples", "8", *flags,
                        "--out", str(out))
        assert built.returncode == 0, built.stderr
    fused_meta = json.loads((tmp_path / "fused" / "build.json").read_text())
    given_meta = json.loads((tmp_path / "given" / "build.json").read_text())
    fusion = fused_meta["model"]["fusion"]
    assert fusion["graph"] == "onnx" and fusion["equivalent"] and fusion["branch_sums"] >= blocks
    assert fused_meta["model"]["form"] == "train" and fused_meta["warnings"] == []
    assert fused_meta["verification"]["reference"].startswith("onnxruntime fp32 on the original ONNX")
    artifact = tmp_path / "fused" / next(f for f in fused_meta["files"] if f.endswith(".onnx"))
    assert summed_branches(artifact) == [] and op_count(artifact, "Conv") < op_count(given, "Conv")
    assert given_meta["model"]["fusion"] is None and given_meta["model"]["form"] == "deploy"
    note = f"user.onnx sums parallel convolution branches in {blocks} blocks"
    assert any(w.startswith(note) and "--no-fuse" in w for w in given_meta["warnings"])


def test_fuse_cli_rewrites_an_onnx_file(tmp_path: Path) -> None:
    """`deploykit fuse FILE.onnx`: a certified .onnx out (and JSON report); nothing to fuse or a non-.onnx
    --out is one line and exit 2; a hostile file is one line and exit 1; nothing is left behind."""
    given = hand_graph(tmp_path / "hand.onnx")
    done = run_cli("fuse", str(given), "--out", str(tmp_path / "fused.onnx"), "--report", str(tmp_path / "fused.json"))
    assert done.returncode == 0, done.stderr
    assert "ONNX graph re-parameterized: 2 sums of parallel branches" in done.stdout
    assert json.loads((tmp_path / "fused.json").read_text())["certificate"]["equivalent"] is True
    assert op_count(tmp_path / "fused.onnx", "BatchNormalization") == 0
    again = run_cli("fuse", str(tmp_path / "fused.onnx"), "--out", str(tmp_path / "twice.onnx"))
    assert again.returncode == 2 and "has nothing to fuse" in again.stderr.strip().splitlines()[-1]
    wrong = run_cli("fuse", str(given), "--out", str(tmp_path / "fused.pt"))
    assert wrong.returncode == 2 and "fused into an .onnx file" in wrong.stderr.strip().splitlines()[-1]
    hostile = tmp_path / "hostile.onnx"
    hostile.write_bytes(b"\x08\x07" + bytes(range(256)) * 4)
    bad = run_cli("fuse", str(hostile), "--out", str(tmp_path / "h.onnx"))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.json", "fused.onnx", "hand.onnx", "hostile.onnx"]

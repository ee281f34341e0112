"""`deploykit advise` end to end on a tiny model with two real targets, and `build --target auto`."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from deploykit.backends.base import BACKENDS

from conftest import CIFAR_TGZ, run_cli

# One worker runs this module: its module-scoped advise runs (minutes on 2 cores) are then made once,
# not once per xdist worker.
pytestmark = pytest.mark.xdist_group("advise")

FAST = ("--rounds", "2", "--round-seconds", "0.02", "--warmup-seconds", "0.1", "--eval-samples", "64",
        "--calib-samples", "16")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny"), CIFAR_TGZ if CIFAR_TGZ.is_file() else None)


@pytest.fixture(scope="module")
def advised(tiny: str, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    work = tmp_path_factory.mktemp("advise")
    calib = ("--calib", str(CIFAR_TGZ)) if CIFAR_TGZ.is_file() else ()
    done = run_cli("advise", tiny, *calib, "-t", "onnxruntime", "-t", "openvino", "-p", "fp32", "-p", "int8",
                   "--max-drop", "100", "--work", str(work), "--no-variants", *FAST, timeout=600)  # variants: below
    return done, work, calib


def test_advise_prints_a_ranked_table_and_picks_one(advised) -> None:
    done, work, calib = advised
    assert done.returncode == 0, done.stderr
    data = json.loads((work / "advice.json").read_text())
    rows = [r for r in data["candidates"] if not r["anchor"]]
    assert {(r["target"], r["precision"]) for r in rows} == {(t, p) for t in ("onnxruntime", "openvino")
                                                             for p in ("fp32", "int8")}
    for r in rows:
        assert r["error"] is None and r["latency"]["rounds"] == 2 and r["speedup_vs_baseline"]["ratio"] > 0
        assert 0.0 <= r["top1"] <= 1.0 and r["executed"] != "-"
        assert r["executed"].startswith("int8 + ") == (r["precision"] == "int8"), r  # int8 and its float parts
    medians = [r["latency"]["median_ms"] for r in rows]
    assert medians == sorted(medians)  # ranked by latency
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0] == data["chosen"]
    assert data["accuracy"].startswith("top-1 on labeled" if calib else "top-1 agreement")
    assert data["device"]["cpu"] and (work / "advice.md").is_file() and (work / "advice.csv").is_file()
    assert "speed-up vs baseline" in done.stdout and "Chosen:" in done.stdout


def test_advise_reuses_cached_builds(advised, tiny: str) -> None:
    done, work, calib = advised
    again = run_cli("advise", tiny, *calib, "-t", "onnxruntime", "-p", "fp32", "--work", str(work),
                    "--out", str(work / "again"), "--max-drop", "100", *FAST)
    assert again.returncode == 0, again.stderr
    assert "onnxruntime fp32: cached" in again.stderr


def test_target_auto_builds_what_advise_chose(advised, tiny: str, tmp_path: Path) -> None:
    done, work, calib = advised
    chosen = json.loads((work / "advice.json").read_text())["chosen"]
    out = tmp_path / "auto"
    built = run_cli("build", tiny, "--target", "auto", "--advice", str(work / "advice.json"), "--max-drop", "100",
                    *calib, "--calib-samples", "16", "--verify-samples", "16", "--out", str(out))
    assert built.returncode == 0, built.stderr
    meta = json.loads((out / "build.json").read_text())
    assert (meta["target"], meta["precision"]) == (chosen["target"], chosen["precision"])
    assert f"--target auto: building {chosen['target']} {chosen['precision']}" in built.stdout


def test_a_budget_nothing_meets_exits_3_with_the_table(advised, tiny: str) -> None:
    done, work, calib = advised
    failed = run_cli("advise", tiny, *calib, "-t", "onnxruntime", "-p", "fp32", "--work", str(work),
                     "--out", str(work / "strict"), "--max-drop", "-200", *FAST)
    assert failed.returncode == 3
    assert "speed-up vs baseline" in failed.stdout  # the table is still printed
    assert failed.stderr.strip().splitlines()[-1].startswith("error: no artifact within --max-drop -200 points")
    auto = run_cli("build", tiny, "--target", "auto", "--advice", str(work / "advice.json"), "--max-drop", "-200")
    assert auto.returncode == 3 and "no artifact in" in auto.stderr


def test_advise_errors_are_one_line(tiny: str, tmp_path: Path) -> None:
    unknown = run_cli("advise", tiny, "-t", "nosuch", "--work", str(tmp_path))
    assert unknown.returncode == 1 and "unknown target 'nosuch'" in unknown.stderr.strip().splitlines()[-1]
    wrong = run_cli("advise", tiny, "-t", "onnxruntime", "-p", "bf16", "--work", str(tmp_path))
    assert wrong.returncode == 2
    assert "target onnxruntime does not build precision bf16" in wrong.stderr.strip().splitlines()[-1]


def test_every_row_not_chosen_says_why() -> None:
    """Faster rows over budget, slower rows over budget and slower rows within budget each get a note."""
    from types import SimpleNamespace

    from deploykit.advise import Candidate, choose

    def row(label: str, ms: float, drop: float) -> Candidate:
        return Candidate(label, summary=SimpleNamespace(median_ms=ms), drop=drop)

    fast_bad, chosen, slow_ok, slow_bad = row("a", 1.0, 5.0), row("b", 2.0, 0.5), row("c", 3.0, 0.1), row("d", 4.0, 9.0)
    assert choose([slow_bad, chosen, fast_bad, slow_ok], max_drop=1.0) is chosen
    assert chosen.chosen and chosen.rejected is None
    assert fast_bad.rejected == "top-1 drop 5.00 > budget 1 points"
    assert slow_bad.rejected == "top-1 drop 9.00 > budget 1 points"
    assert slow_ok.rejected == "within budget, slower than the chosen artifact"


# CPU flag sets the variants are planned for: x86 without any int8 dot product, x86 with VNNI, arm64.
AVX2_ONLY = frozenset({"sse4_1", "avx", "avx2", "fma"})
WITH_VNNI = AVX2_ONLY | {"avx512f", "avx512_vnni"}
ARM = frozenset({"asimd", "asimddp"})


@pytest.mark.parametrize("flags", [AVX2_ONLY, WITH_VNNI, ARM], ids=["avx2", "vnni", "arm"])
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_variant_is_valid_options_that_change_the_defaults(name: str, flags: frozenset[str]) -> None:
    """Any registered backend: each variant resolves as --option values would, and is not the defaults."""
    from deploykit.backends.base import get_backend, resolve_options

    backend = get_backend(name)
    for precision in backend.precisions:
        defaults = resolve_options(name, backend.options, {}, precision)
        for variant, options in backend.variants(precision, flags).items():
            assert variant and options, (precision, variant)
            resolved = resolve_options(name, backend.options, options, precision)
            assert resolved != defaults, f"{name} {precision} variant {variant!r} is the defaults"


def test_onnxruntime_offers_its_fast_int8_kernels_only_where_they_saturate() -> None:
    from deploykit.backends.base import get_backend

    ort = get_backend("onnxruntime")
    fast = ort.variants("int8", AVX2_ONLY)
    assert set(fast) == {"int16 sums", "7-bit weights", "per-tensor weights"}
    assert all(v["x64_quant_precision"] is False for v in fast.values())
    assert ort.variants("int8", WITH_VNNI) == {} and ort.variants("int8", ARM) == {}
    assert ort.variants("fp32", AVX2_ONLY) == {}


@pytest.fixture(scope="module")
def advised_variants(tiny: str, tmp_path_factory: pytest.TempPathFactory):
    """advise in-process on an x86 CPU without VNNI (flags forced, so it runs the same on every CPU)."""
    pytest.importorskip("onnxruntime")
    import deploykit.precision as precision
    from deploykit.advise import AdviseRequest, advise

    work = tmp_path_factory.mktemp("advise-variants")
    calib = str(CIFAR_TGZ) if CIFAR_TGZ.is_file() else None
    request = AdviseRequest(model=tiny, calib=calib, targets=("onnxruntime",), precisions=("int8",), max_drop=100.0,
                            calib_samples=16, eval_samples=64, rounds=2, round_seconds=0.02, warmup_seconds=0.1,
                            work=work)
    real = precision.cpu_flags
    precision.cpu_flags = lambda: AVX2_ONLY
    try:
        with_variants = advise(request)
        without = advise(dataclasses.replace(request, variants=False))
    finally:
        precision.cpu_flags = real
    return with_variants, without


def test_advise_builds_scores_and_times_each_variant(advised_variants) -> None:
    from deploykit.report import advice as render

    result, without = advised_variants
    rows = {c.variant: c for c in result.candidates}
    assert set(rows) == {None, "int16 sums", "7-bit weights", "per-tensor weights"}
    assert [c.variant for c in without.candidates] == [None]
    for variant, row in rows.items():
        assert row.error is None and row.summary is not None and row.top1 is not None, variant
        built = json.loads((row.path / "build.json").read_text())
        for key, value in row.options.items():  # the build ran with the variant's options
            assert built["options"][key] == value, (variant, key)
        # the default keeps ORT's exact u8u8 path; every variant runs the saturating kernels
        assert ("session.x64quantprecision" in built["backend"]["session_config"]) == (variant is None), variant
    assert len({row.path for row in rows.values()}) == 4  # one cached folder each
    data = result.to_dict()
    assert {r["variant"] for r in data["candidates"]} == set(rows)
    assert "| per-tensor weights |" in render.markdown(result)
    picked = [dataclasses.replace(c, chosen=c.variant == "per-tensor weights") for c in result.candidates]
    chosen_line = render.header(dataclasses.replace(result, candidates=picked))[-1]  # says how to build it
    assert "onnxruntime int8 [per-tensor weights]" in chosen_line
    assert "--option per_channel=false --option x64_quant_precision=false" in chosen_line
    table = csv.DictReader(render.to_csv(result).splitlines())
    assert json.loads(next(r for r in table if r["variant"] == "int16 sums")["options"]) == {"x64_quant_precision": False}
    assert "onnxruntime int8 [int16 sums]" in {c.label for c in result.candidates}


def test_target_auto_builds_the_chosen_variant(advised_variants, tiny: str, tmp_path: Path) -> None:
    """An advice.json whose fastest row within budget is a variant: build --target auto uses its options."""
    from deploykit.report import advice as render

    result, _ = advised_variants
    data = result.to_dict()
    for row in data["candidates"]:  # make the per-tensor variant the chosen, fastest row within budget
        per_tensor = row["variant"] == "per-tensor weights"
        row["drop_points"] = 0.0 if per_tensor else 50.0
    render.write(result, tmp_path)  # a real advice.json, then the edited rows
    advice = tmp_path / "advice.json"
    advice.write_text(json.dumps({**json.loads(advice.read_text()), "candidates": data["candidates"]}))
    calib = ("--calib", str(CIFAR_TGZ)) if CIFAR_TGZ.is_file() else ()
    out = tmp_path / "auto"
    built = run_cli("build", tiny, "--target", "auto", "--advice", str(advice), "--max-drop", "1", *calib,
                    "--calib-samples", "16", "--verify-samples", "16", "--out", str(out))
    assert built.returncode == 0, built.stderr
    assert ("--target auto: building onnxruntime int8 --option per_channel=false "
            "--option x64_quant_precision=false") in built.stdout
    meta = json.loads((out / "build.json").read_text())
    assert meta["options"]["per_channel"] is False and meta["options"]["x64_quant_precision"] is False


def write_foreign_onnx(path: Path) -> Path:
    """A small CNN written with onnx.helper (no PyTorch, no deploykit exporter): Conv-BN-Relu, strided
    Conv-Relu, global pool, Gemm; seeded random weights, a symbolic batch, opset 17."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)

    def const(name: str, *shape: int, scale: float = 0.3, offset: float = 0.0) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale + offset).astype(np.float32), name)

    inits = [const("w1", 8, 3, 3, 3), const("b1", 8), const("gamma", 8, offset=1.0), const("beta", 8),
             const("mean", 8), numpy_helper.from_array(rng.uniform(0.5, 2.0, 8).astype(np.float32), "var"),
             const("w2", 16, 8, 3, 3, scale=0.15), const("b2", 16), const("fc", 10, 16), const("fcb", 10)]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"], epsilon=1e-5),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["scores"], transB=1),
    ]
    graph = helper.make_graph(nodes, "foreign", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                               ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hand")
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def advised_onnx(tmp_path_factory: pytest.TempPathFactory):
    """advise on an .onnx file deploykit did not write: the reference is ONNX Runtime on the file."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("advise-onnx")
    model = write_foreign_onnx(folder / "foreign.onnx")
    calib = ("--calib", str(CIFAR_TGZ), "--agreement") if CIFAR_TGZ.is_file() else ()  # not CIFAR's classes
    done = run_cli("advise", str(model), *calib, "-t", "onnxruntime", "-t", "openvino", "-p", "fp32", "-p", "int8",
                   "--max-drop", "100", "--work", str(folder / "work"), "--no-variants", *FAST, timeout=600)
    return done, folder, model, calib


def test_advise_on_a_foreign_onnx_file_measures_against_it(advised_onnx) -> None:
    import onnxruntime as ort

    from deploykit.advise import ONNX_BASELINE
    from deploykit.calib import load_calibration

    done, folder, model, calib = advised_onnx
    assert done.returncode == 0, done.stderr
    data = json.loads((folder / "work" / "advice.json").read_text())
    assert data["baseline"]["label"] == ONNX_BASELINE and data["baseline"]["target"] == "onnxruntime"
    assert data["accuracy"].startswith("top-1 agreement")
    assert data["notes"] == []  # a plain CNN: no unfused branches to tell the user about
    rows = {(r["target"], r["precision"]): r for r in data["candidates"] if not r["anchor"]}
    assert set(rows) == {(t, p) for t in ("onnxruntime", "openvino") for p in ("fp32", "int8")}
    for key, row in rows.items():
        assert row["error"] is None and row["speedup_vs_baseline"]["ratio"] > 0, key
        built = json.loads((Path(row["path"]) / "build.json").read_text())
        assert built["model"]["source"] == "onnx", key  # built from the file, nothing re-exported
    for target in ("onnxruntime", "openvino"):  # FP32 of the same graph agrees with the file on every image
        assert rows[target, "fp32"]["top1"] == 1.0, rows[target, "fp32"]
    assert "speed-up vs baseline" in done.stdout
    assert f"| {ONNX_BASELINE} | fp32 |" in (folder / "work" / "advice.md").read_text()  # the baseline row
    # What a user would do by hand: the file and the INT8 artifact on plain ONNX Runtime sessions (with
    # the session settings build.json records), on the same held-out images: the same agreement.
    held = load_calibration(calib[1] if calib else None, input_size=32, num_samples=1, num_verify=64, seed=7).held_out
    int8 = Path(rows["onnxruntime", "int8"]["path"])
    built = json.loads((int8 / "build.json").read_text())
    options = ort.SessionOptions()
    for key, value in built["backend"]["session_config"].items():
        options.add_session_config_entry(key, value)
    quantized = next(name for name in built["files"] if name.endswith(".onnx"))
    by_hand = [ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
               .run(None, {"image": held})[0].argmax(1)
               for path, opts in ((model, ort.SessionOptions()), (int8 / quantized, options))]
    assert float((by_hand[0] == by_hand[1]).mean()) == rows["onnxruntime", "int8"]["top1"]


def test_target_auto_builds_from_the_onnx_file(advised_onnx, tmp_path: Path) -> None:
    done, folder, model, calib = advised_onnx
    chosen = json.loads((folder / "work" / "advice.json").read_text())["chosen"]
    out = tmp_path / "auto"
    built = run_cli("build", str(model), "--target", "auto", "--advice", str(folder / "work" / "advice.json"),
                    "--max-drop", "100", *calib[:2], "--calib-samples", "16", "--verify-samples", "16", "--out", str(out))
    assert built.returncode == 0, built.stderr
    meta = json.loads((out / "build.json").read_text())
    assert (meta["target"], meta["precision"], meta["model"]["source"]) == (chosen["target"], chosen["precision"], "onnx")


def test_advise_on_onnx_skips_targets_that_build_from_pytorch(tmp_path: Path) -> None:
    """Without -t, the PyTorch targets are rows saying why; asked for by name, one line and exit 2."""
    from deploykit.advise import AdviseRequest, plan
    from deploykit.backends.base import get_backend

    model = str(write_foreign_onnx(tmp_path / "foreign.onnx"))
    todo, skipped = plan(AdviseRequest(model=model, precisions=("fp32",), variants=False))
    from_module = {name for name in BACKENDS if get_backend(name).builds_from_module}
    assert from_module and not from_module & {row.target for row in todo}
    assert {row.target for row in skipped} >= {n for n in from_module if get_backend(n).version() is not None}
    assert all("builds from a PyTorch model" in row.error for row in skipped if row.target in from_module)
    named = run_cli("advise", model, "-t", "torch", "--work", str(tmp_path / "w"))
    assert named.returncode == 2
    assert "target torch builds from a PyTorch model, not from an .onnx file" in named.stderr.strip().splitlines()[-1]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(Path(model).read_bytes()[:100])
    failed = run_cli("advise", str(broken), "-t", "onnxruntime", "--work", str(tmp_path / "w"))
    assert failed.returncode == 1 and "is not a valid ONNX model" in failed.stderr.strip().splitlines()[-1]


def test_advice_notes_are_printed_and_kept(advised_variants) -> None:
    from deploykit.report import advice as render

    result, _ = advised_variants
    noted = dataclasses.replace(result, notes=["x.onnx sums parallel convolution branches in 3 blocks"])
    assert render.header(noted)[-1] == "Note: x.onnx sums parallel convolution branches in 3 blocks."
    assert noted.to_dict()["notes"] == noted.notes and result.to_dict()["notes"] == []

"""`deploykit advise` end to end on a tiny model with two real targets, and `build --target auto`."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

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
        assert r["error"] is None and r["latency"]["rounds"] == 2 and r["speedup_vs_eager"]["ratio"] > 0
        assert 0.0 <= r["top1"] <= 1.0 and r["executed"] != "-"
        assert r["executed"].startswith("int8 + ") == (r["precision"] == "int8"), r  # int8 and its float parts
    medians = [r["latency"]["median_ms"] for r in rows]
    assert medians == sorted(medians)  # ranked by latency
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0] == data["chosen"]
    assert data["accuracy"].startswith("top-1 on labeled" if calib else "top-1 agreement")
    assert data["device"]["cpu"] and (work / "advice.md").is_file() and (work / "advice.csv").is_file()
    assert "speed-up vs eager" in done.stdout and "Chosen:" in done.stdout


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
    assert "speed-up vs eager" in failed.stdout  # the table is still printed
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

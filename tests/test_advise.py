"""`deploykit advise` end to end on a tiny model with two real targets, and `build --target auto`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CIFAR_TGZ, run_cli

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
                   "--max-drop", "100", "--work", str(work), *FAST, timeout=600)
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

"""`deploykit report latency`: merging devices, marks, comparisons and verdicts, bad files."""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from deploykit.backends.base import get_backend
from deploykit.bench import results
from deploykit.bench.spec import make_sweep
from deploykit.bench.sweep import run_sweep
from deploykit.errors import DeployError
from deploykit.report.write import write_latency_report

TINY_SOURCE = '''
from torch import nn

class Tiny(nn.Module):
    default_input_size = 16

    def __init__(self):
        super().__init__()
        self.conv3 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head((self.conv3(x) + self.conv1(x)).relu().mean((2, 3)))

def tiny():
    return Tiny()
'''

CLAIM = "fused is faster than multi-branch"


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real rows: a tiny multi-branch net, train and deploy forms, on ONNX Runtime (+ torch-cuda, skipped here)."""
    if get_backend("onnxruntime").version() is None:
        pytest.skip("onnxruntime is not installed")
    root = tmp_path_factory.mktemp("report")
    (root / "tiny.py").write_text(TINY_SOURCE)
    spec = make_sweep(
        name="fusion", models=[{"name": f"{root / 'tiny.py'}:tiny", "label": "tiny"}], forms=["train", "deploy"],
        targets=["onnxruntime", "torch-cuda"], rounds=2, min_round_time=0.005, warmup_min_time=0.0,
        warmup_max_time=0.2, cache_dir=str(root / "cache"),
        compare=[{"name": "fused-vs-multibranch", "axis": "form", "baseline": "train", "candidate": "deploy",
                  "claims": [{"text": CLAIM, "expect": "candidate_faster", "targets": ["onnxruntime", "torch-cuda"]}]}],
    )
    run_sweep(spec, root / "here.jsonl", command="deploykit bench --sweep fusion.yaml --results here.jsonl")
    return root / "here.jsonl"


def _other_machine(rows: list[dict], ort_version: str) -> list[dict]:
    """The same rows as if measured on another machine with another ONNX Runtime."""
    moved = []
    for row in copy.deepcopy(rows):
        row.pop("_source", None)
        row["device"].update(id="0123456789ab", cpu="Other CPU 9000", isa=["AVX2"])
        row["versions"]["onnxruntime"] = ort_version
        if row["status"] == "ok":
            row["build"]["runtime_version"] = ort_version
        moved.append(row)
    return moved


def _write(path: Path, rows: list[dict]) -> Path:
    for row in rows:
        row.pop("_source", None)
        results.append_row(path, row)
    return path


def _with_ratio(rows: list[dict], ratio: float) -> list[dict]:
    """Rows whose deploy rounds are ``ratio`` x the train rounds (controlled numbers for the verdict)."""
    rows = copy.deepcopy(rows)
    train = next(r for r in rows if r["status"] == "ok" and r["config"]["form"] == "train")
    train["round_medians_ms"] = [10.0, 11.0, 10.5, 10.2, 10.8]
    for row in rows:
        if row["status"] == "ok" and row["config"]["form"] == "deploy":
            row["round_medians_ms"] = [ratio * x for x in train["round_medians_ms"]]
    return rows


def test_two_devices_merge_into_one_table_in_every_format(measured: Path, tmp_path: Path):
    here = results.read_rows(measured)
    there = _write(tmp_path / "there.jsonl", _other_machine(here, "0.0.1"))
    written = write_latency_report([measured, there], tmp_path / "reports" / "merged", command="deploykit report ...")
    assert written.devices == 2
    md, html = written.markdown.read_text(), written.html.read_text()
    for text in (md, html):
        assert "Other CPU 9000 (012345)" in text
        assert here[0]["device"]["cpu"] in text
    table = list(csv.DictReader(written.csv.open()))
    measured_rows = [r for r in table if r["status"] == "ok"]
    assert {r["device_id"] for r in measured_rows} == {here[0]["device"]["id"], "0123456789ab"}
    assert len(measured_rows) == 4 and all(float(r["median_ms"]) > 0 for r in measured_rows)
    # rows made with another onnxruntime are marked, with both versions named
    assert sum("†" in r["marks"] for r in measured_rows) == 2
    assert "rows from different tool versions" in md and "onnxruntime 0.0.1" in md
    # one comparison per device, each from that device's own paired rounds
    assert md.count("| fused-vs-multibranch |") == 2
    assert "deploykit bench --sweep fusion.yaml --results here.jsonl" in md and "deploykit report ..." in md
    assert "AVX2" in md
    for plot in written.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written.plots, "matplotlib is installed here, so the latency and ratio plots exist"


@pytest.mark.parametrize(
    ("ratio", "expected", "tally"),
    [
        (0.8, "deploy faster by 20.0% [20.0%, 20.0%] on onnxruntime — claim holds", "holds"),
        (1.02, "deploy slower by 2.0% [2.0%, 2.0%] on onnxruntime — within noise (<5%)", "within noise"),
        (1.25, "deploy slower by 25.0% [25.0%, 25.0%] on onnxruntime — claim does not hold", "does not hold"),
    ],
)
def test_verdict_is_computed_from_the_measured_ratio(measured: Path, tmp_path: Path, ratio: float, expected: str,
                                                     tally: str):
    rows = _write(tmp_path / "r.jsonl", _with_ratio(results.read_rows(measured), ratio))
    md = write_latency_report([rows], tmp_path / "report").markdown.read_text()
    assert expected in md
    assert f"on onnxruntime: 1 {tally} (of 1 configurations). Claim: {CLAIM}" in md


@pytest.mark.parametrize(
    ("factors", "expected"),
    [
        ([1.01] * 5, "claim holds"),
        ([1.2] * 5, "claim does not hold"),
        ([0.8, 1.2, 1.0, 0.85, 1.15], "inconclusive (interval wider than ±5%)"),
    ],
    ids=["equivalent", "different", "too-noisy-to-tell"],
)
def test_a_claim_of_no_difference_needs_a_tight_interval(measured: Path, tmp_path: Path, factors: list[float],
                                                        expected: str):
    rows = _with_ratio(results.read_rows(measured), 1.0)
    for row in rows:
        row["sweep"]["compare"][0]["claims"][0]["expect"] = "same"
        if row["status"] == "ok" and row["config"]["form"] == "deploy":
            row["round_medians_ms"] = [f * x for f, x in zip(factors, row["round_medians_ms"])]
    md = write_latency_report([_write(tmp_path / "r.jsonl", rows)], tmp_path / "report").markdown.read_text()
    assert f"on onnxruntime — {expected}" in md


def test_unmeasured_targets_and_unstable_rows_are_said_so(measured: Path, tmp_path: Path):
    md = write_latency_report([measured], tmp_path / "report").markdown.read_text()
    assert f"**fused-vs-multibranch** on torch-cuda: not measured: " in md
    assert "## Not measured" in md
    assert "2 rounds < 5" in md  # the fixture's 2 rounds are flagged unstable
    assert "| ~ |" in md or " ~ |" in md


def test_existing_report_is_kept_unless_forced(measured: Path, tmp_path: Path):
    write_latency_report([measured], tmp_path / "r", plots=False)
    with pytest.raises(DeployError, match="r.md exists; pass --force"):
        write_latency_report([measured], tmp_path / "r", plots=False)
    write_latency_report([measured], tmp_path / "r", plots=False, force=True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{row}\n{{not json\n", "bad.jsonl:2: not valid JSON"),
        ("{row}\n\n[1, 2]\n", "bad.jsonl:3: expected a JSON object, got list"),
        ('{row}\n{{"status": "ok"}}\n', "bad.jsonl:2: not a deploykit result row (missing schema, config_id"),
        ('{row}\n{{"schema": "deploykit.bench/1", "stat', "bad.jsonl:2: not valid JSON"),
    ],
    ids=["garbage", "not-an-object", "not-a-row", "truncated"],
)
def test_malformed_result_files_are_reported_by_name_and_line(measured: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str], text: str,
                                                              message: str):
    from deploykit.cli import main

    row = measured.read_text().splitlines()[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text.format(row=row))
    with pytest.raises(SystemExit) as done:
        main(["report", "latency", str(bad), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert done.value.code == 1
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_rows_are_never_appended_after_an_incomplete_line(measured: Path, tmp_path: Path):
    path = tmp_path / "r.jsonl"
    path.write_text(measured.read_text().splitlines()[0] + "\n" + '{"schema": "deploy')
    row = json.loads(measured.read_text().splitlines()[0])
    with pytest.raises(DeployError, match="the last line is incomplete"):
        results.append_row(path, row)

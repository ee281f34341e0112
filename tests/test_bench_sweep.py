"""Sweeps: spec validation, interleaved rounds, resume, failure rows, real backends end to end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deploykit.backends.base import BACKENDS, BackendBase, get_backend
from deploykit.bench import results
from deploykit.bench.spec import configurations, load_sweep, make_sweep
from deploykit.bench.sweep import run_sweep
from deploykit.errors import DeployError, UsageError

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))

# A RepVGG-style net small enough to build on every backend in about a second: each block
# sums a 3x3 conv, a 1x1 conv and an identity BatchNorm, so `deploy` really fuses something.
TINY_SOURCE = '''
from torch import nn

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.conv1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv3(x) + self.conv1(x) + self.identity(x))

class Tiny(nn.Module):
    default_input_size = 16

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))

def tiny():
    return Tiny()
'''

FAST = dict(rounds=2, min_round_time=0.005, warmup_min_time=0.0, warmup_max_time=0.2)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny.py"
    path.write_text(TINY_SOURCE)
    return f"{path}:tiny"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("bench-cache"))


# --- the sweep spec ---------------------------------------------------------------------


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_reproduction_sweeps_load_and_declare_their_comparisons(path: Path):
    spec = load_sweep(path)
    assert spec.name == path.stem
    assert spec.compare, "a reproduction sweep says what it compares"
    assert len(configurations(spec)) == (len(spec.models) * len(spec.forms) * len(spec.targets) * len(spec.precisions)
                                         * len(spec.batch_sizes) * len(spec.threads) * len(spec.input_sizes))
    assert spec.rounds >= 5


def test_unknown_key_in_a_sweep_file_lists_the_valid_keys(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [repvgg_a0]\nthread: [2]\n")
    with pytest.raises(UsageError, match=r"bad.yaml: unknown key 'thread'; valid keys: name, .*threads"):
        load_sweep(path)
    path.write_text("models: [{name: repvgg_a0, kwarg: {}}]\n")
    with pytest.raises(UsageError, match=r"unknown key 'models.0.kwarg'; valid keys: name, label, kwargs, weights_from"):
        load_sweep(path)


def test_comparisons_must_name_values_of_the_sweep():
    with pytest.raises(UsageError, match="comparison x: 'b' is not one of the sweep's models"):
        make_sweep(models=["a"], compare=[{"name": "x", "axis": "model", "baseline": "a", "candidate": "b"}])
    with pytest.raises(UsageError, match="rounds"):
        make_sweep(models=["a"], rounds=1)


def test_grid_is_grouped_by_input_batch_and_threads():
    spec = make_sweep(models=["a", "b"], targets=["onnxruntime", "openvino"], batch_sizes=[1, 8], threads=[1, 2])
    configs = configurations(spec)
    assert len(configs) == 16
    groups = [c.group for c in configs]
    # each group is contiguous: 4 configurations (2 models x 2 targets) per (size, batch, threads)
    assert groups == sorted(groups, key=groups.index) and len(set(groups)) == 4
    assert [c.model.label for c in configs[:4]] == ["a", "a", "b", "b"]


# --- execution order, resume, failures (recorded timings, no backend) -------------------


class Recorded:
    """A runner that times itself: logs (label, n) per measure call and returns 1 ms per iteration."""

    def __init__(self, label: str, log: list[tuple[str, int]]) -> None:
        self.label, self.log, self.threads = label, log, 1

    def __call__(self, inputs):
        return np.zeros((len(inputs), 10), np.float32)

    def timer(self, inputs):
        def measure(n: int) -> np.ndarray:
            self.log.append((self.label, n))
            return np.full(n, 1e-3)

        return measure


class SelfTimed(BackendBase):
    """A backend whose runners time themselves (as a GPU backend's do)."""

    name, extra = "recorded", "all"

    def timer(self, runner: Recorded, inputs):
        return runner.timer(inputs)

    def clock(self) -> str:
        return "recorded"


class Prepared:
    def __init__(self, runner: Recorded) -> None:
        self.runner, self.inputs, self.artifact, self.build = runner, np.zeros((1, 3, 8, 8), np.float32), None, {}
        self.backend = SelfTimed()


def recording_prepare(log: list[tuple[str, int]], prepared: list[str], fail: dict[str, BaseException] | None = None):
    def prepare(config, spec):
        key = f"{config.model.label}/b{config.batch}"
        prepared.append(key)
        if fail and key in fail:
            raise fail[key]
        return Prepared(Recorded(key, log))

    return prepare


def test_rounds_are_interleaved_across_the_group(tmp_path: Path):
    log: list[tuple[str, int]] = []
    spec = make_sweep(models=["A", "B", "C"], rounds=3, min_round_time=0.01, warmup_min_time=0.0)
    run_sweep(spec, tmp_path / "r.jsonl", prepare=recording_prepare(log, []))
    timed = [label for label, n in log if n > 1]  # warm-up measures one iteration at a time
    assert timed == ["A/b1", "B/b1", "C/b1"] * 3
    rows = results.read_rows(tmp_path / "r.jsonl")
    assert [r["config"]["model"] for r in rows] == ["A", "B", "C"]
    assert len({r["group_run"] for r in rows}) == 1
    assert all(r["round_medians_ms"] == [1.0, 1.0, 1.0] and r["timing"]["iterations_per_round"] == 10 for r in rows)


def test_resume_measures_only_the_missing_configurations(tmp_path: Path):
    out = tmp_path / "r.jsonl"
    spec = make_sweep(models=["A", "B"], batch_sizes=[1, 2], **FAST)
    prepared: list[str] = []
    # Ctrl-C while preparing the second group: the first group's rows are already on disk.
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, out, prepare=recording_prepare([], prepared, {"B/b2": KeyboardInterrupt()}))
    assert [r["config"]["model"] + f"/b{r['config']['batch']}" for r in results.read_rows(out)] == ["A/b1", "B/b1"]
    prepared.clear()
    outcome = run_sweep(spec, out, prepare=recording_prepare([], prepared))
    assert prepared == ["A/b2", "B/b2"]
    assert (outcome.already_done, outcome.measured) == (2, 2)
    prepared.clear()
    assert run_sweep(spec, out, prepare=recording_prepare([], prepared)).measured == 0 and prepared == []


def test_a_failing_configuration_gets_a_row_and_the_sweep_goes_on(tmp_path: Path):
    out = tmp_path / "r.jsonl"
    spec = make_sweep(models=["A", "B", "C"], **FAST)
    fail = {"B/b1": DeployError("mnn crashed converting the model (signal 11)")}
    outcome = run_sweep(spec, out, prepare=recording_prepare([], [], fail))
    rows = {r["config"]["model"]: r for r in results.read_rows(out)}
    assert rows["B"]["status"] == "failed" and rows["B"]["reason"] == "mnn crashed converting the model (signal 11)"
    assert rows["A"]["status"] == rows["C"]["status"] == "ok"
    assert (outcome.measured, outcome.failed) == (2, 1)
    prepared: list[str] = []
    run_sweep(spec, out, prepare=recording_prepare([], prepared))
    assert prepared == []  # failed rows count as done ...
    run_sweep(spec, out, retry_failed=True, prepare=recording_prepare([], prepared))
    assert prepared == ["B/b1"]  # ... unless asked to retry them


# --- real backends -----------------------------------------------------------------------


def _backend_or_skip(name: str):
    backend = get_backend(name)
    if backend.version() is None:
        pytest.skip(backend.missing_reason())
    return backend


@pytest.mark.parametrize("target", sorted(BACKENDS))
def test_sweep_measures_fused_and_multibranch_forms_on_each_target(target: str, tiny_model: str, cache_dir: str,
                                                                   tmp_path: Path):
    _backend_or_skip(target)
    spec = make_sweep(models=[{"name": tiny_model, "label": "tiny"}], forms=["train", "deploy"], targets=[target],
                      cache_dir=cache_dir, **FAST)
    outcome = run_sweep(spec, tmp_path / "r.jsonl")
    rows = results.read_rows(tmp_path / "r.jsonl")
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("reason") for r in rows]
    for row in rows:
        s = row["summary"]
        assert len(row["round_medians_ms"]) == s["rounds"] == 2
        assert 0 < s["min_ms"] <= s["median_ms"] and s["min_ms"] <= s["p90_ms"]
        assert row["build"]["input_size"] == 16 and row["build"]["cached"] is False
        assert row["device"]["id"] and row["versions"]["deploykit"]
    train, deploy = rows
    assert deploy["build"]["params"] < train["build"]["params"]  # the branches were fused
    # a second sweep over the same configurations reuses the built artifacts
    run_sweep(spec, tmp_path / "again.jsonl")
    assert all(r["build"]["cached"] for r in results.read_rows(tmp_path / "again.jsonl"))
    assert outcome.measured == 2


def test_unknown_model_and_target_are_skipped_with_the_reason(tiny_model: str, cache_dir: str, tmp_path: Path):
    _backend_or_skip("onnxruntime")
    spec = make_sweep(models=[{"name": tiny_model, "label": "tiny"}, "no_such_model"],
                      targets=["onnxruntime", "no_such_target"], memory=True, cache_dir=cache_dir, **FAST)
    outcome = run_sweep(spec, tmp_path / "r.jsonl")
    rows = {(r["config"]["model"], r["config"]["target"]): r for r in results.read_rows(tmp_path / "r.jsonl")}
    assert rows[("tiny", "onnxruntime")]["status"] == "ok"
    assert rows[("no_such_model", "onnxruntime")]["status"] == "skipped"
    assert "unknown model 'no_such_model'" in rows[("no_such_model", "onnxruntime")]["reason"]
    assert "unknown target 'no_such_target'" in rows[("tiny", "no_such_target")]["reason"]
    assert (outcome.measured, outcome.skipped) == (1, 3)
    memory = rows[("tiny", "onnxruntime")]["memory"]
    assert memory["process_peak_bytes"] > memory["inference_peak_increase_bytes"] >= 0, memory
    assert memory["process_peak_bytes"] >= memory["rss_after_load_bytes"] > 0
    assert "VmHWM" in memory["method"] or "ru_maxrss" in memory["method"]


def test_same_weights_in_two_layouts_are_transferred_and_checked():
    from deploykit.bench.prepare import transfer_weights
    from deploykit.models import create_model

    linear = create_model("convnext_atto", num_classes=10, cifar=True, mlp="linear").eval()
    conv = create_model("convnext_atto", num_classes=10, cifar=True, mlp="conv1x1").eval()
    assert transfer_weights(linear, conv, 32) < 1e-5
    with pytest.raises(DeployError, match="parameter names differ"):
        transfer_weights(create_model("repvgg_a0", num_classes=10, cifar=True).eval(), conv, 32)


def test_killed_sweep_leaves_complete_rows_and_resumes(tiny_model: str, cache_dir: str, tmp_path: Path):
    _backend_or_skip("onnxruntime")
    out = tmp_path / "r.jsonl"
    args = ["bench", "--model", tiny_model, "--target", "onnxruntime", "--batch", "1", "--batch", "2",
            "--rounds", "2", "--warmup-max-time", "0.2", "--cache-dir", cache_dir, "--results", str(out)]
    # group b1 is quick; group b2 has 10 s rounds, so the kill lands while it is being timed
    proc = subprocess.Popen([sys.executable, "-m", "deploykit", *args, "--min-round-time", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no row appeared"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    rows = results.read_rows(out)
    assert [(r["status"], r["config"]["batch"]) for r in rows] == [("ok", 1)]
    assert json.loads(out.read_text().splitlines()[0])["summary"]["rounds"] == 2
    from deploykit.cli import main

    with pytest.raises(SystemExit) as done:
        main([*args, "--min-round-time", "0.005"])
    assert done.value.code == 0
    assert [r["config"]["batch"] for r in results.read_rows(out)] == [1, 2]


def test_bench_command_needs_a_sweep_or_a_model(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    from deploykit.cli import main

    with pytest.raises(SystemExit) as done:
        main(["bench", "--results", str(tmp_path / "r.jsonl")])
    assert done.value.code == 2
    assert "give --sweep FILE or at least one --model" in capsys.readouterr().err


# --- torch-cuda (runs only where a GPU is present; here its absence is what is tested) -----


def test_torch_cuda_options_are_validated():
    from deploykit.backends.torch_cuda import TorchCudaBackend

    backend = TorchCudaBackend()
    assert backend._options({"channels_last": "true"}, "fp16") == {
        "channels_last": True, "cuda_graphs": False, "compile": "none"}
    with pytest.raises(UsageError, match="use cuda_graphs or compile, not both"):
        backend._options({"cuda_graphs": True, "compile": "default"}, "fp32")
    with pytest.raises(UsageError, match="unknown option graphs for target torch-cuda"):
        backend._options({"graphs": True}, "fp32")


def test_torch_cuda_rows_say_a_gpu_is_needed_when_there_is_none(tiny_model: str, tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the parametrized backend test measures torch-cuda instead")
    if "torch-cuda" not in BACKENDS:
        pytest.skip("torch-cuda is not registered in deploykit.backends.base.BACKENDS")
    spec = make_sweep(models=[{"name": tiny_model, "label": "tiny"}], targets=["torch-cuda"], **FAST)
    run_sweep(spec, tmp_path / "r.jsonl")
    (row,) = results.read_rows(tmp_path / "r.jsonl")
    assert row["status"] == "skipped"
    assert "needs an NVIDIA GPU" in row["reason"] and "torch.cuda.is_available() is False" in row["reason"]

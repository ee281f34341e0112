"""The trained RepVGG-A0 the repository ships (the demo's model): readable, packed as documented, trained."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_cli

CHECKPOINT = REPO / "checkpoints" / "repvgg_a0-cifar10-w0.5.safetensors"


def test_it_is_small_and_packed_as_documented() -> None:
    from deploykit.checkpoint import read_checkpoint

    assert CHECKPOINT.stat().st_size <= 8_000_000
    state, meta = read_checkpoint(CHECKPOINT)
    assert meta is not None and meta["model"]["name"] == "repvgg_a0" and meta["form"] == "train"
    weights = {k: v for k, v in state.items() if v.ndim >= 2}
    vectors = {k: v for k, v in state.items() if v.ndim < 2 and v.is_floating_point()}
    assert weights and all(str(v.dtype) == "torch.float16" for v in weights.values())
    # BN statistics stay fp32: a variance near zero (a dead channel) must keep its value
    assert any(k.endswith("running_var") for k in vectors)
    assert all(str(v.dtype) == "torch.float32" for v in vectors.values())


def test_it_is_trained(cifar_tgz: Path) -> None:
    done = run_cli("eval", str(CHECKPOINT), "--data", str(cifar_tgz), "--split", "test", "--limit", "500", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["top1"] >= 0.80  # 88.3% on the whole test split; untrained: ~10%

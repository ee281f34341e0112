"""The trained checkpoints the repository ships (RepVGG-A0: the demo's model; RepOpt-VGG-A0): readable,
packed as documented, trained, 8 MB at most together."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_cli

SHIPPED = {REPO / "checkpoints" / f"{name}-cifar10-w0.5.safetensors": name for name in ("repvgg_a0", "repopt_vgg_a0")}


def test_they_fit_the_repository() -> None:
    assert sorted(SHIPPED) == sorted((REPO / "checkpoints").glob("*.safetensors"))  # a new one is tested here
    assert sum(path.stat().st_size for path in SHIPPED) <= 8_000_000


@pytest.mark.parametrize("checkpoint", list(SHIPPED), ids=list(SHIPPED.values()))
def test_it_is_small_and_packed_as_documented(checkpoint: Path) -> None:
    from deploykit.checkpoint import read_checkpoint

    assert checkpoint.stat().st_size <= 8_000_000
    state, meta = read_checkpoint(checkpoint)
    assert meta is not None and meta["model"]["name"] == SHIPPED[checkpoint] and meta["form"] == "train"
    weights = {k: v for k, v in state.items() if v.ndim >= 2}
    vectors = {k: v for k, v in state.items() if v.ndim < 2 and v.is_floating_point()}
    assert weights and all(str(v.dtype) == "torch.float16" for v in weights.values())
    # BN statistics stay fp32: a variance near zero (a dead channel) must keep its value
    assert any(k.endswith("running_var") for k in vectors)
    assert all(str(v.dtype) == "torch.float32" for v in vectors.values())


@pytest.mark.parametrize("checkpoint", list(SHIPPED), ids=list(SHIPPED.values()))
def test_it_is_trained(checkpoint: Path, cifar_tgz: Path) -> None:
    done = run_cli("eval", str(checkpoint), "--data", str(cifar_tgz), "--split", "test", "--limit", "500", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["top1"] >= 0.80  # 88.3% / 88.2% on the whole test split; untrained: ~10%

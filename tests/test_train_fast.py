"""The fast training path (bf16 autocast, one-cycle, EMA, flip TTA, kept checkpoints) and the
official RepVGG recipe's custom L2: a few steps on tiny data, resume included."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from deploykit.checkpoint import read_checkpoint
from deploykit.errors import DeployError
from deploykit.models.repvgg import RepVGG
from deploykit.train.custom_l2 import CustomL2
from deploykit.train.fast import logits_with_flip, onecycle_factor, resolve_precision
from deploykit.train.loop import TrainConfig, TrainProgress, make_optimizer, train
from conftest import run_cli
from test_train import CLASSES, PRE, SIZE, SPEC, TINY, data, tiny_model, tree  # noqa: F401 (fixtures)

FAST = TrainConfig(epochs=2, batch_size=16, lr=0.05, threads=1, schedule="onecycle", precision="bf16", ema=0.9,
                   tta_flip=True, keep_every=1)


def _run(data, out: Path, config: TrainConfig = FAST, **kw):  # noqa: F811
    return train(SPEC, data[0], data[1], out, config, preprocessing=PRE, model_factory=tiny_model, **kw)


def test_fast_path_trains_keeps_checkpoints_and_saves_the_ema(data, tmp_path: Path) -> None:  # noqa: F811
    result = _run(data, tmp_path / "run")
    assert len(result.history) == 2 and all(r.val_top1 is not None for r in result.history)
    kept = sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors"))
    assert [p.name for p in kept] == ["epoch-001.safetensors", "epoch-002.safetensors"]
    final, _ = read_checkpoint(tmp_path / "run" / "model.safetensors")
    last, meta = read_checkpoint(kept[-1])
    assert meta["epoch"] == 2 and all(torch.equal(final[k], last[k]) for k in final)
    raw, _ = read_checkpoint(tmp_path / "run" / "checkpoint" / "model.safetensors")  # the raw weights
    assert any(not torch.equal(final[k], raw[k]) for k in final if final[k].is_floating_point()), "EMA not saved"
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["precision"] == "bf16" and summary["weights"] == "EMA of the weights"
    assert summary["config"]["schedule"] == "onecycle" and len(summary["kept_checkpoints"]) == 2


class _StopAfterEpoch(TrainProgress):
    def epoch(self, record) -> None:
        raise RuntimeError("stop")


def test_resume_with_ema_equals_an_uninterrupted_run(data, tmp_path: Path) -> None:  # noqa: F811
    config = replace(FAST, precision="fp32")
    _run(data, tmp_path / "straight", config)
    with pytest.raises(RuntimeError, match="stop"):
        _run(data, tmp_path / "cut", config, progress=_StopAfterEpoch())
    _run(data, tmp_path / "cut", replace(config, keep_every=2), resume=True)  # keep_every may change
    a, _ = read_checkpoint(tmp_path / "straight" / "model.safetensors")
    b, _ = read_checkpoint(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed EMA run differs from the uninterrupted one"
    with pytest.raises(DeployError, match="started with .*schedule=onecycle"):
        _run(data, tmp_path / "cut", replace(config, schedule="cosine"), resume=True)


def test_onecycle_climbs_to_the_peak_then_falls_to_zero() -> None:
    factors = [onecycle_factor(s, 100, 0) for s in range(100)]
    assert factors[0] == pytest.approx(0.1 + 0.9 / 25) and max(factors) == factors[24] == 1.0
    assert factors[-1] == 0.0 and all(a >= b for a, b in zip(factors[24:], factors[25:]))
    assert onecycle_factor(9, 100, 10) == 1.0  # --warmup-epochs sets the peak


def test_bf16_auto_follows_the_cpu_flags() -> None:
    assert resolve_precision("auto", "cpu", "flags\t: fpu avx2 amx_bf16 amx_tile\n") == "bf16"
    assert resolve_precision("auto", "cpu", "flags\t: fpu avx2 avx512f\n") == "fp32"
    assert resolve_precision("fp32", "cpu", "flags\t: amx_bf16\n") == "fp32"
    with pytest.raises(DeployError, match="precision must be one of"):
        resolve_precision("fp8", "cpu", "")


def test_flip_tta_adds_the_mirror_images_logits() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(logits_with_flip(model, x, True), model(x) + model(x.flip(3)))
        assert torch.equal(logits_with_flip(model, x, False), model(x))


def test_custom_l2_is_the_equivalent_kernels_decay_and_replaces_plain_decay() -> None:
    model = RepVGG(*TINY, num_classes=4, cifar=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 2.0)
            m.running_var.uniform_(0.5, 2.0)
    penalty = CustomL2(model)
    expected = 0.0
    for block in penalty.blocks:
        k3, k1 = block.rbr_dense.conv.weight.double(), block.rbr_1x1.conv.weight.double()
        t3, t1 = (b.bn.weight.double() / (b.bn.running_var.double() + b.bn.eps).sqrt() for b in
                  (block.rbr_dense, block.rbr_1x1))
        eq = k3[:, :, 1, 1] * t3[:, None] + k1[:, :, 0, 0] * t1[:, None]
        outer = (k3**2).sum() - (k3[:, :, 1, 1] ** 2).sum()
        expected += float((outer + (eq**2 / (t3**2 + t1**2)[:, None]).sum()).detach())
    assert float(penalty().detach()) == pytest.approx(expected, rel=1e-5)
    penalty().backward()  # gradients reach the kernels, not the (detached) BN scales
    assert block.rbr_dense.conv.weight.grad is not None and block.rbr_dense.bn.weight.grad is None
    optimizer = make_optimizer(model, TrainConfig(epochs=1), None, penalty.kernels())
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not decayed & penalty.kernels() and id(model.linear.weight) in decayed


def test_custom_l2_trains_and_refuses_models_without_repvgg_blocks(data, tmp_path: Path) -> None:  # noqa: F811
    result = _run(data, tmp_path / "run", TrainConfig(epochs=1, batch_size=16, lr=0.05, threads=1, custom_l2=True))
    assert len(result.history) == 1 and result.history[0].train_loss > 0
    spec = {"name": "repopt_vgg_a0", "num_classes": len(CLASSES), "cifar": True}
    with pytest.raises(DeployError, match="--custom-l2 is the RepVGG recipe's decay"):
        train(spec, data[0], data[1], tmp_path / "repopt", TrainConfig(epochs=1, batch_size=16, custom_l2=True),
              preprocessing=PRE, model_factory=tiny_model)


@pytest.mark.parametrize("model", ["repvgg_a0", "qarepvgg_a0"])
def test_cli_fast_path_a_few_steps(tree: Path, tmp_path: Path, model: str) -> None:  # noqa: F811
    extra = ["--custom-l2"] if model == "repvgg_a0" else []
    args = ["train", model, "--cifar", "--width", "0.25", "--data", str(tree), "--input-size", str(SIZE),
            "--epochs", "2", "--batch-size", "8", "--limit", "16", "--threads", "1", "--schedule", "onecycle",
            "--precision", "auto", "--ema", "0.99", "--tta-flip", "--keep-every", "1", *extra,
            "--out", str(tmp_path / "run")]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "checkpoints" / "epoch-002.safetensors").is_file()
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["precision"] in ("fp32", "bf16") and summary["config"]["custom_l2"] == bool(extra)


def test_eval_every_validates_every_nth_the_kept_and_the_last_epoch(data, tmp_path: Path) -> None:  # noqa: F811
    config = replace(FAST, epochs=4, precision="fp32", eval_every=3, keep_every=None, tta_flip=False)
    result = _run(data, tmp_path / "run", config)
    assert [r.val_top1 is not None for r in result.history] == [False, False, True, True]
    result = _run(data, tmp_path / "kept", replace(config, keep_every=2))
    assert [r.val_top1 is not None for r in result.history] == [False, True, True, True]


def test_compiled_training_follows_the_eager_run(data, tmp_path: Path) -> None:  # noqa: F811
    """torch.compile (inductor) changes how, not what, is computed: the same seeded run, compiled,
    ends at the same weights up to float reassociation, and resumes an eager run's checkpoint."""
    config = replace(FAST, epochs=1, precision="fp32", ema=None, tta_flip=False, keep_every=None)
    eager = _run(data, tmp_path / "eager", config)
    compiled = _run(data, tmp_path / "compiled", replace(config, compile=True))
    a, _ = read_checkpoint(eager.model_path)
    b, _ = read_checkpoint(compiled.model_path)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)
    _run(data, tmp_path / "eager", replace(config, epochs=1, compile=True), resume=True)  # compile is not the recipe


def test_compile_without_a_cxx_compiler_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from deploykit.train import fast

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DeployError, match="--compile needs a C\\+\\+ compiler"):
        fast.compiled(nn.Linear(2, 2), "cpu")

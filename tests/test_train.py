"""Training: a few steps on tiny data, resume = uninterrupted run, Ctrl-C, NaN stop, bad folders,
and the RepOpt-VGG pipeline's re-initialization and gradient masks."""
from __future__ import annotations

import json
import logging
import signal
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deploykit.calib import default_recipe
from deploykit.checkpoint import read_checkpoint
from deploykit.errors import DeployError
from deploykit.models.repopt import RepOptimizer, RepOptVGG, extract_scales, grad_masks, initialize_from_scales
from deploykit.models.repvgg import RepVGG
from deploykit.train.data import Normalizer, load_image_set, train_batches
from deploykit.train.loop import (
    NonFiniteLoss, TrainConfig, TrainingInterrupted, TrainProgress, make_optimizer, train,
)
from deploykit.train.repopt import load_scales, train_repopt
from conftest import CIFAR_TGZ, run_cli

SIZE = 8  # pixels: tiny images keep every step cheap
CLASSES = ("ant", "bee", "cat", "dog")
PRE = default_recipe(SIZE).preprocessing
TINY = (1, 1, 1, 1), (0.25, 0.25)  # one block per stage, quarter width


def tiny_model(spec: dict) -> torch.nn.Module:
    """The zoo's classes at test size, named like zoo models so the pipeline logic is the real one."""
    if spec["name"].startswith("repopt"):
        mode = "hs" if spec["name"].endswith("_hs") else "target"
        return RepOptVGG(*TINY, num_classes=spec["num_classes"], mode=mode, cifar=True)
    return RepVGG(*TINY, num_classes=spec["num_classes"], cifar=True)


def _write_tree(root: Path, counts: dict[str, int], split: str, seed: int) -> None:
    """Class c: a distinct mean colour plus noise, so a few steps can learn something."""
    rng = np.random.default_rng(seed)
    for c, (name, count) in enumerate(counts.items()):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([(c * 70) % 256, (255 - c * 60) % 256, (c * 130) % 256])
        for i in range(count):
            pixels = np.clip(colour + rng.normal(0, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    _write_tree(root, dict.fromkeys(CLASSES, 16), "train", 0)
    _write_tree(root, dict.fromkeys(CLASSES, 4), "test", 1)
    return root


@pytest.fixture(scope="module")
def data(tree: Path):
    return load_image_set(tree, "train", PRE), load_image_set(tree, "test", PRE)


SPEC = {"name": "repvgg_a0", "num_classes": len(CLASSES), "cifar": True}
CONFIG = TrainConfig(epochs=2, batch_size=16, lr=0.05, weight_decay=5e-4, warmup_epochs=0.5, threads=1)


def _run(data, out: Path, config: TrainConfig = CONFIG, **kw):
    return train(SPEC, data[0], data[1], out, config, preprocessing=PRE, model_factory=tiny_model, **kw)


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(out / "model.safetensors")[0]


def test_training_lowers_loss_and_writes_a_loadable_checkpoint(data, tmp_path: Path) -> None:
    result = _run(data, tmp_path / "run", replace(CONFIG, epochs=3))
    losses = [r.train_loss for r in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    state, meta = read_checkpoint(tmp_path / "run" / "model.safetensors")
    assert meta["model"] == SPEC and meta["form"] == "train"
    tiny_model(SPEC).load_state_dict(state, strict=True)
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["train_seconds"] > 0 and len(summary["history"]) == 3
    assert summary["preprocessing"]["mean"] == list(PRE.mean)  # the calib recipe's normalization
    assert (tmp_path / "run" / "checkpoint" / "state.safetensors").is_file()


class _CtrlCAt(TrainProgress):
    """Press Ctrl-C (a real SIGINT) right after the given step."""

    def __init__(self, epoch: int, step: int) -> None:
        self.at = (epoch, step)

    def step(self, *, epoch: int, step: int, loss: float) -> None:
        if (epoch, step) == self.at:
            signal.raise_signal(signal.SIGINT)


# The interrupted run gets a real SIGINT, so it runs in its own process: a signal raised
# inside a pytest-xdist worker can take the worker down with it.
_CTRL_C_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import test_train as t
from deploykit.train.data import load_image_set
from deploykit.train.loop import TrainingInterrupted
tree, out = sys.argv[2], sys.argv[3]
data = load_image_set(tree, "train", t.PRE), load_image_set(tree, "test", t.PRE)
try:
    t._run(data, __import__("pathlib").Path(out), progress=t._CtrlCAt(1, 2))
except TrainingInterrupted as err:
    print(err)
    sys.exit(err.exit_code)
"""


def test_ctrl_c_saves_and_resume_equals_an_uninterrupted_run(data, tree: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    _run(data, tmp_path / "straight")
    child = subprocess.run(
        [sys.executable, "-c", _CTRL_C_CHILD, str(Path(__file__).parent), str(tree), str(tmp_path / "interrupted")],
        capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == 130, child.stderr[-2000:]
    assert "epoch 1 step 2/4" in child.stdout and "--resume" in child.stdout
    saved = read_checkpoint(tmp_path / "interrupted" / "checkpoint" / "model.safetensors")[1]
    assert (saved["epoch"], saved["step"]) == (0, 2)
    assert not (tmp_path / "interrupted" / "model.safetensors").exists()
    resumed = _run(data, tmp_path / "interrupted", resume=True)
    straight, again = _final_state(tmp_path / "straight"), _final_state(tmp_path / "interrupted")
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight), "resumed run differs from the uninterrupted one"
    history = json.loads((tmp_path / "straight" / "train.json").read_text())["history"]
    assert [r["train_loss"] for r in history] == [r.train_loss for r in resumed.history]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path: Path) -> None:
    poison = {"on": False}

    def factory(spec: dict) -> torch.nn.Module:
        model = tiny_model(spec)
        model.linear.register_forward_hook(lambda m, a, out: out * float("nan") if poison["on"] else out)
        return model

    class PoisonAfterFirstEpoch(TrainProgress):
        def epoch(self, record) -> None:
            poison["on"] = True

    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at epoch 2 step 1.*last good checkpoint \(epoch 1\)"):
        train(SPEC, data[0], data[1], out, CONFIG, preprocessing=PRE, model_factory=factory,
              progress=PoisonAfterFirstEpoch())
    state, meta = read_checkpoint(out / "checkpoint" / "model.safetensors")
    assert meta["epoch"] == 1 and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (out / "model.safetensors").exists()


def test_resume_refuses_other_settings_and_missing_runs(data, tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="nothing to resume"):
        _run(data, tmp_path / "none", resume=True)
    _run(data, tmp_path / "run", replace(CONFIG, epochs=1))
    with pytest.raises(DeployError, match="holds a training run; pass --resume"):
        _run(data, tmp_path / "run", replace(CONFIG, epochs=1))
    with pytest.raises(DeployError, match="started with lr=0.05"):
        _run(data, tmp_path / "run", replace(CONFIG, epochs=1, lr=0.1), resume=True)


def test_augmented_batches_replay_exactly_from_any_step(data) -> None:
    normalize = Normalizer(PRE)
    full = list(train_batches(data[0], normalize, batch_size=16, seed=3, epoch=5))
    tail = list(train_batches(data[0], normalize, batch_size=16, seed=3, epoch=5, start_step=2))
    assert len(full) == 4 and len(tail) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], tail))
    other = next(iter(train_batches(data[0], normalize, batch_size=16, seed=3, epoch=6)))
    assert not torch.equal(full[0][0], other[0])  # each epoch draws its own crops, flips, order
    x = full[0][0]
    assert x.shape == (16, 3, SIZE, SIZE) and x.dtype == torch.float32
    border = (-torch.tensor(PRE.mean) / torch.tensor(PRE.std)).view(1, 3, 1, 1)  # black padding, normalized
    assert torch.isclose(x, border.expand_as(x), atol=1e-5).all(dim=1).any()  # some crop shows padding


def test_optimizer_masks_and_decay_groups() -> None:
    model = RepOptVGG(*TINY, num_classes=4, mode="target", cifar=True)
    scales = extract_scales(RepOptVGG(*TINY, num_classes=4, mode="hs", cifar=True))
    optimizer = make_optimizer(model, CONFIG, scales)
    assert isinstance(optimizer, RepOptimizer)
    expected = grad_masks(model, scales)
    assert optimizer.grad_masks.keys() == expected.keys()
    assert all(torch.equal(optimizer.grad_masks[p], expected[p]) for p in expected)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == CONFIG.weight_decay and plain["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in plain["params"])  # BN weights/biases and the linear bias
    assert type(make_optimizer(model, CONFIG, None)) is torch.optim.SGD


def test_repopt_pipeline_reinitializes_from_the_searched_scales(data, tmp_path: Path) -> None:
    hs_config = replace(CONFIG, epochs=1)
    target_config = replace(CONFIG, epochs=1, lr=1e-12, weight_decay=0.0)  # weights stay at their init
    out = tmp_path / "repopt"
    result = train_repopt("repopt_vgg_a0", {"num_classes": 4, "cifar": True}, data[0], data[1], out,
                          hs_config=hs_config, target_config=target_config, preprocessing=PRE,
                          model_factory=tiny_model)
    hs_model = tiny_model({"name": "repopt_vgg_a0_hs", "num_classes": 4})
    hs_model.load_state_dict(read_checkpoint(out / "hs" / "model.safetensors")[0])
    scales = load_scales(result.scales_path)
    searched = extract_scales(hs_model)
    assert scales.keys() == searched.keys() and all(torch.equal(scales[k], searched[k]) for k in scales)
    assert any(not torch.allclose(v, torch.ones_like(v)) and "scale_3x3" in k for k, v in scales.items())
    # The target's kernels are the merged kernels of a fresh CSLA block (same seed, same draws).
    torch.manual_seed(target_config.seed)
    expected = tiny_model({"name": "repopt_vgg_a0", "num_classes": 4})
    plain = {k: v.clone() for k, v in expected.state_dict().items()}
    initialize_from_scales(expected, scales)
    trained = read_checkpoint(out / "target" / "model.safetensors")[0]
    convs = [k for k in plain if k.endswith("conv.weight")]
    assert all(torch.allclose(trained[k], expected.state_dict()[k], atol=1e-6) for k in convs)
    assert not all(torch.allclose(trained[k], plain[k]) for k in convs)
    summary = json.loads((out / "target" / "train.json").read_text())
    assert summary["optimizer"].startswith("RepOptimizer")
    pipeline = json.loads((out / "pipeline.json").read_text())
    assert pipeline["total_train_seconds"] >= pipeline["target"]["train_seconds"] > 0
    again = train_repopt("repopt_vgg_a0", {"num_classes": 4, "cifar": True}, data[0], data[1], out,
                         hs_config=hs_config, target_config=target_config, preprocessing=PRE,
                         model_factory=tiny_model, resume=True)
    assert again.hyper_search is None  # a finished stage is not run again


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"train/ant": 4, "train/bee": 0}, "class folder.*bee.*hold no images"),
        ({"train": 4}, "no class folders"),
    ],
)
def test_bad_folders_are_clear_errors(tmp_path: Path, layout: dict[str, int], message: str) -> None:
    for folder, count in layout.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (SIZE, SIZE)).save(tmp_path / folder / f"{i}.png")
    with pytest.raises(DeployError, match=message):
        load_image_set(tmp_path, "train", PRE)
    with pytest.raises(DeployError, match="does not exist"):
        load_image_set(tmp_path / "missing", "train", PRE)
    with pytest.raises(DeployError, match="has no val/ split"):
        load_image_set(tmp_path, "val", PRE, require_split=True)


def test_class_mismatch_imbalance_and_small_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_tree(tmp_path, {"ant": 12, "bee": 4}, "train", 0)
    _write_tree(tmp_path, {"ant": 2, "cow": 2}, "test", 1)
    train_set, val_set = load_image_set(tmp_path, "train", PRE), load_image_set(tmp_path, "test", PRE)
    spec = {**SPEC, "num_classes": 2}
    with pytest.raises(DeployError, match="missing bee; unexpected cow"):
        train(spec, train_set, val_set, tmp_path / "a", CONFIG, preprocessing=PRE, model_factory=tiny_model)
    with pytest.raises(DeployError, match="2 class folders.*4 outputs"):
        train(SPEC, train_set, None, tmp_path / "b", CONFIG, preprocessing=PRE, model_factory=tiny_model)
    with caplog.at_level(logging.WARNING, logger="deploykit"):
        with pytest.raises(DeployError, match="16 training images are fewer than the batch size 32"):
            train(spec, train_set, None, tmp_path / "c", replace(CONFIG, batch_size=32), preprocessing=PRE,
                  model_factory=tiny_model)
    assert "imbalanced classes" in caplog.text and "ratio 3.0" in caplog.text


def test_cli_trains_a_zoo_model_a_few_steps(tree: Path, tmp_path: Path) -> None:
    args = ["train", "repvgg_a0", "--cifar", "--data", str(tree), "--input-size", str(SIZE), "--epochs", "1",
            "--batch-size", "8", "--limit", "16", "--threads", "1", "--out", str(tmp_path / "run")]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "val top-1" in done.stdout
    from deploykit.loading import load_model

    loaded = load_model(str(tmp_path / "run" / "model.safetensors"))
    assert loaded.name == "repvgg_a0" and loaded.spec["num_classes"] == len(CLASSES)
    again = run_cli(*args)
    assert again.returncode == 1 and "pass --resume to continue it or --force" in again.stderr


def test_tiny_subset_of_cifar10_from_the_archive(tmp_path: Path) -> None:
    if not CIFAR_TGZ.is_file():
        pytest.skip(f"CIFAR-10 tarball not found at {CIFAR_TGZ}")
    pre = default_recipe(32).preprocessing
    train_set = load_image_set(CIFAR_TGZ, "train", pre, limit=64, seed=0)
    assert train_set.images.shape == (64, 3, 32, 32) and len(train_set.classes) == 10
    config = TrainConfig(epochs=1, batch_size=32, lr=0.05, threads=1)
    spec = {"name": "repvgg_a0", "num_classes": 10, "cifar": True}
    result = train(spec, train_set, None, tmp_path / "run", config, preprocessing=pre, model_factory=tiny_model)
    assert len(result.history) == 1 and np.isfinite(result.history[0].train_loss)
    assert asdict(result.history[0])["val_top1"] is None

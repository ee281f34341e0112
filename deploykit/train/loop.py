"""The training loop: SGD (or RepOptimizer), cosine schedule, label smoothing; seeded,
deterministic, checkpointed every epoch and resumable bit for bit.

A run directory holds::

    checkpoint/model.safetensors   the latest weights (a deploykit checkpoint: build/eval take it)
    checkpoint/state.safetensors   optimizer, scheduler, RNG, epoch and step: what --resume needs
    history.json                   one row per finished epoch
    model.safetensors, train.json  the final weights and the run's summary, once training ends

``checkpoint/`` is replaced as a whole (``atomic_dir``), so weights and state always belong
together. Ctrl-C is caught between steps: the current state is saved and
``TrainingInterrupted`` (exit 130) says how to resume. A non-finite loss stops the run before
anything is written: the last good checkpoint stays.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploykit.checkpoint import save_checkpoint
from deploykit.errors import DeployError
from deploykit.train.data import ImageSet, Normalizer, check_training_data, eval_batches, steps_per_epoch, train_batches
from deploykit.train.state import (
    CHECKPOINT_DIR, MODEL_FILE, check_same_run, load_state, optimizer_state, save_state, write_json,
)

logger = logging.getLogger(__name__)

SUMMARY_FILE = "train.json"
HISTORY_FILE = "history.json"


class TrainingInterrupted(DeployError):
    """Ctrl-C: the state was saved; the message says how to resume."""

    exit_code = 130


class NonFiniteLoss(DeployError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    """The recipe. Resuming requires the same recipe: the schedule and the data order depend on it."""

    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # on conv/linear weights only; BN, biases and scales are not decayed
    label_smoothing: float = 0.1
    warmup_epochs: float = 0.0  # linear warmup from 0, then cosine to 0
    seed: int = 0
    threads: int = 2
    limit: int | None = None  # train on a seeded subset of this many images
    val_limit: int | None = None
    eval_batch_size: int = 256
    device: str = "cpu"  # "cuda" on a GPU machine; the data stays in host memory
    # The fast path (deploykit.train.fast) and the official RepVGG recipe's decay; all off by default.
    custom_l2: bool = False  # RepVGG: weight decay on the equivalent kernel (deploykit.train.custom_l2)
    schedule: str = "cosine"  # or "onecycle"
    precision: str = "fp32"  # autocast: "fp32", "bf16", or "auto" (bf16 where the CPU/GPU has bf16 units)
    ema: float | None = None  # decay of an EMA of the weights (e.g. 0.999); evaluated and saved instead
    tta_flip: bool = False  # evaluate on the mean of the logits of x and its mirror image
    keep_every: int | None = None  # keep the evaluated weights of every N-th epoch in checkpoints/
    eval_every: int = 1  # validate every N-th epoch (and the last, and every kept one)
    compile: bool = False  # torch.compile the training forward/backward (inductor: needs a C++ compiler on CPU)

    def __post_init__(self) -> None:
        from deploykit.train.fast import PRECISIONS, SCHEDULES

        if self.epochs < 1 or self.batch_size < 1 or self.threads < 1:
            raise DeployError("epochs, batch size and threads must be positive")
        if not (self.lr > 0 and 0 <= self.label_smoothing < 1 and self.weight_decay >= 0):
            raise DeployError("need lr > 0, 0 <= label smoothing < 1, weight decay >= 0")
        if self.schedule not in SCHEDULES or self.precision not in PRECISIONS:
            raise DeployError(f"schedule must be one of {', '.join(SCHEDULES)} and precision one of "
                              f"{', '.join(PRECISIONS)}; got {self.schedule!r}, {self.precision!r}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise DeployError(f"--ema decay must be between 0 and 1 (e.g. 0.999), not {self.ema}")
        if self.keep_every is not None and self.keep_every < 1:
            raise DeployError("--keep-every must be a positive number of epochs")
        if self.eval_every < 1:
            raise DeployError("--eval-every must be a positive number of epochs")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_top1: float
    val_top1: float | None
    lr: float  # at the epoch's last step
    seconds: float


@dataclass
class TrainResult:
    out: Path
    model_path: Path
    history: list[EpochRecord]
    train_seconds: float
    final_val_top1: float | None
    summary: dict[str, Any] = field(default_factory=dict)


class TrainProgress:
    """Callbacks for a front end (the CLI draws a rich progress bar); every method optional."""

    def start(self, *, epochs: int, steps: int, epoch: int, step: int) -> None: ...

    def step(self, *, epoch: int, step: int, loss: float) -> None: ...

    def epoch(self, record: EpochRecord) -> None: ...


# ----------------------------------------------------------------------------- building blocks


def zoo_model(spec: dict[str, Any]) -> nn.Module:
    """The zoo model a checkpoint spec names: {"name", "num_classes", "cifar", **factory keywords}."""
    from deploykit.models import create_model

    return create_model(spec["name"], **{k: v for k, v in spec.items() if k != "name"})


def param_groups(model: nn.Module, weight_decay: float, exclude: set[int] = frozenset()) -> list[dict[str, Any]]:
    """Decay conv and linear weights only (BN, biases, RepOpt scales are not decayed).

    ``exclude``: ids of weights decayed otherwise (the custom L2 covers RepVGG's branch kernels).
    """
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))} - set(exclude)
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module, config: TrainConfig, scales: dict[str, torch.Tensor] | None, exclude: set[int] = frozenset()
) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; with ``scales``, the RepOptimizer those scales define."""
    groups = param_groups(model, config.weight_decay, exclude)
    if scales is None:
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    from deploykit.models.repopt import RepOptimizer

    return RepOptimizer(model, scales, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                        weight_decay=config.weight_decay, params=groups)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then half a cosine down to 0 (per step)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int) -> Any:
    from deploykit.train.fast import onecycle_factor

    total, warmup = config.epochs * steps, round(config.warmup_epochs * steps)
    factor = onecycle_factor if config.schedule == "onecycle" else lr_factor
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor(s, total, warmup))


def set_determinism(seed: int, threads: int, device: str = "cpu") -> None:
    """Same seed, same threads, same machine: same weights, step for step."""
    import os

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeployError(f"--device {device}: this torch build or machine has no CUDA GPU")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _to(x: torch.Tensor, device: str) -> torch.Tensor:
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate_top1(
    model: nn.Module, data: ImageSet, normalize: Normalizer, batch_size: int, device: str = "cpu", *,
    flip: bool = False, precision: str = "fp32",
) -> float:
    """Top-1 on ``data``; ``flip``: test-time augmentation with the mirror image."""
    from deploykit.train.fast import autocast, evaluating, logits_with_flip

    correct = 0
    with evaluating(model), autocast(precision, device):
        for x, y in eval_batches(data, normalize, batch_size):
            correct += int((logits_with_flip(model, _to(x, device), flip).argmax(1).cpu() == y).sum())
    return correct / max(1, len(data))


@contextlib.contextmanager
def _catch_ctrl_c() -> Iterator[dict[str, bool]]:
    """Turn the first SIGINT into a flag checked between steps; a second one interrupts at once."""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        flag["stop"] = True
        signal.signal(signal.SIGINT, previous)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- the loop


def train(
    spec: dict[str, Any],
    train_data: ImageSet,
    val_data: ImageSet | None,
    out: Path,
    config: TrainConfig,
    *,
    preprocessing: Any,
    scales: dict[str, torch.Tensor] | None = None,
    resume: bool = False,
    force: bool = False,
    progress: TrainProgress | None = None,
    model_factory: Callable[[dict[str, Any]], nn.Module] | None = None,
) -> TrainResult:
    """Train the zoo model ``spec`` ({"name", "num_classes", "cifar", ...}) and write the run to ``out``.

    ``scales`` (RepOpt-VGG): re-initialize the target kernels from them and train with the
    RepOptimizer they define. ``preprocessing``: the recipe whose normalization the data gets.
    ``model_factory``: builds the model from ``spec`` (default: the zoo's ``create_model``).
    """
    out = Path(out)
    progress = progress or TrainProgress()
    has_run = (out / CHECKPOINT_DIR).exists() or (out / SUMMARY_FILE).exists()
    if has_run and not resume and not force:
        raise DeployError(f"{out} holds a training run; pass --resume to continue it or --force to start over")
    check_training_data(train_data, val_data, spec["num_classes"])
    steps = steps_per_epoch(len(train_data), config.batch_size)
    if steps == 0:
        raise DeployError(
            f"{len(train_data)} training images are fewer than the batch size {config.batch_size}; lower --batch-size"
        )

    set_determinism(config.seed, config.threads, config.device)
    # channels_last: oneDNN's CPU convolutions run 5-20% faster on NHWC (measured on this 2-core EPYC).
    model = (model_factory or zoo_model)(spec).to(memory_format=torch.channels_last)
    if scales is not None and not resume:
        from deploykit.models.repopt import initialize_from_scales

        initialize_from_scales(model, scales)
    model = model.to(config.device)
    from deploykit.train import fast

    penalty = None
    if config.custom_l2:
        from deploykit.train.custom_l2 import CustomL2

        penalty = CustomL2(model)
    precision = fast.resolve_precision(config.precision, config.device)
    optimizer = make_optimizer(model, config, scales, penalty.kernels() if penalty else frozenset())
    scheduler = make_scheduler(optimizer, config, steps)
    normalize = Normalizer(preprocessing)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    forward = fast.compiled(model, config.device) if config.compile else model  # shares model's parameters
    ema = fast.make_ema(model, config.ema) if config.ema is not None else None
    evaluated = ema.module if ema is not None else model  # what is validated, kept and saved
    epoch, step, train_seconds, history, running = 0, 0, 0.0, [], {"loss": 0.0, "correct": 0, "seen": 0}
    if resume:
        model_state, tensors, saved = load_state(out)
        check_same_run(saved, config, spec, out)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state(tensors, saved))
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        if ema is not None:
            fast.load_ema(ema, tensors, out)
        epoch, step, train_seconds = saved["epoch"], saved["step"], saved["train_seconds"]
        history, running = [EpochRecord(**r) for r in saved["history"]], saved["running"]
        logger.info("resuming %s at epoch %d step %d", out, epoch + 1, step)
        if epoch >= config.epochs:
            logger.info("%s already finished %d epochs", out, config.epochs)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (SUMMARY_FILE, HISTORY_FILE, MODEL_FILE):  # --force: nothing of the old run may pass for the new
            (out / stale).unlink(missing_ok=True)

    def save(at_epoch: int, at_step: int) -> None:
        meta = {"epoch": at_epoch, "step": at_step, "train_seconds": train_seconds, "config": config.to_dict(),
                "spec": spec, "history": [asdict(r) for r in history], "running": running,
                "preprocessing": preprocessing.to_dict(), "scales": scales is not None, "precision": precision}
        save_state(out, model=model, spec=spec, optimizer=optimizer, scheduler=scheduler, meta=meta,
                   tensors=fast.ema_tensors(ema) if ema is not None else None)

    progress.start(epochs=config.epochs, steps=steps, epoch=epoch, step=step)
    model.train()
    with _catch_ctrl_c() as ctrl_c:
        while epoch < config.epochs:
            started = time.perf_counter()
            batches = train_batches(train_data, normalize, batch_size=config.batch_size, seed=config.seed,
                                    epoch=epoch, start_step=step)
            for x, y in batches:
                x, y = _to(x, config.device), y.to(config.device)
                with fast.autocast(precision, config.device):
                    logits = forward(x)
                    loss = criterion(logits, y)
                if penalty is not None:  # float32, outside autocast
                    loss_for_grad = loss + 0.5 * config.weight_decay * penalty()
                else:
                    loss_for_grad = loss
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(
                        f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1} "
                        f"(lr {scheduler.get_last_lr()[0]:.3g}); "
                        f"stopped: the last good checkpoint ({_last_good(history)}) is kept in {out / CHECKPOINT_DIR}; "
                        "lower --lr or add --warmup-epochs"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss_for_grad.backward()
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                running["loss"] += loss.item() * len(y)
                running["correct"] += int((logits.argmax(1) == y).sum().item())
                running["seen"] += len(y)
                progress.step(epoch=epoch + 1, step=step, loss=loss.item())
                if ctrl_c["stop"]:
                    train_seconds += time.perf_counter() - started
                    save(epoch, step)
                    raise TrainingInterrupted(
                        f"interrupted at epoch {epoch + 1} step {step}/{steps}; state saved in {out / CHECKPOINT_DIR}; "
                        "continue with the same command and --resume"
                    )
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise NonFiniteLoss(
                    f"weights became NaN or infinite in epoch {epoch + 1}; stopped: the last good checkpoint "
                    f"({_last_good(history)}) is kept in {out / CHECKPOINT_DIR}; lower --lr or add --warmup-epochs"
                )
            done = epoch + 1
            validate = val_data is not None and (
                done % config.eval_every == 0 or done == config.epochs
                or bool(config.keep_every and done % config.keep_every == 0))
            val_top1 = (evaluate_top1(evaluated, val_data, normalize, config.eval_batch_size, config.device,
                                      flip=config.tta_flip, precision=precision)
                        if validate else None)
            seconds = time.perf_counter() - started
            train_seconds += seconds
            record = EpochRecord(epoch + 1, running["loss"] / max(1, running["seen"]),
                                 running["correct"] / max(1, running["seen"]), val_top1,
                                 scheduler.get_last_lr()[0], seconds)
            history.append(record)
            epoch, step, running = epoch + 1, 0, {"loss": 0.0, "correct": 0, "seen": 0}
            save(epoch, 0)
            if config.keep_every and (epoch % config.keep_every == 0 or epoch == config.epochs):
                keep_checkpoint(out, evaluated, spec, record)
            write_json(out / HISTORY_FILE, [asdict(r) for r in history])
            progress.epoch(record)
            logger.info("epoch %d/%d: loss %.4f, train top-1 %.4f, val top-1 %s, %.1f s", record.epoch,
                        config.epochs, record.train_loss, record.train_top1,
                        "-" if val_top1 is None else f"{val_top1:.4f}", seconds)
    return _finish(out, evaluated, spec, config, history, train_seconds, train_data, val_data, preprocessing, scales,
                   precision)


KEPT_DIR = "checkpoints"


def keep_checkpoint(out: Path, model: nn.Module, spec: dict[str, Any], record: EpochRecord) -> Path:
    """OUT/checkpoints/epoch-NNN.safetensors: the evaluated weights after ``record.epoch`` epochs."""
    path = out / KEPT_DIR / f"epoch-{record.epoch:03d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, path, spec=spec, form="train", force=True,
                    extra={"epoch": record.epoch, "val_top1": record.val_top1})
    return path


def _last_good(history: list[EpochRecord]) -> str:
    return f"epoch {history[-1].epoch}" if history else "none yet: the run had not finished an epoch"


def _finish(out: Path, model: nn.Module, spec: dict[str, Any], config: TrainConfig, history: list[EpochRecord],
            train_seconds: float, train_data: ImageSet, val_data: ImageSet | None, preprocessing: Any,
            scales: Any, precision: str = "fp32") -> TrainResult:
    final = history[-1].val_top1 if history else None
    summary = {
        "model": spec,
        "config": config.to_dict(),
        "optimizer": "RepOptimizer (SGD with gradient masks from the hyper-search scales)" if scales is not None
        else "SGD",
        "data": {"train": train_data.description, "train_images": len(train_data),
                 "val": val_data.description if val_data is not None else None,
                 "val_images": len(val_data) if val_data is not None else 0,
                 "classes": list(train_data.classes)},
        "preprocessing": preprocessing.to_dict(),
        "augmentation": "random crop with 4-pixel zero padding, horizontal flip",
        "precision": precision,  # the resolved autocast precision (config.precision may say "auto")
        "weights": "EMA of the weights" if config.ema is not None else "last step",
        "kept_checkpoints": sorted(str(p.relative_to(out)) for p in (out / KEPT_DIR).glob("*.safetensors")),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(train_seconds / max(1, len(history)), 2),
        "final_val_top1": final,
        "torch": torch.__version__,
        "threads": config.threads,
        "history": [asdict(r) for r in history],
    }
    model_path = out / MODEL_FILE
    save_checkpoint(model, model_path, spec=spec, form="train", force=True,
                    extra={"epochs": len(history), "val_top1": final, "train_seconds": round(train_seconds, 2)})
    write_json(out / SUMMARY_FILE, summary)
    return TrainResult(out, model_path, history, train_seconds, final, summary)

"""The fast-CIFAR pieces of the training recipe, each a switch of ``TrainConfig``:

- bf16 autocast where the CPU has bf16 units (``/proc/cpuinfo``: ``avx512_bf16`` or
  ``amx_bf16``; ``precision="auto"``) or on a CUDA GPU that supports it;
- a one-cycle schedule (linear up to the peak, linear down to 0: Smith & Topin 2017, as in
  the fast-CIFAR ResNet/VGG recipes that reach 94% in ~10 epochs);
- an exponential moving average of the weights and BN statistics (evaluated, kept and
  saved in place of the raw weights), with the usual decay warm-up min(d, (1+n)/(10+n));
- horizontal-flip test-time augmentation for evaluation (logits of x and flip(x) summed).

The data side of the fast path is ``deploykit.train.data``: the images are decoded once into
uint8 tensors in memory and cropped/flipped on tensors, a batch at a time.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploykit.errors import DeployError

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "auto")
SCHEDULES = ("cosine", "onecycle")
ONECYCLE_PEAK = 0.25  # fraction of the steps spent climbing when no warmup is given
ONECYCLE_START = 0.1  # the climb starts at this fraction of the peak lr
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The bf16 ISA flags this CPU reports (empty: bf16 would be emulated, slower than fp32)."""
    from deploykit.device import _cpuinfo

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = _cpuinfo(cpuinfo)["flags"]
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def resolve_precision(precision: str, device: str, cpuinfo: str | None = None) -> str:
    """"fp32" or "bf16" for ``precision`` in PRECISIONS on ``device``."""
    if precision not in PRECISIONS:
        raise DeployError(f"training precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if device.startswith("cuda"):
        has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        why = "this GPU has no bf16 support"
    else:
        has_bf16 = bool(cpu_bf16_flags(cpuinfo))
        why = f"this CPU reports none of {', '.join(CPU_BF16_FLAGS)} in /proc/cpuinfo"
    if precision == "auto":
        return "bf16" if has_bf16 else "fp32"
    if precision == "bf16" and not has_bf16:
        logger.warning("bf16 training requested but %s: it runs emulated, likely slower than fp32", why)
    return precision


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's autocast context for a resolved precision."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def onecycle_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear from ONECYCLE_START to 1 over the warmup (default ONECYCLE_PEAK of the run), then to 0."""
    peak = warmup_steps if warmup_steps > 0 else max(1, round(ONECYCLE_PEAK * total_steps))
    if step < peak:
        return ONECYCLE_START + (1.0 - ONECYCLE_START) * (step + 1) / peak
    return max(0.0, (total_steps - step - 1) / max(1, total_steps - peak))


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """torch's AveragedModel as an EMA of parameters and buffers (BN statistics included)."""
    if not 0.0 < decay < 1.0:
        raise DeployError(f"--ema decay must be between 0 and 1 (e.g. 0.999), not {decay}")

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], count: Any) -> None:
        n = float(count)
        d = min(decay, (1.0 + n) / (10.0 + n))
        if averaged and torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:
            for a, c in zip(averaged, current):
                a.copy_(c)  # integer buffers (BN's num_batches_tracked): follow the model

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def ema_tensors(ema: torch.optim.swa_utils.AveragedModel) -> dict[str, torch.Tensor]:
    return {f"ema.{k}": v.detach().cpu().contiguous().clone() for k, v in ema.state_dict().items()}


def load_ema(ema: torch.optim.swa_utils.AveragedModel, tensors: dict[str, torch.Tensor], where: Path) -> None:
    state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    if not state:
        raise DeployError(f"{where} was saved without an EMA of the weights; resume it without --ema")
    ema.load_state_dict(state)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def compiled(model: nn.Module, device: str) -> Any:
    """``torch.compile(model)`` for training: inductor fuses the BN/ReLU/add chains of thin nets
    (1.55x the training steps of the CIFAR RepVGG-A0 at width 0.5 on a 2-core Xeon, bf16). On the
    CPU inductor generates C++: without a compiler it would fail at the first step, so say it now."""
    import os
    import shutil

    if not device.startswith("cuda"):
        if not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c):
            raise DeployError("--compile needs a C++ compiler on the CPU (torch.compile generates C++): "
                              "install g++ or train without --compile")
    return torch.compile(model)


def logits_with_flip(model: nn.Module, x: torch.Tensor, flip: bool) -> torch.Tensor:
    """The model's logits, summed with those of the mirrored images when ``flip``."""
    logits = model(x)
    return logits + model(x.flip(3)) if flip else logits

"""The RepOpt-VGG pipeline end to end (Ding et al., ICLR 2023, Sec. 3):

1. hyper-search: train ``<model>_hs`` (conv3x3 and conv1x1 branches with trainable
   per-channel scales) on the target data set (here CIFAR-10; the paper used CIFAR-100);
2. extract its scales (``scales.safetensors``);
3. train the plain ``<model>`` with the RepOptimizer built from them, its kernels first
   re-initialized as the merged kernel of a fresh constant-scale block.

Each stage is a normal run directory (``hs/``, ``target/``) and resumable on its own; a
finished stage is not run again. ``target/model.safetensors`` is the deployable model:
plain VGG, nothing to fuse.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deploykit.errors import DeployError
from deploykit.files import atomic_file
from deploykit.train.data import ImageSet
from deploykit.train.loop import MODEL_FILE, SUMMARY_FILE, TrainConfig, TrainProgress, TrainResult, train, zoo_model

logger = logging.getLogger(__name__)

SCALES_FILE = "scales.safetensors"
PIPELINE_FILE = "pipeline.json"


@dataclass
class RepOptResult:
    hyper_search: TrainResult | None  # None when the stage had finished in an earlier invocation
    target: TrainResult
    scales_path: Path


def save_scales(scales: dict[str, torch.Tensor], path: Path, *, source: str) -> None:
    from safetensors.torch import save_file

    with atomic_file(path, force=True) as tmp:
        save_file({k: v.contiguous() for k, v in scales.items()}, str(tmp), metadata={"source": source})


def load_scales(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise DeployError(f"scales file {path} does not exist; run the hyper-search stage first")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors' own error types for corrupt files
        raise DeployError(f"scales file {path} is unreadable: {err}") from err


def _finished(run: Path) -> bool:
    return (run / SUMMARY_FILE).is_file()


def _resumable(run: Path) -> bool:
    return (run / "checkpoint").is_dir()


def train_repopt(
    name: str,
    model_kwargs: dict[str, Any],
    train_data: ImageSet,
    val_data: ImageSet | None,
    out: Path,
    *,
    hs_config: TrainConfig,
    target_config: TrainConfig,
    preprocessing: Any,
    resume: bool = False,
    force: bool = False,
    progress: TrainProgress | None = None,
    model_factory: Callable[[dict[str, Any]], Any] | None = None,
) -> RepOptResult:
    """Run the three stages for RepOpt-VGG ``name`` (a target model such as ``repopt_vgg_a0``).

    ``model_factory``: builds ``{"name": ..., **model_kwargs}`` for both forms (default: the zoo).
    """
    from deploykit.checkpoint import read_checkpoint
    from deploykit.models import list_models
    from deploykit.models.repopt import extract_scales

    factory = model_factory or zoo_model
    if model_factory is None and (name.endswith("_hs") or f"{name}_hs" not in list_models()):
        targets = [n[: -len("_hs")] for n in list_models("*_hs")]
        raise DeployError(
            f"{name} is not a RepOpt-VGG target model with a hyper-search form; choose from {', '.join(targets)}"
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (resume or force):
        raise DeployError(f"{out} holds a RepOpt-VGG run; pass --resume to continue it or --force to start over")
    hs_run, target_run, scales_path = out / "hs", out / "target", out / SCALES_FILE
    hs_spec, target_spec = {"name": f"{name}_hs", **model_kwargs}, {"name": name, **model_kwargs}

    hs_result = None
    if not (resume and _finished(hs_run)):
        logger.info("RepOpt-VGG stage 1/3: hyper-search %s_hs", name)
        hs_result = train(hs_spec, train_data, val_data, hs_run, hs_config, preprocessing=preprocessing,
                          resume=resume and _resumable(hs_run), force=force, progress=progress, model_factory=factory)
    logger.info("RepOpt-VGG stage 2/3: extracting scales")
    hs_model = factory(hs_spec)
    hs_model.load_state_dict(read_checkpoint(hs_run / MODEL_FILE)[0])
    scales = extract_scales(hs_model)
    if resume and scales_path.is_file():
        saved = load_scales(scales_path)
        if saved.keys() != scales.keys() or any(not torch.equal(saved[k], scales[k]) for k in saved):
            raise DeployError(f"{scales_path} does not match {hs_run}/model.safetensors; start over with --force")
    save_scales(scales, scales_path, source=str(hs_run / MODEL_FILE))
    logger.info("RepOpt-VGG stage 3/3: training %s with the RepOptimizer", name)
    target_result = train(target_spec, train_data, val_data, target_run, target_config, preprocessing=preprocessing,
                          scales=scales, resume=resume and _resumable(target_run), force=force, progress=progress,
                          model_factory=factory)
    hs_summary = json.loads((hs_run / SUMMARY_FILE).read_text())
    pipeline = {
        "model": name,
        "paper": "Ding et al. 2023, Re-parameterizing Your Optimizers rather than Architectures (ICLR)",
        "hyper_search": {"run": str(hs_run), "train_seconds": hs_summary["train_seconds"],
                         "final_val_top1": hs_summary["final_val_top1"], "data": hs_summary["data"]["train"]},
        "scales": str(scales_path),
        "target": {"run": str(target_run), "train_seconds": round(target_result.train_seconds, 2),
                   "final_val_top1": target_result.final_val_top1},
        "total_train_seconds": round(hs_summary["train_seconds"] + target_result.train_seconds, 2),
    }
    with atomic_file(out / PIPELINE_FILE, force=True) as tmp:
        tmp.write_text(json.dumps(pipeline, indent=2) + "\n")
    return RepOptResult(hs_result, target_result, scales_path)

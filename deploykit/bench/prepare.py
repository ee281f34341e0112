"""Artifacts for a sweep: each distinct build made once, cached, then loaded into a runner.

The cache directory of an artifact is keyed by a hash of everything that decides its bytes
(model and its keywords, form, target and options, precision, batch, input size, classes,
seed, calibration); threads are a load-time setting and not part of it. A sweep run twice,
or two sweeps sharing configurations, build once. The model itself is fused and exported to
ONNX once per (model, form, batch, input size) and that file is shared by every target.

The ``train`` form (multi-branch, not re-parameterized) is exported as is; ``deploy`` goes
through ``deploykit.fuse.reparameterize`` first. ``weights_from`` gives a model the weights of
another entry (e.g. ConvNeXt linear -> 1x1 conv), checked to compute the same function.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.artifact import SCHEMA_VERSION, Artifact, is_artifact, write_record
from deploykit.backends.base import BuildConfig, check_precision, get_backend
from deploykit.bench.spec import Config, ModelSpec, SweepSpec
from deploykit.errors import DeployError

logger = logging.getLogger(__name__)

# Same weights in two layouts must agree to float32 rounding (relative to the logits' scale).
WEIGHTS_FROM_TOLERANCE_REL = 1e-4


class NotRunnable(DeployError):
    """The configuration cannot run on this machine (unknown model or target, backend missing)."""


@dataclass
class Prepared:
    config: Config
    runner: Any
    inputs: np.ndarray
    artifact: Artifact
    build: dict[str, Any] = field(default_factory=dict)
    backend: Any = None  # the Backend: how its runners are timed (Backend.timer, Backend.clock)


def check_runnable(config: Config) -> Any:
    """The backend for ``config``, or NotRunnable saying why this machine cannot run it."""
    from deploykit.models import get_entry

    try:
        backend = get_backend(config.target.name)
    except DeployError as err:
        raise NotRunnable(str(err)) from err
    if backend.version() is None:
        raise NotRunnable(backend.missing_reason())
    try:
        check_precision(backend, config.precision)
        if _is_zoo_name(config.model.name):
            get_entry(config.model.name)
    except DeployError as err:
        raise NotRunnable(str(err)) from err
    return backend


def _is_zoo_name(name: str) -> bool:
    return ".py:" not in name and not Path(name).exists()


def _hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _model_identity(config: Config, spec: SweepSpec) -> dict[str, Any]:
    """Everything that decides the exported model (not the target it is built for)."""
    return {
        "model": config.model.model_dump(),
        "source": spec.model(config.model.weights_from).model_dump() if config.model.weights_from else None,
        "form": config.form,
        "batch": config.batch,
        "input_size": config.input_size,
        "num_classes": spec.num_classes,
        "cifar": spec.cifar,
        "seed": spec.seed,
        "schema": SCHEMA_VERSION,
    }


def build_key(config: Config, spec: SweepSpec) -> str:
    return _hash({
        **_model_identity(config, spec),
        "target": config.target.name,
        "options": config.target.options,
        "precision": config.precision,
        "calib": [spec.calib, spec.calib_samples] if config.precision == "int8" else None,
    })


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in label)


def artifact_dir(config: Config, spec: SweepSpec) -> Path:
    name = (f"{_safe(config.model.label)}-{config.form}-{config.target.name}-{config.precision}-b{config.batch}-"
            f"{build_key(config, spec)}")
    return Path(spec.cache_dir) / name


def _create(model: ModelSpec, spec: SweepSpec, input_size: int | None) -> tuple[Any, int]:
    """The model in train form, eval mode, initialised from ``spec.seed``."""
    import torch

    from deploykit.loading import load_model
    from deploykit.models import create_model

    torch.manual_seed(spec.seed)
    if model.kwargs:
        if not _is_zoo_name(model.name):
            raise DeployError(f"model {model.label}: kwargs apply to zoo models only")
        net = create_model(model.name, num_classes=spec.num_classes, cifar=spec.cifar, **model.kwargs).eval()
        return net, input_size or int(getattr(net, "default_input_size", 224))
    loaded = load_model(model.name, num_classes=spec.num_classes, cifar=spec.cifar, input_size=input_size)
    return loaded.model, loaded.input_size


def transfer_weights(source: Any, target: Any, input_size: int) -> float:
    """Load ``source``'s weights into ``target`` (same names; a tensor may change shape, not
    size, e.g. Linear (O, I) -> 1x1 conv (O, I, 1, 1)); return the relative output difference."""
    import torch

    src, dst = source.state_dict(), target.state_dict()
    if set(src) != set(dst):
        diff = sorted(set(src) ^ set(dst))[:3]
        raise DeployError(f"weights_from: the models' parameter names differ ({', '.join(diff)} ...)")
    converted = {}
    for key, value in dst.items():
        if src[key].numel() != value.numel():
            raise DeployError(f"weights_from: {key} has {src[key].numel()} values, the target needs {value.numel()}")
        converted[key] = src[key].reshape(value.shape)
    target.load_state_dict(converted)
    x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = source(x), target(x)
    rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    if rel > WEIGHTS_FROM_TOLERANCE_REL:
        raise DeployError(f"weights_from: the models do not compute the same function (rel. error {rel:.1e})")
    return rel


def instantiate(config: Config, spec: SweepSpec, *, certify: bool = True) -> tuple[Any, int, dict[str, Any]]:
    """The torch model exactly as it will be exported, its input size, and facts about it.

    ``certify=False`` skips the fusion's equivalence check: for rebuilding a model whose
    fusion was certified already when it was exported (same seed, same weights, same graph).
    """
    from deploykit.models.profile import count_macs, count_params

    model, size = _create(config.model, spec, config.input_size)
    facts: dict[str, Any] = {}
    if config.model.weights_from:
        source, _ = _create(spec.model(config.model.weights_from), spec, size)
        facts["weights_from"] = {"model": config.model.weights_from, "max_rel_error": transfer_weights(source, model, size)}
    if config.form == "deploy":
        from deploykit.fuse import reparameterize

        model = reparameterize(model, input_shape=(1, 3, size, size), check=certify).model.eval()
    facts.update(params=count_params(model), macs=count_macs(model, size), input_size=size)
    return model, size, facts


def _build_with_pipeline(config: Config, spec: SweepSpec, onnx_path: Path, out: Path) -> None:
    """deploykit.build on the exported ONNX: calibration, backend build, verification, build.json."""
    from deploykit.build import BuildRequest, build

    # Verification inputs come in whole batches when the model has a fixed batch > 1.
    verify = config.batch * max(1, 16 // config.batch)
    build(BuildRequest(
        model=str(onnx_path), target=config.target.name, precision=config.precision, calib=spec.calib,
        calib_samples=spec.calib_samples, out=out, threads=config.threads, options=dict(config.target.options),
        force=True, verify_samples=verify, seed=spec.seed,
    ))


def _build_from_module(config: Config, backend: Any, model: Any, onnx_path: Path, out: Path) -> None:
    """Targets built from the nn.Module itself (build.py takes only .onnx for the others)."""
    from deploykit.files import atomic_dir
    from deploykit.onnxio import onnx_io

    start = time.perf_counter()
    with atomic_dir(out, force=True) as tmp:
        facts = backend.build(onnx_path, tmp, BuildConfig(precision=config.precision, threads=config.threads,
                                                          options=dict(config.target.options), source_model=model))
        write_record(
            tmp, target=config.target.name, precision=config.precision, threads=config.threads,
            model={"name": config.model.label, "spec": config.model.model_dump(), "form": config.form},
            **onnx_io(onnx_path), backend=facts, build_seconds=round(time.perf_counter() - start, 3),
            built_by="deploykit.bench (no verification: the artifact is the module itself)",
        )


def onnx_stem(config: Config, spec: SweepSpec) -> str:
    """Where ``exported_onnx`` keeps the model, relative to the cache directory (no suffix)."""
    return f"onnx/{_safe(config.model.label)}-{config.form}-b{config.batch}-{_hash(_model_identity(config, spec))}"


def exported_onnx(config: Config, spec: SweepSpec) -> tuple[Path, dict[str, Any]]:
    """The model of ``config`` exported to ONNX, shared by every target (fusing and exporting
    a model once per sweep, not once per target); with its facts (params, MACs, input size)."""
    from deploykit.export import export_onnx
    from deploykit.files import atomic_file

    stem = Path(spec.cache_dir) / onnx_stem(config, spec)
    onnx_path, facts_path = stem.with_suffix(".onnx"), stem.with_suffix(".json")
    if onnx_path.is_file() and facts_path.is_file():
        return onnx_path, json.loads(facts_path.read_text())
    start = time.perf_counter()
    model, size, facts = instantiate(config, spec)
    export_onnx(model, onnx_path, input_size=size, batch=config.batch, force=True)
    facts["export_s"] = round(time.perf_counter() - start, 3)
    with atomic_file(facts_path, force=True) as tmp:
        tmp.write_text(json.dumps(facts, indent=2) + "\n")
    return onnx_path, facts


def build_artifact(config: Config, spec: SweepSpec, backend: Any) -> tuple[Artifact, dict[str, Any]]:
    """Build (or reuse) the artifact for ``config`` in the sweep's cache directory.

    Returns the artifact and the bench's facts about it (params, MACs, build time, cached),
    kept in ``<artifact>.bench.json`` beside the directory so build.json stays the pipeline's.
    """
    from deploykit.files import atomic_file

    out = artifact_dir(config, spec)
    sidecar = out.with_name(out.name + ".bench.json")
    if is_artifact(out) and sidecar.is_file():
        logger.info("reusing %s", out)
        return Artifact.open(out), {**json.loads(sidecar.read_text()), "cached": True}
    start = time.perf_counter()
    onnx_path, facts = exported_onnx(config, spec)
    if backend.builds_from_module:
        model, _, _ = instantiate(config, spec, certify=False)  # certified by exported_onnx
        _build_from_module(config, backend, model, onnx_path, out)
    else:
        _build_with_pipeline(config, spec, onnx_path, out)
    facts = {**facts, "build_s": round(time.perf_counter() - start, 3)}
    with atomic_file(sidecar, force=True) as tmp:
        tmp.write_text(json.dumps(facts, indent=2) + "\n")
    return Artifact.open(out), {**facts, "cached": False}


def prepare(config: Config, spec: SweepSpec, backend: Any) -> Prepared:
    """Build or reuse the artifact, load it with the configured threads, check it runs."""
    artifact, facts = build_artifact(config, spec, backend)
    runner = backend.load(artifact, threads=config.threads)
    size = int(facts["input_size"])
    inputs = np.random.default_rng(spec.seed).standard_normal((config.batch, 3, size, size)).astype(np.float32)
    out = np.asarray(runner(inputs))
    if out.shape[0] != config.batch or not np.all(np.isfinite(out)):
        raise DeployError(f"{config.short()}: the artifact returned shape {out.shape} or non-finite values")
    verification = artifact.record.verification or {}
    build = {
        "path": str(artifact.path),
        **facts,
        "size_bytes": artifact.record.size_bytes,
        "runtime_version": backend.version(),
        "verified": verification.get("passed"),
        "cosine_min": verification.get("cosine_min"),
    }
    return Prepared(config, runner, inputs, artifact, build, backend)

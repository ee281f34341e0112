"""``package_artifact``: a built artifact -> one self-checking ``NAME.tar.gz`` for a device.

Packaging runs the artifact here, with its own runtime, on seeded inputs (random pixels
through the artifact's preprocessing) and ships those inputs and outputs as the golden
self-test. The archive is written to a temporary file beside ``out`` and renamed.
"""
from __future__ import annotations

import datetime as dt
import logging
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit import __version__
from deploykit.backends.base import BUILD_JSON, Artifact, get_backend
from deploykit.errors import DeployError, MissingBackendError, UsageError
from deploykit.files import atomic_file, sha256_file, sha256_tree, temp_dir
from deploykit.package.manifest import (
    GOLDEN, MANIFEST, MODEL_DIR, README, RUNNER, RUNTIMES, SCHEMA_VERSION, SELF_TEST_TOLERANCES, Golden, LatencyBand,
    Manifest, Runtime, TensorSpec,
)

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).with_name("runner_template")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
DEFAULT_GOLDEN_COUNT = 8
LATENCY_BAND = (0.5, 2.0)  # accepted median latency, as multiples of the recorded median
LATENCY_WARMUP, LATENCY_ITERATIONS = 10, 50


@dataclass(frozen=True)
class PackageResult:
    path: Path
    manifest: Manifest
    size_bytes: int
    sha256: str  # of the archive: publish it beside the bundle to detect a forged one


def bundle_name(out: Path) -> str:
    """``NAME`` of ``NAME.tar.gz``: the bundle's top-level directory."""
    for suffix in ARCHIVE_SUFFIXES:
        if out.name.endswith(suffix) and len(out.name) > len(suffix):
            return re.sub(r"[^A-Za-z0-9_.-]+", "-", out.name[: -len(suffix)])
    raise UsageError(f"--out {out}: name the bundle NAME.tar.gz")


def _check_artifact(artifact: Artifact) -> None:
    """The artifact's files are those build.json lists, unchanged since the build."""
    listed = artifact.meta["files"]
    present = sha256_tree(artifact.path)
    present.pop(BUILD_JSON, None)
    for rel, digest in listed.items():
        if rel not in present:
            raise DeployError(f"{artifact.path}: {rel} is listed in {BUILD_JSON} but missing; rebuild the artifact")
        if present[rel] != digest:
            raise DeployError(f"{artifact.path}: {rel} changed since the build (sha256 differs); rebuild the artifact")
    extra = sorted(set(present) - set(listed))
    if extra:
        raise DeployError(f"{artifact.path}: {', '.join(extra)} not listed in {BUILD_JSON}; rebuild the artifact")
    facts = artifact.meta.get("backend") or {}
    if not facts.get("model_file"):
        raise DeployError(
            f"{artifact.path} holds no runnable model (an --emit-only build?): build it on the device, then package"
        )
    if artifact.target not in RUNTIMES:
        raise DeployError(f"target {artifact.target} cannot be packaged; bundles run on {', '.join(RUNTIMES)}")


def resolve_labels(labels: list[str] | None, meta: dict[str, Any], num_classes: int | None) -> tuple[list[str], str]:
    """(labels, where they came from): given, else the build's classes, else class_0..class_N-1."""
    known = labels or meta.get("classes") or (meta.get("calibration") or {}).get("classes")
    source = "given" if labels else "build.json" if known else "generated (no class names known)"
    if not known:
        if num_classes is None:
            raise DeployError("the model's output size is not fixed: pass the class labels (--labels)")
        known = [f"class_{i}" for i in range(num_classes)]
    if num_classes is not None and len(known) != num_classes:
        raise UsageError(f"{len(known)} labels for a model with {num_classes} outputs")
    return [str(label) for label in known], source


def golden_inputs(preprocessing: Any, count: int, seed: int):
    """``count`` seeded random-pixel images through ``preprocessing``: realistic input ranges."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    size = preprocessing.size
    pixels = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
    return np.stack([preprocessing.apply(Image.fromarray(p)) for p in pixels])


def measure_latency_ms(runner: Any, sample: Any, *, warmup: int = LATENCY_WARMUP,
                       iterations: int = LATENCY_ITERATIONS) -> dict[str, float]:
    """Median and p90 wall time (ms) of ``runner(sample)`` after ``warmup`` calls."""
    import numpy as np

    from deploykit.bench.timing import host_timer

    measure = host_timer(runner, sample)
    measure(warmup)
    times_ms = measure(iterations) * 1e3
    return {"median_ms": float(np.median(times_ms)), "p90_ms": float(np.percentile(times_ms, 90)),
            "iterations": iterations}


def _latency_band(meta: dict[str, Any], runner: Any, sample: Any, threads: int, measure: bool) -> LatencyBand | None:
    from deploykit.device import device_fingerprint

    recorded = meta.get("latency") or {}
    if recorded.get("median_ms"):
        figures, source, device = recorded, "build", meta.get("device") or {}
    elif measure:
        figures, source, device = measure_latency_ms(runner, sample), "package", device_fingerprint()
    else:
        return None
    median = float(figures["median_ms"])
    return LatencyBand(
        median_ms=median, band_ms=(median * LATENCY_BAND[0], median * LATENCY_BAND[1]), batch=len(sample),
        threads=int(figures.get("threads", threads)), iterations=int(figures.get("iterations", 1)), source=source,
        device={k: device.get(k) for k in ("cpu", "arch", "id")},
    )


def _runtime(artifact: Artifact, installed: str | None) -> Runtime:
    module, distributions = RUNTIMES[artifact.target]
    versions = artifact.meta.get("versions") or {}
    built = next((versions[d] for d in distributions if d in versions), None)
    device = None
    if artifact.target == "tensorrt":
        environment = artifact.meta["backend"].get("environment") or {}
        built = environment.get("tensorrt_version") or built
        device = {k: environment.get(k) for k in ("gpu_name", "compute_capability")}
    return Runtime(backend=artifact.target, module=module, version=built or installed, device=device)


def _write_archive(stage: Path, out: Path, force: bool) -> None:
    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755 if info.isdir() or info.name.endswith(".py") else 0o644
        return info

    with atomic_file(out, force=force) as tmp:
        with tarfile.open(tmp, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
            tar.add(stage, arcname=stage.name, filter=normalize)


def package_artifact(artifact_dir: str | Path, out_tar_gz: str | Path, *, force: bool = False,
                     labels: list[str] | None = None, golden_count: int = DEFAULT_GOLDEN_COUNT, seed: int = 0,
                     threads: int | None = None, measure_latency: bool = False) -> PackageResult:
    """Write the bundle for ``artifact_dir`` to ``out_tar_gz`` (see deploykit.package.manifest)."""
    import numpy as np

    from deploykit.calib.preprocess import Preprocessing

    out = Path(out_tar_gz)
    name = bundle_name(out)
    if out.exists() and not force:
        raise DeployError(f"{out} exists; pass --force to replace it")
    if golden_count < 1:
        raise UsageError("golden_count must be at least 1")
    artifact = Artifact.open(artifact_dir)
    meta = artifact.meta
    _check_artifact(artifact)
    for key in ("inputs", "outputs", "preprocessing"):
        if not meta.get(key):
            raise DeployError(f"{artifact.path / BUILD_JSON} lacks {key!r}; rebuild the artifact")
    backend = get_backend(artifact.target)
    installed = backend.version()
    if installed is None:
        raise MissingBackendError(backend.name, f"{backend.name} to record the golden outputs", backend.extra)
    threads = threads or int(meta.get("threads") or 2)
    preprocessing = Preprocessing.model_validate(meta["preprocessing"])
    batch = meta["inputs"][0]["shape"][0]
    count = golden_count if not isinstance(batch, int) else -(-golden_count // batch) * batch

    runner = backend.load(artifact, threads=threads)
    inputs = golden_inputs(preprocessing, count, seed)
    outputs = np.asarray(runner(inputs), dtype=np.float32)
    if not np.isfinite(outputs).all():
        raise DeployError(f"{artifact.path} gives non-finite outputs on the golden inputs; not packaged")
    classes = meta["outputs"][0]["shape"][-1]
    label_list, labels_source = resolve_labels(labels, meta, classes if isinstance(classes, int) else None)
    one = inputs[: batch if isinstance(batch, int) else 1]
    latency = _latency_band(meta, runner, one, threads, measure_latency)

    with temp_dir("package") as work:
        stage = Path(work) / name
        (stage / MODEL_DIR).mkdir(parents=True)
        for rel in [*meta["files"], BUILD_JSON]:
            (stage / MODEL_DIR / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(artifact.path / rel, stage / MODEL_DIR / rel)
        np.savez(stage / GOLDEN, inputs=inputs, outputs=outputs)
        shutil.copyfile(TEMPLATE_DIR / RUNNER, stage / RUNNER)
        shutil.copyfile(TEMPLATE_DIR / README, stage / README)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            name=name,
            created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            deploykit_version=__version__,
            model=(meta.get("model") or {}).get("name") or artifact.path.name,
            target=meta.get("profile") or artifact.target,
            backend=artifact.target,
            precision=artifact.precision,
            threads=threads,
            model_file=f"{MODEL_DIR}/{meta['backend']['model_file']}",
            inputs=[TensorSpec.model_validate(t) for t in meta["inputs"]],
            outputs=[TensorSpec.model_validate(t) for t in meta["outputs"]],
            preprocessing=preprocessing,
            labels=label_list,
            labels_source=labels_source,
            runtime=_runtime(artifact, installed),
            versions=meta.get("versions") or {},
            verification=meta.get("verification") or {},
            tolerance=SELF_TEST_TOLERANCES.get(artifact.precision, SELF_TEST_TOLERANCES["int8"]),
            golden=Golden(count=count, seed=seed, inputs="seeded uniform random pixels through the preprocessing",
                          produced_with=f"{backend.name} {installed}"),
            latency=latency,
            files=sha256_tree(stage),
        )
        (stage / MANIFEST).write_text(manifest.to_json())
        _write_archive(stage, out, force)
    size = out.stat().st_size
    logger.info("packaged %s (%d bytes, %d files)", out, size, len(manifest.files) + 1)
    return PackageResult(out, manifest, size, sha256_file(out))

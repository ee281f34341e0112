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
from deploykit.artifact import BUILD_JSON, Artifact, ArtifactRecord
from deploykit.backends.base import DEFAULT_THREADS, Backend, get_backend, packageable
from deploykit.errors import DeployError, MissingBackendError, UsageError
from deploykit.files import atomic_file, sha256_file, sha256_tree, temp_dir
from deploykit.package.manifest import (
    GOLDEN, MANIFEST, MODEL_DIR, README, RUNNER, SCHEMA_VERSION, SELF_TEST_TOLERANCES, Golden, LatencyBand, Manifest,
    Runtime,
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


def _check_artifact(artifact: Artifact, backend: Backend) -> None:
    """The artifact's files are those build.json lists, unchanged since the build."""
    listed = artifact.record.files
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
    if not artifact.backend.get("model_file"):
        raise DeployError(
            f"{artifact.path} holds no runnable model (an --emit-only build?): build it on the device, then package"
        )
    if backend.runtime_module is None:
        raise DeployError(f"target {artifact.target} cannot be packaged; bundles run on {', '.join(packageable())}")


def resolve_labels(labels: list[str] | None, record: ArtifactRecord, num_classes: int | None) -> tuple[list[str], str]:
    """(labels, where they came from): given, else the build's classes, else class_0..class_N-1."""
    known = labels or record.classes or (record.calibration or {}).get("classes")
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


def measure_latency_ms(backend: Backend, runner: Any, sample: Any, *, warmup: int = LATENCY_WARMUP,
                       iterations: int = LATENCY_ITERATIONS) -> dict[str, float]:
    """Median and p90 time (ms) of ``runner(sample)`` after ``warmup`` calls (deploykit.bench.timing)."""
    from deploykit.bench.timing import fixed_iterations, timer_for

    return fixed_iterations(timer_for(backend, runner, sample), warmup=warmup, iterations=iterations)


def _latency_band(record: ArtifactRecord, backend: Backend, runner: Any, sample: Any, threads: int,
                  measure: bool) -> LatencyBand | None:
    from deploykit.device import device_fingerprint

    recorded = record.latency or {}
    if recorded.get("median_ms"):
        figures, source, device = recorded, "build", record.device or {}
    elif measure:
        figures, source, device = measure_latency_ms(backend, runner, sample), "package", device_fingerprint()
    else:
        return None
    median = float(figures["median_ms"])
    return LatencyBand(
        median_ms=median, band_ms=(median * LATENCY_BAND[0], median * LATENCY_BAND[1]), batch=len(sample),
        threads=int(figures.get("threads", threads)), iterations=int(figures.get("iterations", 1)), source=source,
        device={k: device.get(k) for k in ("cpu", "arch", "id")},
    )


def _runtime(artifact: Artifact, backend: Backend, installed: str | None) -> Runtime:
    versions = artifact.record.versions
    built = next((versions[d] for d in backend.distributions if d in versions), None)
    tied_version, device = backend.built_with(artifact.backend)
    return Runtime(backend=artifact.target, module=backend.runtime_module, version=tied_version or built or installed,
                   device=device, config=backend.runtime_config(artifact.backend))


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
    from deploykit.resolve import open_artifact

    artifact = open_artifact(artifact_dir)
    record = artifact.record
    backend = get_backend(artifact.target)
    _check_artifact(artifact, backend)
    for key in ("inputs", "outputs", "preprocessing"):
        if not getattr(record, key):  # fields of the record, not a probe of a backend
            raise DeployError(f"{artifact.path / BUILD_JSON} lacks {key!r}; rebuild the artifact")
    installed = backend.version()
    if installed is None:
        raise MissingBackendError(backend.name, f"{backend.name} to record the golden outputs", backend.extra)
    threads = threads or record.threads or DEFAULT_THREADS
    preprocessing = record.preprocessing
    batch = record.inputs[0].shape[0]
    count = golden_count if not isinstance(batch, int) else -(-golden_count // batch) * batch

    runner = backend.load(artifact, threads=threads)
    inputs = golden_inputs(preprocessing, count, seed)
    outputs = np.asarray(runner(inputs), dtype=np.float32)
    if not np.isfinite(outputs).all():
        raise DeployError(f"{artifact.path} gives non-finite outputs on the golden inputs; not packaged")
    classes = record.outputs[0].shape[-1]
    label_list, labels_source = resolve_labels(labels, record, classes if isinstance(classes, int) else None)
    one = inputs[: batch if isinstance(batch, int) else 1]
    latency = _latency_band(record, backend, runner, one, threads, measure_latency)

    with temp_dir("package") as work:
        stage = Path(work) / name
        (stage / MODEL_DIR).mkdir(parents=True)
        for rel in [*record.files, BUILD_JSON]:
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
            model=record.model.name if record.model is not None else artifact.path.name,
            target=record.profile or artifact.target,
            backend=artifact.target,
            precision=artifact.precision,
            threads=threads,
            model_file=f"{MODEL_DIR}/{artifact.backend['model_file']}",
            inputs=record.inputs,
            outputs=record.outputs,
            preprocessing=preprocessing,
            labels=label_list,
            labels_source=labels_source,
            runtime=_runtime(artifact, backend, installed),
            versions=record.versions,
            verification=record.verification or {},
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

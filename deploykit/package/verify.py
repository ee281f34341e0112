"""``verify_bundle``: is this bundle intact, and does it compute here what it computed when packaged?

Checks, in order, stopping at the first failure: safe extraction (``extract``), the manifest
against its schema, the sha256 of every file (and no file the manifest does not list), the
installed runtime's version (rule in ``manifest``), the golden inputs against the golden
outputs within the manifest's tolerance (exit 3 outside), and with ``latency=True`` the
median latency against the recorded band (exit 3 above it, on the device that recorded it).

Bundle code is never executed here: the model runs through deploykit's own backends.
Checksums catch corruption and a changed file; they cannot catch a bundle forged whole
(manifest included): compare the archive's sha256 with the one ``deploykit package`` printed.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import DeployError, QualityGateError
from deploykit.files import sha256_file, temp_dir
from deploykit.package.extract import extract_bundle
from deploykit.package.manifest import MANIFEST, MODEL_DIR, Manifest, check_runtime, read_manifest

logger = logging.getLogger(__name__)

IGNORED_DIRS = ("__pycache__",)  # written by Python beside the runner; never part of a bundle


@dataclass(frozen=True)
class VerifyReport:
    manifest: Manifest
    files_checked: int
    comparison: dict[str, Any]
    installed_version: str
    warnings: list[str] = field(default_factory=list)
    latency: dict[str, Any] | None = None


@contextlib.contextmanager
def open_bundle(path: str | Path) -> Iterator[Path]:
    """Yield the bundle root of an archive (extracted to a temporary directory) or of a directory."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.exists():
        raise DeployError(f"{path} does not exist")
    with temp_dir("bundle") as tmp:
        yield extract_bundle(path, Path(tmp) / "bundle")


def check_files(root: Path, manifest: Manifest) -> int:
    """Every listed file present, a regular file, with its sha256; nothing unlisted. Returns the count."""
    for rel, expected in sorted(manifest.files.items()):
        target = root / rel
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise DeployError(f"{rel} in the bundle is not a regular file")
        if not target.is_file():
            raise DeployError(f"{rel} is listed in {MANIFEST} but missing from the bundle")
        actual = sha256_file(target)
        if actual != expected:
            raise DeployError(
                f"checksum mismatch: {rel} (sha256 {actual[:12]}..., {MANIFEST} says {expected[:12]}...): "
                "the file was changed or corrupted"
            )
    for found in sorted(root.rglob("*")):
        rel = found.relative_to(root).as_posix()
        if any(part in IGNORED_DIRS for part in found.relative_to(root).parts):
            continue
        if found.is_symlink():
            raise DeployError(f"{rel} in the bundle is a symlink; bundles hold only files and directories")
        if found.is_file() and rel != MANIFEST and rel not in manifest.files:
            raise DeployError(f"{rel} is in the bundle but not listed in {MANIFEST}")
    return len(manifest.files)


def load_bundle_model(root: Path, manifest: Manifest, threads: int) -> tuple[Any, str, list[str]]:
    """(runner, installed runtime version, version warnings) through deploykit's backend."""
    from deploykit.backends.base import Artifact, get_backend
    from deploykit.device import bound_threads

    threads = bound_threads(threads)  # the manifest's count comes from the packaging machine

    backend = get_backend(manifest.backend)
    installed = backend.version()
    warnings = check_runtime(manifest.runtime, installed)
    artifact = Artifact.open(root / MODEL_DIR)
    if artifact.target != manifest.backend or artifact.precision != manifest.precision:
        raise DeployError(f"{MODEL_DIR}/build.json ({artifact.target} {artifact.precision}) disagrees with "
                          f"{MANIFEST} ({manifest.backend} {manifest.precision})")
    return backend.load(artifact, threads=threads), installed or "", warnings


def _golden_check(root: Path, manifest: Manifest, runner: Any) -> tuple[dict[str, Any], Any]:
    import numpy as np

    from deploykit.verify import Tolerance, compare, judge

    try:
        with np.load(root / manifest.golden.file, allow_pickle=False) as golden:
            inputs, expected = golden["inputs"], golden["outputs"]
    except (OSError, ValueError, KeyError) as err:
        raise DeployError(f"{manifest.golden.file} is unreadable: {err}") from err
    actual = np.asarray(runner(inputs), dtype=np.float32)
    if actual.shape != expected.shape:
        raise QualityGateError(f"golden self-test: outputs of shape {actual.shape}, recorded {expected.shape}")
    comparison = compare(expected, actual)
    problems = judge(comparison, Tolerance(gate=True, **manifest.tolerance.model_dump()))
    if problems:
        raise QualityGateError(
            f"golden self-test failed on {comparison.samples} inputs: {'; '.join(problems)}. This machine does not "
            f"compute what {manifest.golden.produced_with} computed when the bundle was made"
        )
    return comparison.to_dict(), inputs


def _latency_check(manifest: Manifest, runner: Any, inputs: Any) -> tuple[dict[str, Any], list[str]]:
    from deploykit.device import describe_cpu, device_fingerprint, same_cpu
    from deploykit.backends.base import get_backend
    from deploykit.package.bundle import measure_latency_ms

    batch = manifest.latency.batch if manifest.latency else 1
    figures: dict[str, Any] = measure_latency_ms(get_backend(manifest.backend), runner, inputs[:batch])
    band = manifest.latency
    if band is None:
        figures["band"] = "none recorded"
        return figures, ["no latency band recorded in the bundle: latency measured, not judged"]
    here = device_fingerprint()
    figures["band_ms"] = list(band.band_ms)
    if not same_cpu(band.device, here):
        figures["band"] = "not comparable"
        return figures, [f"latency band recorded on {describe_cpu(band.device)} ({band.device.get('arch')}); "
                         f"this is {describe_cpu(here)} ({here.get('arch')}): measured, not judged"]
    low, high = band.band_ms
    if figures["median_ms"] > high:
        raise QualityGateError(
            f"latency {figures['median_ms']:.3f} ms (median of {figures['iterations']}) is above the band "
            f"{low:.3f}-{high:.3f} ms recorded at {band.source} time on this device"
        )
    figures["band"] = "within" if figures["median_ms"] >= low else "faster than the band"
    return figures, []


def verify_bundle(path: str | Path, latency: bool = False, *, threads: int | None = None) -> VerifyReport:
    """Check the bundle at ``path`` (.tar.gz or extracted directory); raise on the first failure."""
    with open_bundle(path) as root:
        manifest = read_manifest(root)
        checked = check_files(root, manifest)
        runner, installed, warnings = load_bundle_model(root, manifest, threads or manifest.threads)
        comparison, inputs = _golden_check(root, manifest, runner)
        latency_figures = None
        if latency:
            latency_figures, notes = _latency_check(manifest, runner, inputs)
            warnings = [*warnings, *notes]
    for text in warnings:
        logger.warning(text)
    return VerifyReport(manifest, checked, comparison, installed, warnings, latency_figures)

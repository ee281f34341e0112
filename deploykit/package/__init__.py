"""Edge-device bundles: package an artifact, verify a bundle, run it on images.

Imported only by the commands that use it; the runtimes are imported on first use.
"""
from __future__ import annotations

from deploykit.package.bundle import PackageResult, package_artifact
from deploykit.package.extract import ExtractLimits, extract_bundle
from deploykit.package.manifest import Manifest, read_manifest
from deploykit.package.run import Prediction, run_bundle
from deploykit.package.verify import VerifyReport, verify_bundle

__all__ = [
    "ExtractLimits", "Manifest", "PackageResult", "Prediction", "VerifyReport",
    "extract_bundle", "package_artifact", "read_manifest", "run_bundle", "verify_bundle",
]

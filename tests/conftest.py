"""Shared fixtures. Data-dependent tests skip with a reason when the dataset is absent."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_TGZ = Path(os.environ.get("DEPLOYKIT_CIFAR_TGZ", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))


@pytest.fixture(scope="session")
def cifar_tgz() -> Path:
    """The CIFAR-10 tarball (train/, test/ of JPEGs); the test skips when it is absent."""
    if not CIFAR_TGZ.is_file():
        pytest.skip(f"CIFAR-10 tarball not found at {CIFAR_TGZ} (set DEPLOYKIT_CIFAR_TGZ)")
    return CIFAR_TGZ


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CIFAR-10 image-folder tree (train/, test/), extracted once per test session."""
    if not CIFAR_TGZ.is_file():
        pytest.skip(f"CIFAR-10 tarball not found at {CIFAR_TGZ} (set DEPLOYKIT_CIFAR_TGZ)")
    root = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(CIFAR_TGZ) as tar:
        tar.extractall(root, filter="data")
    return root


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m deploykit ARGS`` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "deploykit", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )

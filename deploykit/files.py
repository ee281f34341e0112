"""Atomic outputs: write to a temporary sibling, rename when complete.

An interrupted or failed run never leaves a half-written artifact and never destroys the
previous one.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deploykit.errors import DeployError


def check_writable(out: Path, *, force: bool) -> None:
    """Refuse to overwrite an existing output unless ``force``."""
    if out.exists() and not force:
        raise DeployError(f"{out} exists; pass --force to replace it")
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_file(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it replaces ``out`` in one rename."""
    out = Path(out)
    check_writable(out, force=force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it takes ``out``'s place.

    The previous ``out`` (if any, and only with ``force``) is moved aside first and removed
    only after the new directory is in place.
    """
    out = Path(out)
    check_writable(out, force=force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root``, keyed by POSIX relative path."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }

"""Atomic outputs: write to a temporary sibling, rename when complete.

An interrupted or failed run never leaves a half-written artifact and never destroys the
previous one.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deploykit.errors import DeployError

logger = logging.getLogger(__name__)

# Temporary names carry the owning pid ("pPID-"), so a later run can tell a crashed run's
# leftovers (owner dead) from a running one's (owner alive) and remove only the former.
_TEMP_IN_TMPDIR = re.compile(r"^deploykit-[a-z0-9]+-p(\d+)-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def remove_stale(folder: Path, pattern: re.Pattern[str]) -> None:
    """Remove entries of ``folder`` whose name matches ``pattern`` (group 1: the owner's pid) and
    whose owner no longer runs: what a killed build left behind."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        logger.info("removing %s, left by a run that ended without cleaning up", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def _beside(out: Path) -> re.Pattern[str]:
    # Not ".NAME.old-pPID-": a run killed between its two renames leaves the previous output there.
    return re.compile(rf"^\.{re.escape(out.name)}\.p(\d+)-")


def temp_dir(kind: str) -> tempfile.TemporaryDirectory:
    """``TemporaryDirectory`` in TMPDIR named ``deploykit-KIND-pPID-*``; crashed runs' are removed first."""
    remove_stale(Path(tempfile.gettempdir()), _TEMP_IN_TMPDIR)
    return tempfile.TemporaryDirectory(prefix=f"deploykit-{kind}-p{os.getpid()}-")


def check_writable(out: Path, *, force: bool, kind: str = "file") -> None:
    """Refuse to overwrite an existing output unless ``force``; create its folder; fail early when
    the output cannot be written there (the parent is a file, the folder is read-only, a directory
    stands where a file goes). ``kind``: "file" or "dir", what ``out`` will be."""
    out = Path(out)
    if out.exists() and not force:
        raise DeployError(f"{out} exists; pass --force to replace it")
    if kind == "file" and out.is_dir():
        raise DeployError(f"{out} is a directory; give a file path for this output")
    if kind == "dir" and out.exists() and not out.is_dir():
        raise DeployError(f"{out} is a file; give a directory path for this output")
    parent = out.parent
    for above in (parent, *parent.parents):
        if above.exists():
            if not above.is_dir():
                raise DeployError(f"cannot write {out}: {above} is a file, not a directory")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DeployError(f"cannot create {parent}: {err.strerror or err}") from err
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DeployError(f"cannot write {out}: {parent} is not writable")


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.p{os.getpid()}-"


@contextlib.contextmanager
def atomic_file(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it replaces ``out`` in one rename."""
    out = Path(out)
    check_writable(out, force=force)
    remove_stale(out.parent, _beside(out))
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(out), suffix=".tmp", dir=out.parent)
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
    check_writable(out, force=force, kind="dir")
    remove_stale(out.parent, _beside(out))
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-p{os.getpid()}-"
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

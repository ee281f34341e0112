"""Safe extraction of a bundle archive: regular files and directories inside the destination only.

Refused, before anything is written for that member: absolute paths, ``..`` components,
backslashes and control characters in names, symlinks, hard links, character and block
devices, FIFOs, sparse files, duplicate names, and archives over the size or member limits
(archive bombs: the sizes come from the tar headers, so an oversized member is refused
before a byte of it is decompressed to disk). Python's own ``tarfile`` "data" filter runs
on every member as a second check. Extraction goes into a temporary directory renamed into
place on success: a refused or truncated archive leaves nothing behind.
"""
from __future__ import annotations

import posixpath
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from deploykit.errors import DeployError
from deploykit.files import atomic_dir


@dataclass(frozen=True)
class ExtractLimits:
    max_members: int = 1_000
    max_file_bytes: int = 4 << 30
    max_total_bytes: int = 8 << 30


DEFAULT_LIMITS = ExtractLimits()
# Extraction filters arrived in Python 3.12 and 3.10.12/3.11.4; the checks above stand alone without them.
_HAS_FILTERS = hasattr(tarfile, "data_filter")


def _kind(member: tarfile.TarInfo) -> str | None:
    """What a refused member is; None for a regular file or a directory."""
    if member.issym():
        return f"a symlink (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    if member.issparse():
        return "a sparse file"
    if member.isreg() or member.isdir():
        return None
    return f"an unsupported entry (tar type {member.type!r})"


def check_name(name: str) -> str:
    """The member's normalized relative path; raises DeployError for an unsafe one."""
    if not name or any(ord(ch) < 32 for ch in name) or "\\" in name:
        raise DeployError(f"refused archive member {name!r}: name has control characters or backslashes")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise DeployError(f"refused archive member {name!r}: absolute path")
    if ".." in name.split("/"):
        raise DeployError(f"refused archive member {name!r}: '..' path component")
    normalized = posixpath.normpath(name)
    if normalized in (".", "") or normalized.startswith("../"):
        raise DeployError(f"refused archive member {name!r}: not a path inside the bundle")
    return normalized


def _check_member(member: tarfile.TarInfo, dest: Path, seen: set[str], total: int, limits: ExtractLimits) -> int:
    """Validate one member; return the new running total of file bytes."""
    name = check_name(member.name)
    kind = _kind(member)
    if kind is not None:
        raise DeployError(f"refused archive member {member.name!r}: {kind}; bundles hold only files and directories")
    if name in seen:
        raise DeployError(f"refused archive member {member.name!r}: appears twice")
    seen.add(name)
    if member.isreg():
        if member.size > limits.max_file_bytes:
            raise DeployError(
                f"refused archive member {member.name!r}: {member.size} bytes, over the {limits.max_file_bytes}-byte "
                "limit per file"
            )
        total += member.size
        if total > limits.max_total_bytes:
            raise DeployError(f"refused archive: its files exceed the {limits.max_total_bytes}-byte limit in total")
        if shutil.disk_usage(dest).free < member.size:
            raise DeployError(f"not enough disk space in {dest} to extract {member.name!r} ({member.size} bytes)")
    if _HAS_FILTERS:
        try:
            tarfile.data_filter(member, str(dest))
        except tarfile.FilterError as err:
            raise DeployError(f"refused archive member {member.name!r}: {err}") from err
    return total


def extract_bundle(archive: Path, dest: Path, *, limits: ExtractLimits = DEFAULT_LIMITS) -> Path:
    """Extract ``archive`` (.tar.gz) into the new directory ``dest``; return the bundle root in it.

    The archive must hold one top-level directory; that directory is the bundle root.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DeployError(f"{archive} does not exist or is not a file")
    with atomic_dir(dest) as tmp:
        seen: set[str] = set()
        total = 0
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                for count, member in enumerate(tar, start=1):
                    if count > limits.max_members:
                        raise DeployError(f"refused archive: more than {limits.max_members} members")
                    total = _check_member(member, tmp, seen, total, limits)
                    if _HAS_FILTERS:
                        tar.extract(member, tmp, filter="data")
                    else:
                        tar.extract(member, tmp, set_attrs=False)
        except DeployError:
            raise
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise DeployError(f"{archive} is not a complete bundle archive (.tar.gz): {err}") from err
        roots = {name.split("/")[0] for name in seen}
        if len(roots) != 1 or not (tmp / next(iter(roots))).is_dir():
            shown = ", ".join(sorted(roots)[:5]) or "nothing"
            raise DeployError(f"{archive} should hold one top-level directory; it holds {shown}")
        root_name = next(iter(roots))
    return dest / root_name

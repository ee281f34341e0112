"""Result rows: one JSON object per line, appended atomically as each configuration ends.

Each row is written with a single ``os.write`` on an ``O_APPEND`` descriptor and fsynced,
so a run killed at any moment leaves every completed row whole and the file readable.
A malformed line is reported by file and line number, never as a traceback.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deploykit.errors import DeployError

SCHEMA = "deploykit.bench/1"
STATUS_OK = "ok"
STATUS_FAILED = "failed"
REQUIRED_KEYS = ("schema", "status", "config_id", "config", "device", "versions")
CONFIG_KEYS = ("model", "form", "target", "target_name", "precision", "batch", "threads")
SUMMARY_KEYS = ("median_ms", "min_ms", "p90_ms", "iqr_ms", "cv", "ci_low_ms", "ci_high_ms", "rounds", "unstable",
                "unstable_reasons")


def check_appendable(path: Path) -> None:
    """Fail now, before anything is measured, when rows could not be appended to ``path``."""
    from deploykit.files import check_writable

    path = Path(path)
    if path.is_dir():
        raise DeployError(f"{path} is a directory, not a results file")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise DeployError(f"cannot append results to {path}: the file is not writable")
    else:
        check_writable(path, force=False)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` as one line; the line is complete on disk when this returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, sort_keys=True, allow_nan=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size and not _ends_with_newline(fd):
            raise DeployError(f"{path}: the last line is incomplete; remove it before appending results")
        written = os.write(fd, data)
        if written != len(data):  # a regular local file takes all of it unless the disk is full
            raise DeployError(f"{path}: short write ({written} of {len(data)} bytes); is the disk full?")
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return os.pread(fd, 1, size - 1) == b"\n"


def _parse(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DeployError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise DeployError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise DeployError(f"{path}:{number}: not a deploykit result row (missing {', '.join(missing)})")
    if not isinstance(row["device"], dict) or "id" not in row["device"]:
        raise DeployError(f"{path}:{number}: 'device' must be an object with an 'id'")
    if row["schema"] != SCHEMA:
        raise DeployError(f"{path}:{number}: result schema {row['schema']!r}, this deploykit reads {SCHEMA!r}")
    _require(path, number, "config", row["config"], CONFIG_KEYS)
    if row["status"] == STATUS_OK:
        _require(path, number, "", row, ("summary",))
        _require(path, number, "summary", row["summary"], SUMMARY_KEYS)
    return row


def _require(path: Path, number: int, where: str, value: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(value, dict):
        raise DeployError(f"{path}:{number}: {where!r} must be an object")
    missing = [k for k in keys if k not in value]
    if missing:
        inside = f" in {where!r}" if where else ""
        raise DeployError(f"{path}:{number}: not a complete result row (missing {', '.join(missing)}{inside})")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of one results file; blank lines are allowed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeployError(f"{path}: no such results file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DeployError(f"{path}: cannot read results: {err}") from err
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            row = _parse(path, number, line)
            row["_source"] = f"{path}:{number}"
            rows.append(row)
    return rows


def read_many(paths: Iterable[Path]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.extend(read_rows(path))
    return rows


def latest_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last row per (device, configuration): a rerun supersedes earlier rows."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        latest[(row["device"]["id"], row["config_id"])] = row
    return list(latest.values())

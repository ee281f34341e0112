"""Target profiles: ``targets/<name>.yaml`` = a backend, a precision and its options, by name.

``--target NAME`` accepts a backend (``onnxruntime``) or a profile (``x86-openvino-int8``);
command-line ``--precision`` and ``--option`` override what the profile says.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deploykit.backends.base import BACKENDS
from deploykit.configfile import find_config, list_configs, load_config
from deploykit.errors import UsageError


class Profile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    target: str
    precision: str | None = None
    threads: int | None = Field(default=None, gt=0)
    calib_recipe: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


def list_profiles() -> dict[str, Path]:
    return list_configs("targets")


def load_profile(name_or_path: str) -> Profile:
    path = find_config("targets", name_or_path)
    if path is None:
        raise UsageError(f"no target profile {name_or_path!r}")
    profile = load_config(path, Profile, name=path.stem)
    if profile.target not in BACKENDS:
        raise UsageError(f"{path}: target {profile.target!r} is not one of {', '.join(sorted(BACKENDS))}")
    return profile


def resolve_target(name: str) -> Profile:
    """A backend name as a bare profile, or the named profile."""
    if name in BACKENDS:
        return Profile(name=name, target=name)
    if find_config("targets", name) is not None:
        return load_profile(name)
    profiles = ", ".join(list_profiles()) or "none"
    raise UsageError(f"unknown target {name!r}; targets: {', '.join(sorted(BACKENDS))}; profiles: {profiles}")

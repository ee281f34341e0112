"""State-dict key maps: checkpoints saved with another codebase's names, loaded into zoo models.

A map is detected from the keys (never from a file name), renames with regular expressions,
and has an inverse, so tests can write checkpoints in the foreign naming from a zoo model.
The zoo's RepVGG and RepOpt-VGG already use the official repositories' names; timm's
``byobnet`` RepVGG uses its own (``stem``/``stages.i``/``conv_kxk``/``conv_1x1``/``identity``/``head.fc``).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["KeyMap", "KEY_MAPS", "to_zoo", "from_zoo"]


@dataclass(frozen=True)
class KeyMap:
    name: str
    families: tuple[str, ...]  # zoo families it applies to
    detect: Callable[[list[str]], bool]
    renames: tuple[tuple[str, str], ...]  # (foreign regex, zoo replacement), applied in order
    inverse: tuple[tuple[str, str], ...]  # (zoo regex, foreign replacement)


def _stage_up(m: re.Match[str]) -> str:
    return f"stage{int(m.group(1)) + 1}."


def _stage_down(m: re.Match[str]) -> str:
    return f"stages.{int(m.group(1)) - 1}."


KEY_MAPS: tuple[KeyMap, ...] = (
    KeyMap(
        name="timm-repvgg",
        families=("repvgg",),
        detect=lambda keys: any(k.startswith("stem.conv_kxk.") for k in keys) and any(k.startswith("stages.") for k in keys),
        renames=(
            (r"^stem\.", "stage0."),
            (r"^stages\.(\d+)\.", _stage_up),  # type: ignore[arg-type]
            (r"\.conv_kxk\.", ".rbr_dense."),
            (r"\.conv_1x1\.", ".rbr_1x1."),
            (r"\.identity\.", ".rbr_identity."),
            (r"^head\.fc\.", "linear."),
        ),
        inverse=(
            (r"^stage0\.", "stem."),
            (r"^stage(\d+)\.", _stage_down),  # type: ignore[arg-type]
            (r"\.rbr_dense\.", ".conv_kxk."),
            (r"\.rbr_1x1\.", ".conv_1x1."),
            (r"\.rbr_identity\.", ".identity."),
            (r"^linear\.", "head.fc."),
        ),
    ),
)


def _rename(state: dict[str, Any], rules: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _strip_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    """``module.`` (DataParallel/DDP) and ``model.`` prefixes that wrap every key."""
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def to_zoo(state: dict[str, Any], family: str) -> tuple[dict[str, Any], str | None]:
    """``state`` renamed for a zoo model of ``family``, and the name of the map used (None: as given)."""
    state = _strip_wrappers(state)
    keys = list(state)
    for key_map in KEY_MAPS:
        if family in key_map.families and key_map.detect(keys):
            return _rename(state, key_map.renames), key_map.name
    return state, None


def from_zoo(state: dict[str, Any], map_name: str) -> dict[str, Any]:
    """A zoo state dict in the foreign naming ``map_name`` (to write test checkpoints)."""
    key_map = next((m for m in KEY_MAPS if m.name == map_name), None)
    if key_map is None:
        raise KeyError(f"no key map {map_name!r}; known: {', '.join(m.name for m in KEY_MAPS)}")
    return _rename(state, key_map.inverse)

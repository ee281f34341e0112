"""Model zoo: RepVGG, RepOpt-VGG, ConvNeXt, C-GhostNet, G-GhostNet."""
from __future__ import annotations

from deploykit.models.registry import ModelEntry, create_model, get_entry, list_models, register_model

__all__ = ["ModelEntry", "create_model", "get_entry", "list_models", "register_model"]

"""Options shared by several commands (flags mirror the library's keyword arguments)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from deploykit.backends.base import DEFAULT_THREADS  # noqa: F401  (the one default, re-exported for the CLI)
from deploykit.build import DEFAULT_VERIFY_SAMPLES  # noqa: F401

DEFAULT_ANALYZE_SAMPLES = 512  # held-out samples `deploykit analyze` measures every figure on


class Threads(click.ParamType):
    """A thread count: an integer >= 1, capped at the CPUs this process may use (with a warning)."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        count = click.IntRange(min=1).convert(value, param, ctx)
        from deploykit.device import bound_threads

        return bound_threads(count, what=f"--{param.name}" if param is not None and param.name else "--threads")


THREADS = Threads()


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--num-classes, --cifar, --input-size, --weights: how to build MODEL."""
    func = click.option("--weights", default=None, metavar="FILE|pretrained", help=WEIGHTS_HELP)(func)
    func = click.option("--input-size", type=click.IntRange(8, 4096), default=None, help="Input height/width (default: the model's).")(func)
    func = click.option("--cifar", is_flag=True, default=None, help="Zoo models: the 32x32 CIFAR variant.")(func)
    func = click.option("--num-classes", type=click.IntRange(1), default=None, help="Classifier width (zoo default 1000; timm/torchvision: the library's).")(func)
    return func


WEIGHTS_HELP = ("Fill MODEL from a checkpoint (safetensors, or a torch file read with weights_only=True; "
                "timm/official RepVGG names are renamed); 'pretrained': timm/torchvision's own weights (downloads).")
ACCEPT_PARTIAL_HELP = "Accept a fusion that left BatchNorm or parallel branches it could not fold (listed in the report)."


def load(model: str, num_classes: int | None, cifar: bool | None, input_size: int | None, weights: str | None = None):
    from deploykit.loading import check_input, load_model

    loaded = load_model(model, num_classes=num_classes, cifar=cifar, input_size=input_size, weights=weights)
    check_input(loaded)
    return loaded


def write_json(path: Path, data: Any, *, force: bool) -> None:
    from deploykit.files import atomic_file

    with atomic_file(Path(path), force=force) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")

"""YAML config files (calibration recipes, target profiles) validated by pydantic models.

Files are looked up by name in ``calib/`` and ``targets/`` of the working directory (a user's
own, first), then among those shipped inside the package (``deploykit/data/<kind>/``, read
through ``importlib.resources`` so an installed wheel has them too), or given as a path. An
unknown key is an error listing the valid keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from deploykit.errors import UsageError

M = TypeVar("M", bound=BaseModel)

def shipped_dir(kind: str) -> Path:
    """The ``kind`` files inside the installed package (a wheel installs them as plain files)."""
    from importlib.resources import files

    return Path(str(files("deploykit") / "data" / kind))


def config_dirs(kind: str) -> list[Path]:
    """Folders holding ``kind`` files (``calib`` or ``targets``), working directory first."""
    dirs = []
    for candidate in ((Path.cwd() / kind).resolve(), shipped_dir(kind)):
        if candidate.is_dir() and candidate not in dirs:
            dirs.append(candidate)
    return dirs


def list_configs(kind: str) -> dict[str, Path]:
    """name -> file for every ``*.yaml`` in the ``kind`` folders (the first found wins)."""
    found: dict[str, Path] = {}
    for folder in config_dirs(kind):
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def find_config(kind: str, name_or_path: str) -> Path | None:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    return list_configs(kind).get(name_or_path)


def _describe(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    fields = model.model_fields
    for part in loc[:-1]:
        annotation = fields.get(part).annotation if isinstance(part, str) and part in fields else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = annotation.model_fields
    return ", ".join(fields)


def yaml_error_line(err: Exception) -> str:
    """``:LINE:COLUMN: reason`` of a YAML syntax error, in one line (PyYAML's spans several)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    context = getattr(err, "context", None)
    where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    return f"{where}: YAML syntax error: {problem}" + (f" ({context})" if context else "")


def load_config(path: Path, model: type[M], **defaults: Any) -> M:
    """Parse ``path`` into ``model``; any problem is one UsageError line naming the file."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise UsageError(f"{path}{yaml_error_line(err)}") from err
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of keys to values")
    try:
        return model.model_validate({**defaults, **data})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        if first["type"] == "extra_forbidden":
            raise UsageError(
                f"{path}: unknown key {where!r}; valid keys: {_describe(model, tuple(first['loc']))}"
            ) from err
        raise UsageError(f"{path}: {where}: {first['msg']}") from err

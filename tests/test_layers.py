"""The import graph of deploykit/: no package imports a higher layer, and no two packages import
each other (directly or around a longer circle). Every import counts, lazy ones inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deploykit"

# Bottom to top. A unit is a top-level module or sub-package of deploykit; it may import its own
# layer or lower ones. The standalone bundle runner (package/runner_template) imports no deploykit.
LAYERS: list[set[str]] = [
    {"deploykit", "errors", "files", "configfile", "device", "onnxio", "privacy", "preflight", "verify", "procs", "quiet", "precision"},
    {"fuse", "export", "models", "checkpoint", "calib"},
    {"artifact", "backends", "profiles"},
    {"loading", "train", "quant", "resolve"},
    {"build", "evaluate"},
    {"bench"},
    {"advise"},
    {"report", "package"},
    {"cli", "__main__"},
]
LAYER = {unit: index for index, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "deploykit"


def import_graph() -> dict[str, set[str]]:
    """unit -> the units it imports (other than itself)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if "runner_template" in rel.parts:
            continue
        source = _unit(".".join(p for p in rel.parts if p != "__init__"))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name == "deploykit" or name.startswith("deploykit."):
                    target = _unit(name)
                    if target != source:
                        graph.setdefault(source, set()).add(target)
    return graph


def test_every_unit_has_a_layer() -> None:
    units = {_unit(".".join(p for p in path.relative_to(PACKAGE.parent).with_suffix("").parts if p != "__init__"))
             for path in PACKAGE.rglob("*.py") if "runner_template" not in path.parts}
    assert sorted(units - set(LAYER)) == [], "add the new module or package to LAYERS"


def test_no_upward_imports() -> None:
    upward = sorted(f"{a} (layer {LAYER[a]}) -> {b} (layer {LAYER[b]})"
                    for a, targets in import_graph().items() for b in targets if LAYER[b] > LAYER[a])
    assert upward == []


def test_no_cycles_between_packages() -> None:
    graph = import_graph()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in path and nxt > path[0]:  # each cycle once, from its smallest unit
                visit(nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert cycles == []


@pytest.mark.parametrize("code", ["import deploykit.cli\n", "from deploykit.build import build\n"])
def test_the_graph_sees_imports(code: str, tmp_path: Path) -> None:
    """The walk finds both import forms (a check that found nothing must not pass by accident)."""
    node = ast.parse(code).body[0]
    name = node.names[0].name if isinstance(node, ast.Import) else node.module
    assert _unit(name) in LAYER
    assert import_graph(), "no deploykit imports found at all"

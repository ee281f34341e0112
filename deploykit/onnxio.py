"""What an ONNX model file takes and gives: input/output names, shapes and element types.

Every layer may ask a model file for its interface, so this sits at the bottom with no
runtime behind it (only ``onnx``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def onnx_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes (int or symbolic name) and element types of the graph inputs and outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def describe(values: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": v.name,
                "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                          for d in v.type.tensor_type.shape.dim],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            }
            for v in values
            if v.name not in initializers
        ]

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def fixed_batch(io: dict[str, list[dict[str, Any]]]) -> int | None:
    first = io["inputs"][0]["shape"][0] if io["inputs"][0]["shape"] else None
    return first if isinstance(first, int) and first > 0 else None

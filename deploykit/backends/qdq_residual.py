"""Q/DQ on the skip input of residual Adds, so TensorRT fuses Conv+Add into one INT8 kernel.

TensorRT fuses a convolution with the element-wise Add of a residual block when the Add's
other input, the skip connection, is quantized ("Q/DQ layer-placement recommendations" in
the TensorRT developer guide). Which input is the skip follows NVIDIA Model-Optimizer's ONNX
INT8 mode (``build_non_residual_input_map``): an Add of two computed tensors at least one of
which comes from a convolution (through what TensorRT fuses into it: a constant bias or
scale, BatchNormalization, ReLU, MaxPool, copy ops). When both do, the input on the longer
path from their lowest common ancestor is the convolution branch and the other the skip;
when one does, the other is the skip, unless that convolution is the common ancestor itself.
Only convolutions count as the branch, as in Model-Optimizer (a MatMul+Add is not this fusion).

The skip tensor usually also feeds the block's first convolution and so already has a
calibrated scale; it is reused. Tensors without one (a convolution shortcut's output) are
calibrated with ONNX Runtime's calibrator and the same method as the rest of the model.
"""
from __future__ import annotations

import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BRANCH_OPS = ("Conv", "ConvTranspose")
# Walked through from an Add input back to its convolution (Add/Mul only with a constant operand).
FUSED_OPS = frozenset({"Relu", "BatchNormalization", "MaxPool", "Add", "Mul"})
COPY_OPS = frozenset({"Flatten", "Transpose", "Concat", "Split", "Squeeze", "Unsqueeze", "Expand", "Reshape",
                      "Tile", "Gather", "Slice", "GatherElements", "GatherND"})
MAX_WALK = 8


@dataclass(frozen=True)
class ResidualInput:
    """Input ``index`` (the skip, ``tensor``) of the residual Add ``add``."""

    add: str
    index: int
    tensor: str


def _maps(graph: Any) -> tuple[dict[str, Any], set[str]]:
    producer = {o: n for n in graph.node for o in n.output}
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return producer, constants


def _computed(node: Any, producer: dict[str, Any], constants: set[str]) -> list[str]:
    return [i for i in node.input if i and i not in constants and i in producer]


def _branch_conv(node: Any, producer: dict[str, Any], constants: set[str]) -> Any | None:
    """The convolution ``node``'s output is fused onto, or None."""
    for _ in range(MAX_WALK):
        if node.op_type in BRANCH_OPS:
            return node
        inputs = _computed(node, producer, constants)
        if node.op_type not in FUSED_OPS | COPY_OPS or not inputs:
            return None
        if node.op_type in ("Add", "Mul") and len(inputs) != 1:
            return None  # another residual Add, a gating Mul: not a fused epilogue
        node = producer[inputs[0]]
    return None


def _ancestors(node: Any, producer: dict[str, Any], constants: set[str]) -> dict[int, tuple[int, Any]]:
    """id(ancestor) -> (shortest distance, ancestor), ``node`` itself at 0."""
    found = {id(node): (0, node)}
    queue = deque([node])
    while queue:
        current = queue.popleft()
        distance = found[id(current)][0]
        for name in _computed(current, producer, constants):
            parent = producer[name]
            if id(parent) not in found:
                found[id(parent)] = (distance + 1, parent)
                queue.append(parent)
    return found


def find_residual_inputs(model: Any) -> list[ResidualInput]:
    """The skip input of every residual Add in ``model``, by Model-Optimizer's rule (module docstring)."""
    graph = model.graph
    producer, constants = _maps(graph)
    found = []
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2 or add.input[0] == add.input[1]:
            continue
        if len(_computed(add, producer, constants)) != 2:
            continue  # a bias Add, or a graph input
        first, second = producer[add.input[0]], producer[add.input[1]]
        conv_first, conv_second = (_branch_conv(n, producer, constants) for n in (first, second))
        if conv_first is None and conv_second is None:
            continue
        up_first, up_second = _ancestors(first, producer, constants), _ancestors(second, producer, constants)
        common = set(up_first) & set(up_second)
        lca = min(common, key=lambda k: up_first[k][0] + up_second[k][0]) if common else None
        far_first = up_first[lca][0] if lca is not None else 0
        far_second = up_second[lca][0] if lca is not None else 0
        if conv_first is not None and conv_second is not None:
            if conv_first is conv_second:
                continue
            skip = 1 if far_first > far_second else 0  # the longer path from the ancestor is the branch
        elif conv_first is not None:
            if lca == id(conv_first):
                continue
            skip = 1
        else:
            if lca == id(conv_second):
                continue
            skip = 0
        found.append(ResidualInput(add.name or add.output[0], skip, add.input[skip]))
    return found


def existing_scales(model: Any) -> dict[str, float]:
    """tensor -> scale of the per-tensor QuantizeLinear already reading it (a Conv input's)."""
    from onnx import numpy_helper

    init = {i.name: i for i in model.graph.initializer}
    scales = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1] in init:
            scale = numpy_helper.to_array(init[node.input[1]])
            if scale.size == 1:
                scales.setdefault(node.input[0], float(scale.ravel()[0]))
    return scales


def calibrate_scales(model_path: Path, tensors: set[str], reader: Any, method: Any) -> dict[str, float]:
    """Symmetric INT8 scales (amax / 127, as ORT computes them) of ``tensors`` by ORT's calibrator."""
    import numpy as np
    from onnxruntime.quantization.calibrate import create_calibrator

    with tempfile.TemporaryDirectory(prefix="deploykit-residual-") as tmp:
        calibrator = create_calibrator(Path(model_path), ["Add"], augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                       calibrate_method=method)
        reader.rewind()
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    scales = {}
    for name in tensors:
        low, high = ranges[name].range_value
        amax = float(max(abs(np.asarray(low).max()), abs(np.asarray(high).max())))
        scales[name] = amax / 127.0 if amax > 0 else 1.0
    return scales


def insert_residual_qdq(model: Any, residuals: list[ResidualInput], scales: dict[str, float]) -> None:
    """A dedicated Q/DQ pair (int8, zero point 0) on each residual Add's skip input, in place."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    by_add: dict[str, list[ResidualInput]] = {}
    for residual in residuals:
        by_add.setdefault(residual.add, []).append(residual)
    nodes = []
    for node in graph.node:
        for residual in by_add.get(node.name or node.output[0], []):
            stem = f"{residual.add}/residual_input_{residual.index}"
            graph.initializer.extend([
                numpy_helper.from_array(np.array(scales[residual.tensor], dtype=np.float32), f"{stem}_scale"),
                numpy_helper.from_array(np.array(0, dtype=np.int8), f"{stem}_zero_point"),
            ])
            nodes.append(helper.make_node("QuantizeLinear", [residual.tensor, f"{stem}_scale", f"{stem}_zero_point"],
                                          [f"{stem}_quantized"], name=f"{stem}_QuantizeLinear"))
            nodes.append(helper.make_node("DequantizeLinear",
                                          [f"{stem}_quantized", f"{stem}_scale", f"{stem}_zero_point"],
                                          [f"{stem}_dequantized"], name=f"{stem}_DequantizeLinear"))
            node.input[residual.index] = f"{stem}_dequantized"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)

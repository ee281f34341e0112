"""What an ONNX model file takes and gives: input/output names, shapes and element types.

Every layer may ask a model file for its interface, so this sits at the bottom with no
runtime behind it (only ``onnx``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def is_onnx_model(model: str) -> bool:
    """Whether a MODEL argument names an ONNX file (build, advise: the same test)."""
    return model.endswith(".onnx")


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


def check_image_model(path: Path) -> int:
    """Validate an ONNX file given as a MODEL before anything runs it; return its input size S.

    Every entry point that takes an ``.onnx`` file (build, eval) calls this: the file must
    exist, pass ``onnx.checker``, and take one float image batch ``(N, 3, S, S)`` with a fixed
    S, which is what deploykit's preprocessing feeds. Any problem is one DeployError line.
    """
    import onnx

    from deploykit.errors import DeployError, one_line

    path = Path(path)
    if not path.is_file():
        raise DeployError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        onnx.checker.check_model(str(path))
        io = onnx_io(path)
    except Exception as err:  # onnx raises ValidationError, DecodeError, OSError...
        raise DeployError(f"{path} is not a valid ONNX model: {one_line(err, 200)}") from err
    if not io["inputs"]:
        raise DeployError(f"{path} has no graph input")
    if len(io["inputs"]) > 1:
        names = ", ".join(i["name"] for i in io["inputs"])
        raise DeployError(f"{path} takes {len(io['inputs'])} inputs ({names}); deploykit feeds one image batch")
    first = io["inputs"][0]
    shape, dtype = first["shape"], first["dtype"]
    fed = "deploykit feeds RGB images as (N, 3, S, S) float32"
    if len(shape) != 4 or shape[1] != 3:
        raise DeployError(f"{path}: input {first['name']!r} has shape {tuple(shape)}; {fed}")
    if not all(isinstance(d, int) for d in shape[2:]) or shape[2] != shape[3]:
        raise DeployError(f"{path}: input {first['name']!r} has shape {tuple(shape)}, not a fixed square size S; "
                          "export with a fixed input size")
    if dtype not in ("float32", "float16"):
        raise DeployError(f"{path}: input {first['name']!r} is {dtype}; {fed}")
    return int(shape[3])


def summed_branches(path: Path) -> list[str]:
    """Tensors that feed parallel convolution branches summed back together (RepVGG-style blocks
    as trained, not re-parameterized): one per block, in graph order.

    A branch is a Conv, or a BatchNormalization with no Conv before it, or the tensor itself (identity
    branches), each optionally followed by BatchNormalization; an Add whose two inputs are branches (or
    earlier such sums) of the same tensor, at least one of them a Conv, is a block. A ResNet shortcut
    is not one: its other input is a Conv of a different tensor. deploykit fuses these only
    from the PyTorch model: on an ONNX graph they stay, and cost time on every target.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    sums: dict[str, tuple[str, bool]] = {}  # Add output -> (source tensor, has a conv branch)

    def branch(tensor: str) -> tuple[str | None, bool]:
        if tensor in sums:
            return sums[tensor]
        node = producer.get(tensor)
        if node is not None and node.op_type == "BatchNormalization":
            before = producer.get(node.input[0])
            if before is None or before.op_type != "Conv":
                return node.input[0], False  # identity branch: BN on the block's input itself
            node = before
        if node is not None and node.op_type == "Conv":
            return node.input[0], True
        return None, False

    blocks = []
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        (left, conv_left), (right, conv_right) = branch(node.input[0]), branch(node.input[1])
        left, right = left or node.input[0], right or node.input[1]  # neither: the tensor itself (identity)
        if left == right and (conv_left or conv_right):
            sums[node.output[0]] = (left, True)
            if left not in blocks:
                blocks.append(left)
    return blocks

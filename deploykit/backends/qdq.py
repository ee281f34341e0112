"""Explicit-quantization Q/DQ ONNX for TensorRT, from deploykit's calibration set.

TensorRT 10 deprecated and TensorRT 11 removed implicit INT8 (``IInt8Calibrator``); INT8 is
now a model property: QuantizeLinear/DequantizeLinear pairs that say where and how tensors
are quantized. This module writes such a model with ONNX Runtime's ``quantize_static``
(QDQ format) following TensorRT's Q/DQ placement guidance ("Explicit Quantization" in the
TensorRT developer guide):

- symmetric INT8 only (zero point 0): per-channel weights, per-tensor activations;
- Q/DQ on the inputs of the weighted ops (Conv, MatMul, Gemm), not on their outputs, so
  TensorRT fuses the DQ into the INT8 kernel and keeps the trailing activation fused too;
- one dedicated Q/DQ pair per weighted consumer of a tensor (``DedicatedQDQPair``). TensorRT
  accepts a pair shared by several consumers too (its Q/DQ propagation handles both); ORT's
  default shares one pair, and dedicated pairs keep each convolution's input quantization
  separate, so excluding or changing one node never changes another's;
- biases stay float: TensorRT's parser rejects DequantizeLinear on INT32 and folds the float
  bias into the INT8 convolution itself;
- the skip input of residual Adds quantized too (:mod:`deploykit.backends.qdq_residual`), so
  TensorRT fuses Conv+Add in INT8 (``residual=False``: not, the earlier recipe);
- everything left unquantized in FP16, as NVIDIA Model-Optimizer's ONNX INT8 mode does
  (``high_precision_dtype="fp16"``): the model is moved to opset 19 (the first whose
  Quantize/DequantizeLinear take float16) and converted to float16 with float32 inputs and
  outputs, so a *strongly typed* TensorRT network runs those layers in FP16
  (``unquantized="fp32"``: left in FP32, the earlier recipe). TensorRT 11 has no weak typing,
  so the ONNX's types are the only way to say this.

ONNX Runtime can run the result on CPU, so its accuracy is measured here even without
TensorRT; :func:`inspect_qdq` re-checks every property on the written file rather than
trusting the quantizer's options (a misspelt ``extra_options`` key is silently ignored).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.errors import DeployError
from deploykit.files import temp_dir

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")
CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
MIN_OPSET = 13  # per-channel DequantizeLinear (the ``axis`` attribute) needs opset 13
FLOAT16_OPSET = 19  # Quantize/DequantizeLinear take float16 input and scales from opset 19
UNQUANTIZED_PRECISIONS = ("fp16", "fp32")

# The extra_options of quantize_static, spelt as onnxruntime/quantization/qdq_quantizer.py
# reads them (ORT 1.32); ``_check_option_names`` verifies each name is still read.
TRT_EXTRA_OPTIONS: dict[str, Any] = {
    "ActivationSymmetric": True,  # zero point 0 for activations
    "WeightSymmetric": True,  # zero point 0 for weights
    "QuantizeBias": False,  # TensorRT cannot dequantize INT32 biases
    "DedicatedQDQPair": True,  # one pair per consumer (ORT shares one by default; TensorRT takes either)
    "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS),  # inputs only, per TensorRT's guidance
    "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # B is (K, N): output channels are axis 1
}


@dataclass
class QdqReport:
    """What :func:`inspect_qdq` found: every weighted node and any broken property."""

    weighted_nodes: int = 0
    quantized_nodes: int = 0
    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    activation_scales: dict[str, float] = field(default_factory=dict)  # tensor -> scale
    residual_inputs: list[str] = field(default_factory=list)  # "Add node:input index" read through a Q/DQ
    scale_type: str | None = None  # float32 or float16: the type Q/DQ compute in (and the unquantized layers)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations and self.weighted_nodes > 0 and self.quantized_nodes == self.weighted_nodes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class CalibrationReader:
    """``quantize_static``'s reader protocol over an (N, C, H, W) array, ``batch_size`` rows a call."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch_size: int) -> None:
        self.input_name, self.inputs, self.batch_size, self.position = input_name, inputs, batch_size, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = self.inputs[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        # A model exported with a fixed batch takes only full batches.
        return {self.input_name: chunk} if len(chunk) == self.batch_size else None

    def rewind(self) -> None:
        self.position = 0


def _check_option_names() -> None:
    """Fail loudly if this ORT no longer reads one of TRT_EXTRA_OPTIONS (typos pass silently)."""
    import inspect

    from onnxruntime.quantization import base_quantizer, qdq_quantizer

    source = inspect.getsource(qdq_quantizer) + inspect.getsource(base_quantizer)
    missing = [name for name in TRT_EXTRA_OPTIONS if f'"{name}"' not in source]
    if missing:
        raise DeployError(
            f"this onnxruntime no longer reads quantization option(s) {', '.join(missing)}; "
            "Q/DQ models for TensorRT need the onnxruntime version deploykit was tested with (1.32)"
        )


def _input_info(model: Any) -> tuple[str, int | None]:
    initializers = {i.name for i in model.graph.initializer}
    first = next(v for v in model.graph.input if v.name not in initializers)
    dim = first.type.tensor_type.shape.dim[0] if first.type.tensor_type.shape.dim else None
    batch = dim.dim_value if dim is not None and dim.HasField("dim_value") and dim.dim_value > 0 else None
    return first.name, batch


def _drop_unused_domains(model: Any) -> None:
    """ORT's pre-processing declares every domain it knows; keep only those the graph uses."""
    used = {n.domain or "" for n in model.graph.node}
    keep = [o for o in model.opset_import if (o.domain or "") in used | {"", "ai.onnx"}]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def quantize_qdq(
    onnx_path: Path,
    out_path: Path,
    inputs: np.ndarray,
    *,
    method: str = "minmax",
    batch_size: int = 32,
    unquantized: str = "fp16",
    residual: bool = True,
) -> QdqReport:
    """Write the TensorRT-style Q/DQ model of ``onnx_path`` calibrated on ``inputs``; verify it.

    ``unquantized``: the precision of what stays unquantized (fp16, or fp32 as before);
    ``residual``: quantize the skip input of residual Adds (False: as before).
    """
    import numpy as np
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATE_METHODS:
        raise DeployError(f"calibration method {method!r}: choose from {', '.join(CALIBRATE_METHODS)}")
    if len(inputs) == 0:
        raise DeployError("int8 needs calibration data; got 0 samples")
    if unquantized not in UNQUANTIZED_PRECISIONS:
        raise DeployError(f"unquantized layers in {unquantized!r}: choose from {', '.join(UNQUANTIZED_PRECISIONS)}")
    _check_option_names()
    source = onnx.load(str(onnx_path))
    opset = next((o.version for o in source.opset_import if (o.domain or "") in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise DeployError(f"{onnx_path.name} uses opset {opset}; Q/DQ for TensorRT needs opset {MIN_OPSET} or newer")
    input_name, fixed = _input_info(source)
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    reader = CalibrationReader(input_name, inputs, fixed or min(batch_size, len(inputs)))
    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    with temp_dir("qdq") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "qdq.onnx"
        try:
            source_path = Path(onnx_path)
            if unquantized == "fp16" and opset < FLOAT16_OPSET:
                source_path = Path(tmp) / "opset19.onnx"
                from onnx import version_converter

                onnx.save(version_converter.convert_version(source, FLOAT16_OPSET), str(source_path))
            # Shape inference plus ORT's *basic* rewrites (standard ops only): removes the
            # Identity nodes the exporter puts in front of shared initializers, so every
            # weight reaches its Conv/Gemm as an initializer and is quantized per channel.
            quant_pre_process(str(source_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(quantized), reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(WEIGHTED_OPS),
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=calibrate_method,
                extra_options=dict(TRT_EXTRA_OPTIONS),
            )
            model = onnx.load(str(quantized))
            residuals = _quantize_residuals(model, prepared, reader, calibrate_method) if residual else []
            _drop_unused_domains(model)
            if unquantized == "fp16":
                model = to_float16(model)
        except DeployError:
            raise
        except Exception as err:  # ORT raises plain Exceptions and its own Fail types
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise DeployError(f"Q/DQ quantization failed: {type(err).__name__}: {detail}") from err
        onnx.save(model, str(out_path))
    report = inspect_qdq(out_path)
    expected_type = "float16" if unquantized == "fp16" else "float32"
    if report.scale_type != expected_type:
        report.violations.append(f"Q/DQ scales are {report.scale_type}, expected {expected_type}")
    unquantized_skips = sorted(set(residuals) - set(report.residual_inputs))
    if unquantized_skips:
        report.violations.append(f"residual Add input(s) {', '.join(unquantized_skips[:3])} not quantized")
    if not report.ok:
        first = report.violations[0] if report.violations else "no weighted op quantized"
        raise DeployError(f"the Q/DQ model breaks TensorRT's rules: {first}")
    logger.info("Q/DQ: %d of %d weighted ops and %d residual Add inputs quantized, the rest in %s; "
                "%d calibration samples", report.quantized_nodes, report.weighted_nodes, len(residuals),
                unquantized, len(inputs))
    return report


def _quantize_residuals(model: Any, prepared: Path, reader: CalibrationReader, method: Any) -> list[str]:
    """Q/DQ on the skip input of every residual Add of ``model`` (found on the float ``prepared``).

    Returns every skip input as "Add:index". Some already read a Q/DQ pair: ORT hands a
    non-quantized consumer of a quantized tensor (the skip also feeds a Conv) its DQ output.
    """
    import onnx

    from deploykit.backends.qdq_residual import (
        calibrate_scales, existing_scales, find_residual_inputs, insert_residual_qdq,
    )

    adds = {(n.name or n.output[0]): n for n in model.graph.node if n.op_type == "Add"}
    found = [r for r in find_residual_inputs(onnx.load(str(prepared))) if r.add in adds]
    todo = [r for r in found if adds[r.add].input[r.index] == r.tensor]
    scales = existing_scales(model)
    missing = {r.tensor for r in todo} - set(scales)
    if missing:
        scales.update(calibrate_scales(prepared, missing, reader, method))
    insert_residual_qdq(model, todo, scales)
    logger.debug("residual Adds: %d skip inputs, %d given a Q/DQ here (%d calibrated)",
                 len(found), len(todo), len(missing))
    return [f"{r.add}:{r.index}" for r in found]


def to_float16(model: Any) -> Any:
    """Every float tensor in float16, graph inputs and outputs kept float32, nodes in order."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=True)
    _sort_nodes(converted.graph)  # the converter appends its input Casts at the end
    return converted


def _sort_nodes(graph: Any) -> None:
    """Order ``graph``'s nodes so each comes after the producers of its inputs (stable otherwise)."""
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    placed, ordered = [False] * len(nodes), []
    while len(ordered) < len(nodes):
        before = len(ordered)
        for k, node in enumerate(nodes):
            if not placed[k] and all(name in available for name in node.input):
                placed[k] = True
                ordered.append(node)
                available.update(node.output)
        if len(ordered) == before:
            raise DeployError("the float16 Q/DQ graph has a cycle or an undefined input")
    del graph.node[:]
    graph.node.extend(ordered)


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _weight_axis(node: Any, rank: int) -> int:
    """The output-channel axis of a weighted node's weight (input 1)."""
    if node.op_type == "Conv":
        return 0  # (K, C/g, kh, kw)
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1  # B is (N, K) when transposed, else (K, N)
    return rank - 1  # MatMul: B is (..., K, N)


def inspect_qdq(model_or_path: Any) -> QdqReport:
    """Check every TensorRT Q/DQ rule on a model; the report lists each violation."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    graph = model.graph
    init = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    report = QdqReport(
        quantize_nodes=sum(n.op_type == "QuantizeLinear" for n in graph.node),
        dequantize_nodes=sum(n.op_type == "DequantizeLinear" for n in graph.node),
    )

    def array(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(init[name]) if name in init else None

    def zero_point_ok(node: Any, where: str) -> bool:
        zp = array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is None:
            report.violations.append(f"{where}: no int8 zero point (defaults to uint8)")
            return False
        if zp.dtype != np.int8 or np.any(zp != 0):
            report.violations.append(f"{where}: zero point must be int8 0, got {zp.dtype} {zp.ravel()[:4].tolist()}")
            return False
        return True

    def scale_of(node: Any, where: str) -> np.ndarray | None:
        scale = array(node.input[1])
        if scale is None or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            report.violations.append(f"{where}: scale must be a positive constant")
            return None
        return scale

    def feeds_weighted(q: Any) -> bool:
        """A Q whose DQ feeds a weighted op (or a residual Add) quantizes an input (wanted), not an output."""
        return any(
            c.op_type in (*WEIGHTED_OPS, "Add")
            for dq in consumers.get(q.output[0], []) if dq.op_type == "DequantizeLinear"
            for c in consumers.get(dq.output[0], [])
        )

    for node in graph.node:
        if node.op_type != "Add":
            continue
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in producer \
                    and producer[dq.input[0]].op_type == "QuantizeLinear":
                report.residual_inputs.append(f"{node.name or node.output[0]}:{index}")
    scale_types = sorted({str(array(n.input[1]).dtype) for n in graph.node
                          if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in init})
    report.scale_type = scale_types[0] if len(scale_types) == 1 else None
    if len(scale_types) > 1:
        report.violations.append(f"Q/DQ scales mix {' and '.join(scale_types)}; a strongly typed network needs one")

    for node in graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        report.weighted_nodes += 1
        where = f"{node.op_type} {node.name or node.output[0]}"
        before = len(report.violations)
        # Activation input: DequantizeLinear(QuantizeLinear(x)), per tensor, dedicated to this node.
        dq = producer.get(node.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            report.violations.append(f"{where}: input {node.input[0]!r} is not quantized")
        else:
            scale = scale_of(dq, f"{where} input")
            if scale is not None and scale.size != 1:
                report.violations.append(f"{where} input: activations must be per-tensor, got {scale.size} scales")
            zero_point_ok(dq, f"{where} input")
            # Other consumers (a residual Add, a Concat) may read the dequantized tensor,
            # as TensorRT's guidance for skip connections suggests; weighted ones may not.
            if sum(c.op_type in WEIGHTED_OPS for c in consumers.get(dq.output[0], [])) != 1:
                report.violations.append(f"{where} input: Q/DQ pair shared between weighted nodes")
            if scale is not None and scale.size == 1:
                report.activation_scales[node.input[0]] = float(scale.ravel()[0])
        # Weight input: DequantizeLinear of an int8 initializer, per output channel.
        wdq = producer.get(node.input[1])
        weight = array(wdq.input[0]) if wdq is not None and wdq.op_type == "DequantizeLinear" else None
        if weight is None:
            report.violations.append(f"{where}: weight {node.input[1]!r} is not an int8 constant behind a DQ")
        else:
            axis = _attr(wdq, "axis", 1)
            axis = axis + weight.ndim if axis < 0 else axis
            expected = _weight_axis(node, weight.ndim)
            scale = scale_of(wdq, f"{where} weight")
            if weight.dtype != np.int8:
                report.violations.append(f"{where} weight: stored as {weight.dtype}, expected int8")
            elif weight.size and weight.min() < -127:
                report.violations.append(f"{where} weight: -128 used; symmetric INT8 spans [-127, 127]")
            if scale is not None and (scale.ndim != 1 or axis != expected or scale.size != weight.shape[expected]):
                report.violations.append(
                    f"{where} weight: expected per-channel scales on axis {expected} ({weight.shape[expected]}), "
                    f"got axis {axis} with {scale.size}"
                )
            zero_point_ok(wdq, f"{where} weight")
        # Bias stays float; outputs are not quantized (TensorRT's placement guidance).
        if len(node.input) > 2 and node.input[2]:
            bias_producer = producer.get(node.input[2])
            if bias_producer is not None and bias_producer.op_type == "DequantizeLinear":
                report.violations.append(f"{where}: bias is quantized; TensorRT needs it in float")
        if any(c.op_type == "QuantizeLinear" and not feeds_weighted(c) for c in consumers.get(node.output[0], [])):
            report.violations.append(f"{where}: output is quantized; TensorRT's guidance quantizes inputs only")
        if len(report.violations) == before:
            report.quantized_nodes += 1
    return report


def run_onnxruntime(path: Path, inputs: np.ndarray, *, threads: int = 2) -> np.ndarray:
    """Logits of an ONNX model on the ORT CPU provider (the check that needs no GPU)."""
    from deploykit.backends.base import run_in_batches
    from deploykit.backends.onnxruntime import session_with_fallback
    from deploykit.onnxio import fixed_batch, onnx_io

    runner, _, _ = session_with_fallback(Path(path), threads=threads, level="basic")
    name = runner.get_inputs()[0].name
    return run_in_batches(lambda x: runner.run(None, {name: x})[0], inputs, fixed_batch(onnx_io(Path(path))))

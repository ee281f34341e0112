"""torch -> ONNX, single file, checked by onnx.checker and against ONNX Runtime.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. For these CNNs it
produces the same graph as the dynamo exporter, but as one self-contained file, without the
onnxscript dependency, and several times faster (measured on torch 2.13: the dynamo path
writes weights to a separate ``.data`` file unless told otherwise).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import DeployError, QualityGateError
from deploykit.files import atomic_file

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORTER = "torch.onnx.export (TorchScript, dynamo=False)"
# ORT vs PyTorch in float32: different kernels and summation orders, ~1e-6 relative typically.
ORT_TOLERANCE_REL = 1e-3


@dataclass
class ExportReport:
    path: str
    exporter: str
    opset: int
    input_shape: list[Any]
    dynamic_batch: bool
    torch_version: str
    onnx_version: str
    checker: str
    onnxruntime: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _compare_with_ort(model: Any, path: Path, shape: tuple[int, ...]) -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"checked": False, "reason": "onnxruntime not installed: pip install 'deploykit[onnxruntime]'"}
    import numpy as np
    import torch

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    max_abs = float(np.abs(ref - got).max())
    scale = float(np.abs(ref).max()) or 1.0
    return {
        "checked": True,
        "onnxruntime_version": ort.__version__,
        "input_shape": list(shape),
        "max_abs_error": max_abs,
        "max_rel_error": max_abs / scale,
    }


def export_onnx(
    model: Any,
    out: Path,
    *,
    input_size: int,
    batch: int | str = 1,
    opset: int = 17,
    force: bool = False,
    channels: int = 3,
) -> ExportReport:
    """Export ``model`` (eval mode) to ``out`` atomically and check the result."""
    import onnx
    import torch

    dynamic = batch == "dynamic"
    if not dynamic and (not isinstance(batch, int) or batch < 1):
        raise DeployError(f"batch must be a positive integer or 'dynamic', not {batch!r}")
    static_batch = 1 if dynamic else int(batch)
    shape = (static_batch, channels, input_size, input_size)
    model = model.eval()
    example = torch.zeros(shape)
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as err:
        raise DeployError(f"model does not accept input {shape}: {str(err).splitlines()[0][:160]}") from err
    out = Path(out)
    with atomic_file(out, force=force) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None,
                )
            except Exception as err:  # the exporter raises a zoo of types for unsupported ops
                raise DeployError(f"ONNX export failed (opset {opset}): {str(err).splitlines()[0][:200]}") from err
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as err:
            raise DeployError(f"exported ONNX fails onnx.checker: {str(err).splitlines()[0][:200]}") from err
        check_shape = (2 if dynamic else static_batch, channels, input_size, input_size)
        ort_check = _compare_with_ort(model, tmp, check_shape)
        if ort_check.get("checked") and ort_check["max_rel_error"] > ORT_TOLERANCE_REL:
            raise QualityGateError(
                f"ONNX Runtime output differs from PyTorch: rel error {ort_check['max_rel_error']:.2e} "
                f"> {ORT_TOLERANCE_REL:.0e}"
            )
    log.info("exported %s", out)
    return ExportReport(
        path=str(out),
        exporter=EXPORTER,
        opset=opset,
        input_shape=["batch" if dynamic else static_batch, channels, input_size, input_size],
        dynamic_batch=dynamic,
        torch_version=torch.__version__,
        onnx_version=onnx.__version__,
        checker="onnx.checker full_check passed",
        onnxruntime=ort_check,
    )

"""deploykit: PyTorch vision models to fused, exported, quantized, verified artifacts.

Importing this package is cheap: it pulls in no torch, onnxruntime, openvino, MNN or
tensorrt. Those are imported by the modules that need them, on first use.
"""
from __future__ import annotations

import os as _os

# Runtime telemetry off before any runtime can initialize, in this process and the children it
# starts (deploykit.privacy says what each switch does and what was measured).
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("NNCF_CI", "1")

__version__ = "0.1.0"

from deploykit.errors import DeployError  # noqa: E402

__all__ = ["DeployError", "__version__"]

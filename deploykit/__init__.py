"""deploykit: PyTorch vision models to fused, exported, quantized, verified artifacts.

Importing this package is cheap: it pulls in no torch, onnxruntime, openvino, MNN or
tensorrt. Those are imported by the modules that need them, on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

from deploykit.errors import DeployError

__all__ = ["DeployError", "__version__"]

"""Quantization helpers shared by targets: Q/DQ (explicit quantization) ONNX models."""
from __future__ import annotations

"""Compare an artifact's outputs with the reference's, and judge them against a tolerance.

Measuring (``compare``) is kept apart from judging (``judge``): the figures always go into
``build.json``; whether they fail the build depends on the precision. FP32 and FP16 builds
fail outside tolerance (they should reproduce the model); INT8 and W8 builds report and warn.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from deploykit.errors import DeployError


@dataclass(frozen=True)
class Comparison:
    samples: int
    cosine_min: float
    cosine_mean: float
    max_abs_error: float
    max_abs_reference: float  # largest |reference output|: the scale max_abs_error is read against
    top1_agreement: float

    @property
    def max_rel_error(self) -> float:
        return self.max_abs_error / max(self.max_abs_reference, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_rel_error": self.max_rel_error}


@dataclass(frozen=True)
class Tolerance:
    """Bounds on a Comparison. ``gate``: outside them the build fails (else it warns)."""

    gate: bool
    min_cosine: float | None = None  # every sample
    min_mean_cosine: float | None = None
    max_rel_error: float | None = None  # max |error| / max |reference|
    min_top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Measured here (RepVGG-A0 at 32 and 224, and a tiny RepVGG): fp32 artifacts agree to ~1e-6
# relative, fp16 to 1e-3..5e-3 (cosine >= 0.9994); int8 with real calibration data reaches a mean
# cosine of 0.96-0.999 and top-1 agreement of 0.84-1.0 depending on backend and model.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(gate=True, min_cosine=0.99999, max_rel_error=1e-3),
    # fp16: weights rounded to 11 bits, and fp16 arithmetic where the CPU has it (AVX512-FP16,
    # arm64 MNN). Measured with f16 arithmetic on OpenVINO (tiny RepVGG, 32x32): see BF16 below.
    "fp16": Tolerance(gate=True, min_cosine=0.995, max_rel_error=5e-2),
    # bf16: 8-bit mantissa (relative rounding 2^-9 per op), errors compound over the layers.
    # Measured here on AMX (tiny RepVGG 32x32, 64 inputs): OpenVINO bf16 worst-sample cosine
    # 0.99989, max rel error 7.0e-3; torch autocast 0.99988, 7.7e-3; RepVGG-A0 CIFAR on OpenVINO
    # 0.99998, 4.3e-3; torch 0.99996, 1.1e-2. OpenVINO f16 arithmetic (AVX512-FP16): 0.999999,
    # 9.6e-4. The bounds are fp16's: ~4x headroom on the error for deeper models, and a broken
    # build (layout, NaN) fails them.
    "bf16": Tolerance(gate=True, min_cosine=0.995, max_rel_error=5e-2),
    "w8": Tolerance(gate=False, min_mean_cosine=0.99, min_top1_agreement=0.9),
    "int8": Tolerance(gate=False, min_mean_cosine=0.98, min_top1_agreement=0.9),
}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0)
    # Two all-zero outputs are identical; one zero output against a non-zero one is not.
    both_zero = (np.abs(a).sum(axis=1) == 0) & (np.abs(b).sum(axis=1) == 0)
    return np.where(both_zero, 1.0, cos)


def compare(reference: np.ndarray, candidate: np.ndarray) -> Comparison:
    """Figures of ``candidate`` against ``reference`` (both (N, classes) or (N, ...))."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape:
        raise DeployError(f"output shapes differ: reference {reference.shape}, artifact {candidate.shape}; "
                          "the artifact does not compute the model's outputs")
    cos = _cosine(reference, candidate)
    flat_ref, flat_out = reference.reshape(len(reference), -1), candidate.reshape(len(candidate), -1)
    finite = bool(np.isfinite(candidate).all())
    return Comparison(
        samples=len(reference),
        cosine_min=float(cos.min()) if finite else float("nan"),
        cosine_mean=float(cos.mean()) if finite else float("nan"),
        max_abs_error=float(np.abs(reference - candidate).max()) if finite else float("inf"),
        max_abs_reference=float(np.abs(reference).max()),
        top1_agreement=float((flat_ref.argmax(1) == flat_out.argmax(1)).mean()),
    )


def judge(comparison: Comparison, tolerance: Tolerance) -> list[str]:
    """What is outside ``tolerance`` (empty: within). NaN figures are always outside."""
    c, t = comparison, tolerance
    problems = []
    checks = [
        (t.min_cosine, c.cosine_min, ">=", "cosine similarity (worst sample)"),
        (t.min_mean_cosine, c.cosine_mean, ">=", "mean cosine similarity"),
        (t.max_rel_error, c.max_rel_error, "<=", "max abs error / max |reference|"),
        (t.min_top1_agreement, c.top1_agreement, ">=", "top-1 agreement"),
    ]
    for bound, value, op, label in checks:
        if bound is None:
            continue
        ok = value >= bound if op == ">=" else value <= bound
        if not ok:  # also catches NaN, which compares False
            problems.append(f"{label} {value:.6g} (want {op} {bound:g})")
    return problems

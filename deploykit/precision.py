"""Which float arithmetic this CPU has, decided from its ISA flags (never assumed).

A precision names the arithmetic: ``fp32`` computes in float32 everywhere; ``bf16`` and ``fp16``
compute in those types where the CPU has units for them. Where it has none, ``bf16`` is refused
(one line naming the missing feature): oneDNN would emulate it with conversions around float32
math, slower than fp32 (oneDNN documents bf16 on pre-AVX512-BF16 cores as a correctness path),
and a user asking for bf16 asks for speed. ``fp16`` without native fp16 still builds: the
weights are stored in float16 and the arithmetic stays float32, and the artifact says so.

Flags are /proc/cpuinfo names (x86) or ``Features`` names (arm64).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from deploykit.errors import DeployError

FLOAT_PRECISIONS = ("fp32", "bf16", "fp16")

# precision -> the flags any one of which gives native arithmetic for it (x86, then arm64).
NATIVE_FLAGS: dict[str, tuple[str, ...]] = {
    "bf16": ("avx512_bf16", "amx_bf16", "bf16"),
    "fp16": ("avx512_fp16", "amx_fp16", "asimdhp"),
}
# The flags named in messages when none of NATIVE_FLAGS is present.
FEATURE_NAMES = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "bf16": "BF16 (arm64)",
                 "avx512_fp16": "AVX512-FP16", "amx_fp16": "AMX-FP16", "asimdhp": "ASIMD-HP (arm64)"}
# Matrix units beat vector units: where both bf16 and fp16 are native, AMX-BF16 makes bf16 the
# faster one on every CPU seen here (Sapphire Rapids has AMX-BF16 but no AMX-FP16).
MATRIX_FLAGS = {"bf16": "amx_bf16", "fp16": "amx_fp16"}


@dataclass(frozen=True)
class Arithmetic:
    """What a float precision executes as on one CPU."""

    precision: str  # what was asked
    executes: str  # the arithmetic: fp32, bf16 or fp16
    native: bool  # the CPU has units for ``executes``
    features: tuple[str, ...]  # the flags that decided it (present ones; the missing ones when refused)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "features": list(self.features)}


# x86 int8 dot-product instructions that add u8 x s8 products into int32 without an int16 step.
INT8_DOT_FLAGS = {"avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}
X86_FLAGS = ("sse4_1", "avx2")  # present on every x86-64 CPU int8 kernels run on


def int16_saturates(flags: Iterable[str]) -> bool:
    """Whether u8 x s8 int8 kernels sum product pairs in a saturating int16 on a CPU with ``flags``
    (x86 without any VNNI/AMX int8 dot product)."""
    flags = frozenset(flags)
    return any(f in flags for f in X86_FLAGS) and not any(f in flags for f in INT8_DOT_FLAGS)


def int8_dot_note(flags: Iterable[str], exact: bool) -> str:
    """How u8 x s8 products are summed on a CPU with ``flags`` (x86 without VNNI: through a
    saturating int16 unless ``exact``, ORT's x64_quant_precision); "" where not x86."""
    flags = frozenset(flags)
    if not any(f in flags for f in X86_FLAGS):
        return ""
    if not int16_saturates(flags):
        found = [name for flag, name in INT8_DOT_FLAGS.items() if flag in flags]
        return f"u8s8 dot products in int32 ({', '.join(found)})"
    if exact:
        return "no VNNI on this CPU: weights beyond 7 bits run as u8u8 (exact, slower than u8s8)"
    return "no VNNI on this CPU: u8s8 pairs are summed in a saturating int16 (no session.x64quantprecision)"


def cpu_flags() -> frozenset[str]:
    """This machine's ISA flags, read from /proc/cpuinfo."""
    from deploykit.device import _cpuinfo, _read

    return frozenset(_cpuinfo(_read("/proc/cpuinfo"))["flags"])


def native_features(precision: str, flags: Iterable[str]) -> tuple[str, ...]:
    """The flags present that give native ``precision`` arithmetic (empty: none)."""
    present = set(flags)
    return tuple(f for f in NATIVE_FLAGS.get(precision, ()) if f in present)


def resolve(precision: str, flags: Iterable[str]) -> Arithmetic:
    """What ``precision`` computes in on a CPU with ``flags``; DeployError for bf16 without units."""
    flags = frozenset(flags)
    if precision not in FLOAT_PRECISIONS:
        raise ValueError(f"not a float precision: {precision}")
    if precision == "fp32":
        return Arithmetic("fp32", "fp32", True, ())
    found = native_features(precision, flags)
    if found:
        return Arithmetic(precision, precision, True, found)
    wanted = " or ".join(FEATURE_NAMES[f] for f in NATIVE_FLAGS[precision][:2])
    if precision == "bf16":
        raise DeployError(
            f"bf16 needs a CPU with {wanted}; this one has neither (emulated bf16 is slower than fp32): "
            "use --precision fp32"
        )
    return Arithmetic("fp16", "fp32", False, (), note=f"fp16 weights, fp32 arithmetic: no {wanted} on this CPU")


def refusal(precision: str, flags: Iterable[str]) -> str | None:
    """Why ``precision`` cannot be built on this CPU, or None."""
    if precision not in FLOAT_PRECISIONS:
        return None
    try:
        resolve(precision, flags)
    except DeployError as err:
        return str(err)
    return None


def fastest_float(flags: Iterable[str]) -> Arithmetic:
    """The fastest native float arithmetic: what INT8 artifacts run their float parts in by default."""
    flags = frozenset(flags)
    native = {p: native_features(p, flags) for p in ("bf16", "fp16")}
    for precision in ("bf16", "fp16"):  # a matrix unit first
        if MATRIX_FLAGS[precision] in flags:
            return Arithmetic(precision, precision, True, native[precision])
    for precision in ("bf16", "fp16"):
        if native[precision]:
            return Arithmetic(precision, precision, True, native[precision])
    return Arithmetic("fp32", "fp32", True, ())

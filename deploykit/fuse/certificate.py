"""The equivalence certificate: measured proof that a fused model computes the same function."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ErrorFigures:
    max_abs_error: float
    max_rel_error: float  # max |fused - original| / max |original|

    @classmethod
    def between(cls, reference: torch.Tensor, candidate: torch.Tensor) -> ErrorFigures:
        reference, candidate = reference.double(), candidate.double()
        max_abs = (reference - candidate).abs().max().item() if reference.numel() else 0.0
        scale = reference.abs().max().item() if reference.numel() else 0.0
        return cls(max_abs, max_abs / scale if scale > 0 else max_abs)


@dataclass(frozen=True)
class BlockCheck:
    module: str
    kind: str
    sources: list[str]
    random_bn: ErrorFigures
    given: ErrorFigures


@dataclass(frozen=True)
class EndToEndCheck:
    inputs: str  # what was fed: "random (randomized BN statistics)", "random", "caller inputs"
    shape: list[int]
    errors: ErrorFigures


@dataclass(frozen=True)
class Certificate:
    tolerance_rel: float
    blocks: list[BlockCheck]
    end_to_end: list[EndToEndCheck]
    unfused: list[dict[str, str]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def max_rel_error(self) -> float:
        figures = [c.errors.max_rel_error for c in self.end_to_end]
        figures += [b.random_bn.max_rel_error for b in self.blocks] + [b.given.max_rel_error for b in self.blocks]
        return max(figures, default=0.0)

    @property
    def max_abs_error(self) -> float:
        return max((c.errors.max_abs_error for c in self.end_to_end), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tolerance_rel

    def failures(self) -> list[str]:
        out = [
            f"{b.module} ({b.kind}): rel error {max(b.random_bn.max_rel_error, b.given.max_rel_error):.2e}"
            for b in self.blocks
            if max(b.random_bn.max_rel_error, b.given.max_rel_error) > self.tolerance_rel
        ]
        out += [
            f"end to end on {c.inputs}: rel error {c.errors.max_rel_error:.2e}"
            for c in self.end_to_end
            if c.errors.max_rel_error > self.tolerance_rel
        ]
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(passed=self.passed, max_rel_error=self.max_rel_error, max_abs_error=self.max_abs_error)
        return data

    def summary(self) -> str:
        lines = [
            f"fused blocks: {len(self.blocks)}, params {self.params_before:,} -> {self.params_after:,}",
            *(
                f"end to end ({c.inputs}, shape {tuple(c.shape)}): max abs {c.errors.max_abs_error:.3e}, "
                f"max rel {c.errors.max_rel_error:.3e}"
                for c in self.end_to_end
            ),
            f"worst block rel error: {max((max(b.random_bn.max_rel_error, b.given.max_rel_error) for b in self.blocks), default=0.0):.3e}",
            f"tolerance (rel): {self.tolerance_rel:.0e} -> {'PASS' if self.passed else 'FAIL'}",
        ]
        if self.unfused:
            lines.append(f"left unfused: {len(self.unfused)} (see report)")
        return "\n".join(lines)

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
class Leftover:
    """Fusible structure still in the fused model: a BatchNorm not folded or branches not merged."""

    name: str  # module name (BatchNorm) or graph node (the sum of branches)
    kind: str  # "batchnorm" or "branches"
    reason: str


@dataclass(frozen=True)
class Certificate:
    tolerance_rel: float
    blocks: list[BlockCheck]
    end_to_end: list[EndToEndCheck]
    unfused: list[dict[str, str]] = field(default_factory=list)  # residual sums: not fusible by nature
    params_before: int = 0
    params_after: int = 0
    left: list[Leftover] = field(default_factory=list)
    batchnorm_before: int = 0
    convs_before: int = 0
    convs_after: int = 0
    accept_partial: bool = False

    @property
    def max_rel_error(self) -> float:
        figures = [c.errors.max_rel_error for c in self.end_to_end]
        figures += [b.random_bn.max_rel_error for b in self.blocks] + [b.given.max_rel_error for b in self.blocks]
        return max(figures, default=0.0)

    @property
    def max_abs_error(self) -> float:
        return max((c.errors.max_abs_error for c in self.end_to_end), default=0.0)

    @property
    def equivalent(self) -> bool:
        return self.max_rel_error <= self.tolerance_rel

    @property
    def batchnorm_left(self) -> int:
        return sum(x.kind == "batchnorm" for x in self.left)

    @property
    def complete(self) -> bool:
        """Nothing fusible left: no BatchNorm, no unmerged parallel branches."""
        return not self.left

    @property
    def passed(self) -> bool:
        """Equivalent, and complete unless a partial fusion was explicitly accepted."""
        return self.equivalent and (self.complete or self.accept_partial)

    @property
    def verdict(self) -> str:
        if not self.equivalent:
            return "FAIL (not equivalent)"
        if not self.complete:
            return f"PARTIAL, accepted: {self.left_summary()}" if self.accept_partial else f"FAIL: {self.left_summary()}"
        return "PASS"

    def left_summary(self) -> str:
        bn = self.batchnorm_left
        branches = len(self.left) - bn
        parts = [f"{bn} of {self.batchnorm_before} BatchNorm unfolded"] if bn else []
        parts += [f"{branches} parallel-branch sums unmerged"] if branches else []
        return ", ".join(parts) or "nothing left"

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
        data.update(
            passed=self.passed, equivalent=self.equivalent, complete=self.complete, verdict=self.verdict,
            batchnorm_left=self.batchnorm_left, max_rel_error=self.max_rel_error, max_abs_error=self.max_abs_error,
        )
        return data

    def summary(self) -> str:
        lines = [
            f"fused blocks: {len(self.blocks)}, params {self.params_before:,} -> {self.params_after:,}, "
            f"convs {self.convs_before} -> {self.convs_after}, "
            f"BatchNorm {self.batchnorm_before} -> {self.batchnorm_left}",
            *(
                f"end to end ({c.inputs}, shape {tuple(c.shape)}): max abs {c.errors.max_abs_error:.3e}, "
                f"max rel {c.errors.max_rel_error:.3e}"
                for c in self.end_to_end
            ),
            f"worst block rel error: {max((max(b.random_bn.max_rel_error, b.given.max_rel_error) for b in self.blocks), default=0.0):.3e}",
            f"tolerance (rel): {self.tolerance_rel:.0e} -> {'within' if self.equivalent else 'EXCEEDED'}",
        ]
        lines += [f"left: {x.name}: {x.reason}" for x in self.left[:10]]
        if len(self.left) > 10:
            lines.append(f"left: ... and {len(self.left) - 10} more (see the JSON report)")
        if self.unfused:
            lines.append(f"sums kept as they are (residuals around non-linear ops, or slower merged): {len(self.unfused)}")
        lines.append(f"certificate: {self.verdict}")
        return "\n".join(lines)

"""Statistics of timed rounds: robust centre, spread, bootstrap intervals, paired ratios.

A configuration is timed in rounds; each round is many iterations and yields its median.
The centre reported is the median of round medians and its interval a percentile bootstrap
(Efron) over rounds with a fixed seed, so the same samples always give the same interval.
Spread figures (p90, min, IQR) describe single iterations, pooled over all rounds.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# A figure is flagged unstable when rounds disagree by more than this (coefficient of
# variation of round medians) or the interval is wider than this fraction of the median.
MAX_CV = 0.10
MAX_CI_HALF_WIDTH = 0.05
MIN_ROUNDS = 5
DEFAULT_RESAMPLES = 5000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """What a row reports about one configuration (milliseconds)."""

    median_ms: float
    ci_low_ms: float
    ci_high_ms: float
    p90_ms: float
    min_ms: float
    iqr_ms: float
    cv: float
    rounds: int
    iterations: int
    unstable: bool
    unstable_reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["unstable_reasons"] = list(self.unstable_reasons)
        return data


@dataclass(frozen=True)
class Ratio:
    """candidate / baseline ratio of medians with its bootstrap interval."""

    ratio: float
    ci_low: float
    ci_high: float
    paired: bool
    rounds: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(samples: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{what}: no samples")
    if not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ValueError(f"{what}: samples must be positive and finite")
    return x


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_median_ci(
    samples: Sequence[float],
    *,
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``samples``."""
    x = _check(samples, "bootstrap")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    return _percentiles(np.median(x[idx], axis=1), confidence)


def summarize(
    rounds: Sequence[Sequence[float]],
    *,
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    max_cv: float = MAX_CV,
    max_ci_half_width: float = MAX_CI_HALF_WIDTH,
    min_rounds: int = MIN_ROUNDS,
) -> Summary:
    """Summarize per-iteration times (ms), given round by round."""
    if not rounds:
        raise ValueError("summarize: no rounds")
    per_round = [_check(r, f"round {i}") for i, r in enumerate(rounds)]
    medians = np.array([np.median(r) for r in per_round])
    pooled = np.concatenate(per_round)
    centre = float(np.median(medians))
    lo, hi = bootstrap_median_ci(medians, seed=seed, resamples=resamples, confidence=confidence)
    cv = float(np.std(medians, ddof=1) / np.mean(medians)) if medians.size > 1 else 0.0
    q25, q75, p90 = np.quantile(pooled, [0.25, 0.75, 0.90])
    reasons = []
    if cv > max_cv:
        reasons.append(f"CV {cv:.1%} > {max_cv:.0%}")
    if (hi - lo) / 2 > max_ci_half_width * centre:
        reasons.append(f"CI half-width {(hi - lo) / 2 / centre:.1%} > {max_ci_half_width:.0%} of median")
    if medians.size < min_rounds:
        reasons.append(f"{medians.size} rounds < {min_rounds}")
    return Summary(
        median_ms=centre,
        ci_low_ms=lo,
        ci_high_ms=hi,
        p90_ms=float(p90),
        min_ms=float(pooled.min()),
        iqr_ms=float(q75 - q25),
        cv=cv,
        rounds=int(medians.size),
        iterations=int(pooled.size),
        unstable=bool(reasons),
        unstable_reasons=tuple(reasons),
    )


def ratio_of_medians(
    candidate: Sequence[float],
    baseline: Sequence[float],
    *,
    paired: bool = True,
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Ratio:
    """median(candidate) / median(baseline) over round medians, with a bootstrap interval.

    Paired: round i of both was timed back to back (interleaved), so rounds are resampled
    together and drift common to both cancels. Unpaired: each side is resampled on its own.
    """
    c = _check(candidate, "candidate")
    b = _check(baseline, "baseline")
    if paired and c.size != b.size:
        raise ValueError(f"paired ratio needs as many candidate as baseline rounds ({c.size} != {b.size})")
    rng = np.random.default_rng(seed)
    idx_c = rng.integers(0, c.size, size=(resamples, c.size))
    idx_b = idx_c if paired else rng.integers(0, b.size, size=(resamples, b.size))
    stats = np.median(c[idx_c], axis=1) / np.median(b[idx_b], axis=1)
    lo, hi = _percentiles(stats, confidence)
    return Ratio(float(np.median(c) / np.median(b)), lo, hi, paired, int(min(c.size, b.size)))

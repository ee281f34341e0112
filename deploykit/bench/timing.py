"""The one timing harness: every latency figure deploykit reports goes through this module.

A *measure* function runs the model ``n`` times and returns each iteration's time in
seconds. On CPU that is a host clock around each call (``host_timer``); a backend whose
runners time themselves (CUDA events) returns its own from ``Backend.timer`` (``timer_for``).

The protocol: each configuration is warmed up until its timings are stable (``warm_up``),
gets enough iterations for a round to last ``min_round_time_s`` (``iterations_per_round``),
then ``interleaved_rounds`` times the configurations one round at a time.

Interleaving order (chosen once, for every caller): round r times every live configuration
once, in the same order each round -- A B C, A B C, ... -- so slow drift of the machine
(thermal, other load) hits all of them alike, and round r of A and round r of B ran back to
back: a fair pair for paired ratios (``deploykit.bench.stats.ratio_of_medians``).

Users: the sweeps (``bench.sweep``, which includes the CPU-targets report), built artifacts side
by side (``bench.artifacts``: the quantization study), and the bundle's recorded latency
(``package.bundle``, via ``fixed_iterations``). The standalone bundle runner keeps a copy of
``fixed_iterations`` because it runs without deploykit installed.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

Measure = Callable[[int], np.ndarray]

MAX_ITERATIONS_PER_ROUND = 100_000


@dataclass(frozen=True)
class WarmUp:
    iterations: int
    seconds: float
    per_iteration_s: float  # median of the last window
    stable: bool  # False: stopped by max_time_s before the window medians agreed


def host_timer(run: Callable[[Any], Any], inputs: Any) -> Measure:
    """Time each call of ``run(inputs)`` with the monotonic high-resolution host clock."""

    def measure(n: int) -> np.ndarray:
        times = np.empty(n, dtype=np.float64)
        clock = time.perf_counter
        for i in range(n):
            start = clock()
            run(inputs)
            times[i] = clock() - start
        return times

    return measure


def timer_for(backend: Any, runner: Any, inputs: Any) -> Measure:
    """The backend's own timer for ``runner`` when it has one (device clocks), else the host clock."""
    own = backend.timer(runner, inputs)
    return own if own is not None else host_timer(runner, inputs)


def warm_up(
    measure: Measure,
    *,
    window: int = 5,
    tolerance: float = 0.02,
    min_time_s: float = 0.2,
    max_time_s: float = 10.0,
) -> WarmUp:
    """Run until the median of the last ``window`` iterations moves less than ``tolerance``.

    Compares the last window with the one before it; stops at ``max_time_s`` regardless
    (reported as not stable). At least ``min_time_s`` is spent so thread pools and caches
    settle even for sub-millisecond models.
    """
    times: list[float] = []
    start = time.perf_counter()
    stable = False
    while True:
        times.extend(measure(1).tolist())
        elapsed = time.perf_counter() - start
        if len(times) >= 2 * window and elapsed >= min_time_s:
            last = float(np.median(times[-window:]))
            before = float(np.median(times[-2 * window : -window]))
            if abs(last - before) <= tolerance * before:
                stable = True
                break
        if elapsed >= max_time_s:
            break
    return WarmUp(len(times), elapsed, float(np.median(times[-window:])), stable)


def iterations_per_round(per_iteration_s: float, min_round_time_s: float, *, min_iterations: int = 3) -> int:
    """Enough iterations for a round to last ``min_round_time_s``."""
    if per_iteration_s <= 0:
        return MAX_ITERATIONS_PER_ROUND
    n = math.ceil(min_round_time_s / per_iteration_s)
    return int(min(MAX_ITERATIONS_PER_ROUND, max(min_iterations, n)))


def time_round(measure: Measure, iterations: int) -> np.ndarray:
    """One round: per-iteration times in milliseconds."""
    return measure(iterations) * 1e3


K = TypeVar("K", bound=Hashable)


def interleaved_rounds(
    measures: dict[K, Measure],
    iterations: dict[K, int],
    rounds: int,
    *,
    on_error: Callable[[K, int, Exception], None] | None = None,
    on_round: Callable[[K, int], None] | None = None,
) -> dict[K, list[np.ndarray]]:
    """Time ``rounds`` rounds in the documented order (every key once per round, dict order).

    Returns each key's per-round times in ms. A key whose measure raises is dropped from the
    remaining rounds and reported to ``on_error(key, round_index, err)`` (re-raised without it).
    """
    times: dict[K, list[np.ndarray]] = {key: [] for key in measures}
    live = list(measures)
    for round_index in range(rounds):
        for key in list(live):
            try:
                times[key].append(time_round(measures[key], iterations[key]))
            except Exception as err:
                if on_error is None:
                    raise
                live.remove(key)
                del times[key]
                on_error(key, round_index, err)
                continue
            if on_round is not None:
                on_round(key, round_index)
    return times


def fixed_iterations(measure: Measure, *, warmup: int, iterations: int) -> dict[str, float]:
    """Median and p90 (ms) of ``iterations`` calls after ``warmup`` untimed ones: a quick figure
    (a bundle's self-test band), not a comparison -- those use rounds."""
    measure(warmup)
    times_ms = measure(iterations) * 1e3
    return {"median_ms": float(np.median(times_ms)), "p90_ms": float(np.percentile(times_ms, 90)),
            "iterations": iterations}


def medians_ms(rounds: Sequence[np.ndarray]) -> list[float]:
    return [float(np.median(r)) for r in rounds]

"""The timing protocol: warm up until stable, then rounds of N iterations each.

A *measure* function runs the model ``n`` times and returns each iteration's time in
seconds. On CPU that is a host clock around each call (``host_timer``); a runner that
times itself (the torch-cuda target, with CUDA events) provides ``runner.timer(inputs)``.
Interleaving rounds across configurations is the sweep's job: this module times one round.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def timer_for(runner: Any, inputs: Any) -> Measure:
    """The runner's own timer when it has one (device clocks), else the host clock."""
    own = getattr(runner, "timer", None)
    return own(inputs) if callable(own) else host_timer(runner, inputs)


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

"""Latency of built artifacts side by side (e.g. an FP32, INT8 and max-drop build), no sweep grid.

``deploykit bench`` sweeps build what they time from a model; the max-drop recipe (mixed
precision, rewritten weights) exists only as an artifact, so this times artifact directories
directly, with the one harness (``deploykit.bench.timing``): warm up until stable, then
interleaved rounds, median of the round medians. ``deploykit bench --artifact DIR ...``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backends.base import DEFAULT_THREADS

ROUND_SECONDS = 0.5
DEFAULT_ROUNDS = 7


def artifact_latency(paths: list[Path], *, threads: int = DEFAULT_THREADS, rounds: int = DEFAULT_ROUNDS,
                     batch: int = 1, round_seconds: float = ROUND_SECONDS) -> list[dict[str, Any]]:
    """Median latency (ms) per artifact; rounds interleave the artifacts so drift hits all alike."""
    from deploykit.backends.base import get_backend
    from deploykit.bench.timing import interleaved_rounds, iterations_per_round, medians_ms, timer_for, warm_up
    from deploykit.device import load_average
    from deploykit.resolve import open_artifact

    measures, iterations, rows = {}, {}, []
    for index, path in enumerate(paths):
        artifact = open_artifact(path)
        backend = get_backend(artifact.target)
        runner = backend.load(artifact, threads=threads)
        shape = [batch, *artifact.record.input_shape[1:]]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        measures[index] = timer_for(backend, runner, x)
        warm = warm_up(measures[index])
        iterations[index] = iterations_per_round(warm.per_iteration_s, round_seconds)
        rows.append({"artifact": str(path), "target": artifact.target, "precision": artifact.precision,
                     "threads": threads, "batch": batch, "clock": backend.clock(), "warmup_stable": warm.stable})
    load_before = load_average()
    times = interleaved_rounds(measures, iterations, rounds)
    for index, row in enumerate(rows):
        row["round_medians_ms"] = medians_ms(times[index])
        row["median_ms"] = float(np.median(row["round_medians_ms"]))
        row["load_average"] = [load_before, load_average()]
    return rows

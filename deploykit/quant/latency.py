"""Latency of built artifacts (an FP32, INT8 and max-drop build side by side), with bench's protocol.

``deploykit bench`` builds what it times from a model; the max-drop recipe (mixed precision,
rewritten weights) exists only as an artifact, so this times artifact directories directly:
warm up until stable (``deploykit.bench.timing``), then interleaved rounds, median of the
round medians. Entry point for scripts::

    python -m deploykit.quant.latency OUT.json ARTIFACT... [--threads 2] [--rounds 7]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DeployError

ROUND_SECONDS = 0.5


def artifact_latency(paths: list[Path], *, threads: int = 2, rounds: int = 7, batch: int = 1) -> list[dict[str, Any]]:
    """Median latency (ms) per artifact; rounds interleave the artifacts so drift hits all alike."""
    from deploykit.backends.base import Artifact, get_backend
    from deploykit.device import load_average
    from deploykit.bench.timing import iterations_per_round, time_round, timer_for, warm_up

    measures, iterations, rows = [], [], []
    for path in paths:
        artifact = Artifact.open(path)
        runner = get_backend(artifact.target).load(artifact, threads=threads)
        shape = [batch, *artifact.meta["inputs"][0]["shape"][1:]]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        measure = timer_for(runner, x)
        warm = warm_up(measure)
        measures.append(measure)
        iterations.append(iterations_per_round(warm.per_iteration_s, ROUND_SECONDS))
        rows.append({"artifact": str(path), "target": artifact.target, "precision": artifact.precision,
                     "threads": threads, "batch": batch, "warmup_stable": warm.stable, "round_medians_ms": []})
    load_before = load_average()
    for _ in range(rounds):
        for row, measure, n in zip(rows, measures, iterations):
            row["round_medians_ms"].append(float(np.median(time_round(measure, n))))
    for row in rows:
        row["median_ms"] = float(np.median(row["round_medians_ms"]))
        row["load_average"] = [load_before, load_average()]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploykit.quant.latency", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    try:
        rows = artifact_latency(args.artifacts, threads=args.threads, rounds=args.rounds)
    except DeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

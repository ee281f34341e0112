"""Peak memory of inference, measured in a fresh process per configuration.

Method (Linux): the child loads the artifact, notes its resident set (VmRSS), resets the
kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``), runs the model N times and reads
the new peak (VmHWM). ``inference_peak_increase_bytes`` = peak during inference - RSS before
it: the activations, workspaces and arenas inference itself needs. ``process_peak_bytes`` is
the child's highest VmHWM (interpreter, runtime, model, loading and inference). Not
``ru_maxrss``: Linux carries it over from the parent across fork+exec, so a child of a large
process reports its parent's peak. Without /proc the increase is ru_maxrss after inference
minus ru_maxrss after loading, which reads 0 when loading peaked higher; the row says which
method was used. A GPU runner (torch-cuda) also reports ``device_peak_bytes``: the peak of
PyTorch's CUDA allocator during inference.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

MEMORY_TIMEOUT_S = 600


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _maxrss_kb() -> int:
    import resource

    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value


def child(artifact_path: Path, *, threads: int, batch: int, input_size: int, iterations: int, seed: int) -> dict[str, Any]:
    import numpy as np

    from deploykit.backends.base import Artifact, get_backend

    artifact = Artifact.open(artifact_path)
    runner = get_backend(artifact.target).load(artifact, threads=threads)
    inputs = np.random.default_rng(seed).standard_normal((batch, 3, input_size, input_size)).astype(np.float32)
    maxrss_loaded = _maxrss_kb()
    peak_loading = _status_kb("VmHWM")
    rss_before = _status_kb("VmRSS")
    reset = rss_before is not None and _reset_peak()
    if hasattr(runner, "reset_device_peak"):  # a GPU runner: its memory is not in the RSS
        runner.reset_device_peak()
    for _ in range(iterations):
        runner(inputs)
    device_peak = runner.device_peak_bytes() if hasattr(runner, "device_peak_bytes") else None
    peak = _status_kb("VmHWM") if reset else None
    if reset and peak is not None:
        increase, method = peak - rss_before, "VmHWM after clear_refs reset - VmRSS before inference"
        process_peak = max(peak, peak_loading or 0)
    else:
        increase, method = _maxrss_kb() - maxrss_loaded, "ru_maxrss after inference - ru_maxrss after load"
        process_peak = _maxrss_kb()
    return {
        "inference_peak_increase_bytes": max(0, increase) * 1024,
        "process_peak_bytes": process_peak * 1024,
        "rss_after_load_bytes": (rss_before or 0) * 1024,
        "iterations": iterations,
        "method": method,
        **({"device_peak_bytes": device_peak} if device_peak is not None else {}),
    }


def measure_memory(artifact_path: Path, *, threads: int, batch: int, input_size: int, iterations: int,
                   seed: int = 0) -> dict[str, Any]:
    """Run ``child`` in a fresh interpreter; an error comes back as {"error": ...}."""
    from deploykit.procs import run_python_module

    args = [str(artifact_path), "--threads", str(threads), "--batch", str(batch), "--input-size", str(input_size),
            "--iterations", str(iterations), "--seed", str(seed)]
    try:
        done = run_python_module("deploykit.bench.memory", args, timeout=MEMORY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"memory measurement timed out after {MEMORY_TIMEOUT_S} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"error": f"memory measurement failed: {tail[:200]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    from deploykit.procs import die_with_parent

    die_with_parent()
    parser = argparse.ArgumentParser(prog="python -m deploykit.bench.memory")
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input-size", type=int, required=True)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = child(args.artifact, threads=args.threads, batch=args.batch, input_size=args.input_size,
                   iterations=args.iterations, seed=args.seed)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

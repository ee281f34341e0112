"""Statistics and the timing protocol, on synthetic samples with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from deploykit.bench.stats import MIN_ROUNDS, bootstrap_median_ci, ratio_of_medians, summarize
from deploykit.bench.timing import host_timer, iterations_per_round, time_round, warm_up


def test_summary_of_known_rounds():
    rounds = [[1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [3.0, 4.0, 5.0], [4.0, 5.0, 6.0], [5.0, 6.0, 7.0]]
    s = summarize(rounds)
    assert s.median_ms == 4.0  # round medians 2, 3, 4, 5, 6
    assert s.min_ms == 1.0
    pooled = np.concatenate(rounds)
    assert s.p90_ms == pytest.approx(np.quantile(pooled, 0.9))
    assert s.iqr_ms == pytest.approx(np.quantile(pooled, 0.75) - np.quantile(pooled, 0.25))
    assert s.cv == pytest.approx(np.std([2, 3, 4, 5, 6], ddof=1) / 4.0)
    assert (s.rounds, s.iterations) == (5, 15)
    assert 2.0 <= s.ci_low_ms <= 4.0 <= s.ci_high_ms <= 6.0


def test_identical_rounds_give_a_zero_width_stable_figure():
    s = summarize([[2.5] * 10] * MIN_ROUNDS)
    assert (s.median_ms, s.ci_low_ms, s.ci_high_ms, s.cv, s.iqr_ms) == (2.5, 2.5, 2.5, 0.0, 0.0)
    assert not s.unstable and s.unstable_reasons == ()


def test_noisy_or_short_measurements_are_flagged_with_reasons():
    noisy = summarize([[1.0], [1.5], [0.7], [1.3], [2.0]])
    assert noisy.unstable
    assert any(r.startswith("CV") for r in noisy.unstable_reasons)
    short = summarize([[1.0, 1.0], [1.0, 1.0]])
    assert short.unstable and short.unstable_reasons == (f"2 rounds < {MIN_ROUNDS}",)


def test_bootstrap_is_reproducible_with_a_seed():
    samples = np.random.default_rng(7).lognormal(mean=1.0, sigma=0.25, size=200)
    first = bootstrap_median_ci(samples, seed=3)
    assert bootstrap_median_ci(samples, seed=3) == first
    assert first[0] < np.median(samples) < first[1]


def test_bootstrap_interval_covers_the_true_median_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    true_median = np.e  # lognormal(mean=1): median e^1
    covered = 0
    trials = 200
    for trial in range(trials):
        lo, hi = bootstrap_median_ci(rng.lognormal(1.0, 0.25, size=60), seed=trial, resamples=1000)
        covered += lo <= true_median <= hi
    assert 0.88 <= covered / trials <= 0.99


def test_paired_ratio_cancels_drift_that_unpaired_cannot():
    # Machine drift: the baseline slows from 10 ms to 14 ms over the rounds; the candidate is
    # always 0.9x the baseline of the same round (+/- 0.5%).
    baseline = np.array([10.0, 11.0, 12.0, 13.0, 14.0, 12.5, 11.5])
    wiggle = np.array([1.0, 1.005, 0.995, 1.002, 0.998, 1.004, 0.996])
    candidate = 0.9 * baseline * wiggle
    paired = ratio_of_medians(candidate, baseline, paired=True, seed=0)
    unpaired = ratio_of_medians(candidate, baseline, paired=False, seed=0)
    assert paired.ratio == pytest.approx(np.median(candidate) / np.median(baseline))
    assert paired.ci_low < 0.9 < paired.ci_high
    assert paired.ci_high - paired.ci_low < 0.02
    assert unpaired.ci_high - unpaired.ci_low > 5 * (paired.ci_high - paired.ci_low)
    assert ratio_of_medians(candidate, baseline, seed=0) == paired  # seeded: same interval


def test_paired_ratio_needs_matching_rounds_and_positive_samples():
    with pytest.raises(ValueError, match="paired ratio"):
        ratio_of_medians([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="positive"):
        summarize([[1.0, -1.0]])
    with pytest.raises(ValueError, match="no samples"):
        bootstrap_median_ci([])


def _scripted(times_s: list[float]):
    """A measure function replaying ``times_s`` (the last value repeats)."""
    calls = []

    def measure(n: int) -> np.ndarray:
        out = [times_s[min(len(calls) + i, len(times_s) - 1)] for i in range(n)]
        calls.extend(out)
        return np.array(out)

    return measure, calls


def test_warm_up_runs_until_the_window_medians_agree():
    # Slow first iterations (cold caches), then steady at 2 ms.
    measure, calls = _scripted([0.02, 0.01, 0.005, 0.003] + [0.002] * 100)
    w = warm_up(measure, window=5, tolerance=0.02, min_time_s=0.0, max_time_s=5.0)
    assert w.stable
    assert w.per_iteration_s == pytest.approx(0.002)
    # Iterations 3-7 (median 2 ms) and 8-12 agree: it stops there, not earlier, not later.
    assert w.iterations == len(calls) == 12


def test_warm_up_gives_up_at_max_time_and_says_so():
    rng = np.random.default_rng(0)

    def erratic(n: int) -> np.ndarray:
        return rng.choice([0.001, 0.005], size=n) * (1 + rng.random(n))

    w = warm_up(erratic, window=3, tolerance=1e-6, min_time_s=0.0, max_time_s=0.05)
    assert not w.stable
    assert w.seconds >= 0.05


def test_round_length_follows_the_warm_up_estimate():
    assert iterations_per_round(0.002, 0.5) == 250
    assert iterations_per_round(1.0, 0.5) == 3  # never fewer than 3 iterations
    measure, _ = _scripted([0.004])
    assert time_round(measure, 6).tolist() == [4.0] * 6  # milliseconds


def test_host_timer_times_every_call():
    seen = []
    measure = host_timer(seen.append, "x")
    times = measure(4)
    assert seen == ["x"] * 4
    assert times.shape == (4,) and np.all(times > 0)


def test_fingerprint_imports_torch_only_where_a_gpu_can_be() -> None:
    """An .onnx build fingerprints the device; on a CPU machine that must not import torch."""
    import os
    import subprocess
    import sys

    from deploykit.device import _nvidia_device_present

    if _nvidia_device_present():
        pytest.skip("an NVIDIA driver is loaded here: torch is asked about its GPUs")
    code = ("import sys; from deploykit.device import device_fingerprint, tool_versions; "
            "fp = device_fingerprint(); tool_versions(); print(fp['gpus'], 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert done.stdout.split() == ["[]", "False"]

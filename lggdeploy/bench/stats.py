"""Statistics for bench: latency percentiles and the paired bootstrap over patients. numpy only."""

from __future__ import annotations

import numpy as np


def latency_summary(seconds: list[float] | np.ndarray, batch: int) -> dict:
    """p50/p90/p99 per batch and per image (ms), and throughput (images/s) from the median."""
    times = np.asarray(seconds, np.float64)
    if times.size == 0:
        raise ValueError("no timings")
    p50, p90, p99 = np.percentile(times, [50, 90, 99]) * 1000.0
    return {
        "batch": batch,
        "runs": int(times.size),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "p50_ms_per_image": float(p50 / batch),
        "images_per_s": float(batch / (p50 / 1000.0)),
    }


def paired_bootstrap_ci(differences, reps: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-patient differences and its percentile bootstrap interval, resampling patients with replacement."""
    diffs = np.asarray(differences, np.float64)
    if diffs.size == 0:
        raise ValueError("no paired differences")
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(reps, diffs.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(diffs.mean()), float(lo), float(hi)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated by another that is at least as fast (lower x) and as accurate (higher y)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])

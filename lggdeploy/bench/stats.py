"""Statistics for bench: latency summaries and paired per-patient differences. numpy only.

Honest numbers on a noisy shared machine: medians with their spread (IQR), p99 only when there are enough runs
to estimate it (100), the max otherwise; a bootstrap interval over patients only when there are enough patients
to resample (5), the per-patient range otherwise.
"""

from __future__ import annotations

import numpy as np

MIN_RUNS_FOR_P99 = 100
MIN_PATIENTS_FOR_INTERVAL = 5


def latency_summary(seconds: list[float] | np.ndarray, batch: int) -> dict:
    """Median, IQR, p90, p99 (or max below 100 runs) per batch, per image (ms), and throughput from the median."""
    times = np.asarray(seconds, np.float64)
    if times.size == 0:
        raise ValueError("no timings")
    p25, p50, p75, p90 = np.percentile(times, [25, 50, 75, 90]) * 1000.0
    enough = times.size >= MIN_RUNS_FOR_P99
    return {
        "batch": batch,
        "runs": int(times.size),
        "p50_ms": float(p50),
        "iqr_ms": float(p75 - p25),
        "p90_ms": float(p90),
        "p99_ms": float(np.percentile(times, 99) * 1000.0) if enough else None,
        "max_ms": float(times.max() * 1000.0),
        "p50_ms_per_image": float(p50 / batch),
        "images_per_s": float(batch / (p50 / 1000.0)),
    }


def paired_bootstrap_ci(
    differences, reps: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of per-patient differences and its percentile bootstrap interval, resampling patients with replacement."""
    diffs = np.asarray(differences, np.float64)
    if diffs.size == 0:
        raise ValueError("no paired differences")
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(reps, diffs.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(diffs.mean()), float(lo), float(hi)


def paired_summary(per_patient: dict[str, float], reps: int = 2000, seed: int = 0) -> dict:
    """Paired per-patient differences: n, mean, range, and a 95 % bootstrap interval only from 5 patients on."""
    diffs = np.asarray(list(per_patient.values()), np.float64)
    n = int(diffs.size)
    summary = {
        "n": n,
        "mean": float(diffs.mean()),
        "min": float(diffs.min()),
        "max": float(diffs.max()),
        "ci95": None,
        "per_patient": per_patient,
    }
    if n >= MIN_PATIENTS_FOR_INTERVAL:
        _, lo, hi = paired_bootstrap_ci(diffs, reps, seed)
        summary["ci95"] = [lo, hi]
    else:
        summary["note"] = (
            f"{n} patient(s): no interval is given (a bootstrap over fewer than {MIN_PATIENTS_FOR_INTERVAL} patients is false precision); the range of the per-patient differences is shown"
        )
    return summary


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated by another that is at least as fast (lower x) and as accurate (higher y)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])

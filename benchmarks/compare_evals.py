"""Two `lggdeploy eval` results on the same patients, paired: per-patient Dice of each, the difference, and its 95 %
bootstrap interval over patients (none under five patients). For ablations: run A (the recipe) against run B (one
change), each scored by `lggdeploy eval ... --out FILE`.

    python benchmarks/compare_evals.py --pair val A-val.json B-val.json --pair test A-test.json B-test.json \
        [--metric dice|dice_without_postprocess|dice_largest_component] [--average] [--out compare.json]

Prints a Markdown table (one row per pair); the JSON holds every figure. --average (A and B are two runs of the same
command, e.g. two seeds): also each patient's mean of A and B, pooled over every pair, with its 95 % bootstrap
interval over patients — the two-run estimate of what the command scores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lggdeploy.bench.stats import MIN_PATIENTS_FOR_INTERVAL, paired_bootstrap_ci, paired_summary
from lggdeploy.common.files import write_json_atomic

METRICS = ("dice", "dice_without_postprocess", "dice_largest_component")


def per_patient(path: Path, metric: str) -> dict[str, float]:
    rows = json.loads(path.read_text())["per_patient"]
    return {row["patient"]: float(row[metric]) for row in rows if row.get(metric) is not None}


def compare(a: Path, b: Path, metric: str = "dice") -> dict:
    first, second = per_patient(a, metric), per_patient(b, metric)
    if set(first) != set(second):
        raise SystemExit(f"{a} and {b} score different patients: pair runs evaluated on the same split")
    diffs = {p: second[p] - first[p] for p in sorted(first)}
    return {
        "metric": metric,
        "a": {"file": str(a), **side(list(first.values()))},
        "b": {"file": str(b), **side(list(second.values()))},
        "difference_b_minus_a": paired_summary(diffs),
        "per_patient": {p: {"a": first[p], "b": second[p]} for p in sorted(first)},
    }


def side(values: list[float]) -> dict:
    """One run's mean per-patient figure and its missed patients (Dice 0)."""
    return {"mean": sum(values) / len(values), "missed": sum(v == 0 for v in values)}


def row(label: str, result: dict) -> str:
    d = result["difference_b_minus_a"]
    ci = f"{d['ci95'][0] * 100:+.2f} to {d['ci95'][1] * 100:+.2f}" if d["ci95"] else "no interval (n < 5)"
    better = sum(v["b"] > v["a"] for v in result["per_patient"].values())
    return (
        f"| {label} | {d['n']} | {result['a']['mean']:.4f} → {result['b']['mean']:.4f} | {d['mean'] * 100:+.2f} ({ci}) | "
        f"{d['min'] * 100:+.2f} to {d['max'] * 100:+.2f} | {better} of {d['n']} | {result['a']['missed']} / "
        f"{result['b']['missed']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", nargs=3, action="append", metavar=("LABEL", "A", "B"), required=True)
    parser.add_argument("--metric", choices=METRICS, default="dice")
    parser.add_argument("--average", action="store_true", help="also each patient's mean of A and B, pooled")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {label: compare(Path(a), Path(b), args.metric) for label, a, b in args.pair}
    print(
        f"| split | n | mean per-patient {args.metric}, A → B | B − A, points (95 % CI) | range | B better | missed A / B |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, result in results.items():
        print(row(label, result))
    if len(results) > 1:  # the pairs pooled: each patient once per pair
        pairs = {f"{k}/{p}": v for k, r in results.items() for p, v in r["per_patient"].items()}
        pooled = {
            "a": side([v["a"] for v in pairs.values()]),
            "b": side([v["b"] for v in pairs.values()]),
            "per_patient": pairs,
        }
        pooled["difference_b_minus_a"] = paired_summary({p: v["b"] - v["a"] for p, v in pooled["per_patient"].items()})
        results["pooled"] = pooled
        print(row("pooled", pooled))
    if args.average:
        results["average_of_a_and_b"] = average(results)
        print(average_line(results["average_of_a_and_b"], args.metric))
    if args.out:
        write_json_atomic(args.out, results)


def average(results: dict) -> dict:
    """Each patient's mean of A and B over every pair (each patient once per pair), with its bootstrap interval."""
    means = {
        f"{label}/{p}": (v["a"] + v["b"]) / 2
        for label, r in results.items()
        if label != "pooled"
        for p, v in r["per_patient"].items()
    }
    values = list(means.values())
    out = {"n": len(values), "mean": sum(values) / len(values), "median": float(np.median(values)), "ci95": None}
    if len(values) >= MIN_PATIENTS_FOR_INTERVAL:
        out["ci95"] = list(paired_bootstrap_ci(values)[1:])
    out["per_patient"] = means
    return out


def average_line(avg: dict, metric: str) -> str:
    ci = f"{avg['ci95'][0]:.3f}–{avg['ci95'][1]:.3f}" if avg["ci95"] else "no interval (n < 5)"
    return (
        f"\neach patient's mean of A and B ({metric}): mean {avg['mean']:.4f} (95 % CI {ci}), "
        f"median {avg['median']:.4f}, n = {avg['n']}"
    )


if __name__ == "__main__":
    main()

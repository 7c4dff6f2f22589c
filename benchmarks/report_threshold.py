"""Does the threshold tuned on the val patients pay on the test patients? Every run, at 0.5 and at its stored threshold.

usage: .venv/bin/python benchmarks/report_threshold.py --data DATA --out OUT LABEL=RUN_DIR [...]

For each run's best.pt: mean per-patient Dice (patients missed) on its val and test patients at 0.5 and at the
threshold training tuned on val and stored, without post-processing (the threshold's own effect). Then the test
patients pooled: a patient tested by several runs (same split seed) counts once, with the mean of its per-run
differences (tuned - 0.5), and a bootstrap 95 % interval over those distinct patients. Writes OUT/threshold.json
and OUT/threshold.md.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

import numpy as np
from report_recipe import best_runs, dice_record, logits_of, parse_run_args, split_parts, write_markdown

from lggdeploy.common.files import write_json_atomic
from lggdeploy.common.machine import machine_info
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.transforms import native_logits
from lggdeploy.models.checkpoint import split_of

BOOTSTRAP = 10_000


def at(native: np.ndarray, slices, threshold: float) -> dict:
    return dice_record(native > np.float32(np.log(threshold / (1 - threshold))), slices)


def pooled(rows: list[dict]) -> dict:
    """Distinct test patients, each with its mean (tuned - 0.5) over the runs that tested it; bootstrap interval."""
    diffs = defaultdict(list)
    for r in rows:
        for patient, tuned in r["test|tuned"]["per_patient"].items():
            diffs[patient].append(tuned - r["test|0.5"]["per_patient"][patient])
    per_patient = {p: float(np.mean(d)) for p, d in sorted(diffs.items())}
    values = np.array(list(per_patient.values()))
    rng = np.random.default_rng(0)
    means = values[rng.integers(0, len(values), (BOOTSTRAP, len(values)))].mean(1)
    return {
        "n_patients": len(values),
        "mean_difference": float(values.mean()),
        "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
        "patients_better": int((values > 0.005).sum()),
        "patients_worse": int((values < -0.005).sum()),
        "per_patient": per_patient,
    }


def main() -> None:
    args = parse_run_args()
    dataset = load_dataset(args.data)
    rows = []
    for label, run, ckpt in best_runs(args.runs):
        row = {"label": label, "run": run, "threshold": ckpt["threshold"], "split_seed": split_of(ckpt).seed}
        for part, slices in split_parts(dataset, ckpt).items():
            native = native_logits(logits_of(ckpt, slices))
            row[f"{part}_patients"] = len(slices.patient_ids)
            row[f"{part}|0.5"], row[f"{part}|tuned"] = at(native, slices, 0.5), at(native, slices, ckpt["threshold"])
        rows.append(row)
        print(
            label,
            row["threshold"],
            " ".join(f"{k}={v['dice']:.3f}/{v['missed']}" for k, v in row.items() if isinstance(v, dict)),
            flush=True,
        )
    summary = pooled(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    write_json_atomic(
        args.out / "threshold.json",
        {"date": dt.date.today().isoformat(), "machine": machine, "runs": rows, "pooled_test": summary},
    )
    lines = [
        "Mean per-patient Dice (patients missed) at 0.5 and at the threshold tuned on val and stored, no post-processing.",
        "",
        "| run | split seed | stored threshold | val (n) at 0.5 | val at tuned | test (n) at 0.5 | test at tuned | test: tuned − 0.5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cell = lambda key: f"{r[key]['dice']:.3f} ({r[key]['missed']})"  # noqa: E731
        lines.append(
            f"| {r['label']} | {r['split_seed']} | {r['threshold']:g} | {cell('val|0.5')} (n={r['val_patients']}) | {cell('val|tuned')} | "
            f"{cell('test|0.5')} (n={r['test_patients']}) | {cell('test|tuned')} | {r['test|tuned']['dice'] - r['test|0.5']['dice']:+.3f} |"
        )
    lo, hi = summary["ci95"]
    lines += [
        "",
        f"Test patients pooled (each distinct patient once, its mean difference over the runs that tested it): n = {summary['n_patients']}, "
        f"mean difference tuned − 0.5 = {summary['mean_difference']:+.4f}, bootstrap 95 % interval [{lo:+.4f}, {hi:+.4f}]; "
        f"{summary['patients_better']} patients better, {summary['patients_worse']} worse (|Δ| > 0.005).",
    ]
    write_markdown(args.out / "threshold.md", lines, machine)


if __name__ == "__main__":
    main()

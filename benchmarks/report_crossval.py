"""Pool a cross-validation's folds (benchmarks/crossval.sh): every fold's test patients, scored by the model that
never saw them, into one per-patient table with n, mean, median, a bootstrap interval over patients and the
patients missed. Folds not yet run are listed, not guessed."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np

from lggdeploy.bench.stats import MIN_PATIENTS_FOR_INTERVAL, paired_bootstrap_ci
from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_line, machine_info


def _machine_line(machine: dict) -> str:
    return f"{cpu_line(machine['cpu'])}, {machine['os']}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--folds", type=int, required=True)
    parser.add_argument("--command", default="")
    args = parser.parse_args()
    rows, per_fold, missing = [], [], []
    for k in range(1, args.folds + 1):
        path = args.out / f"fold-{k}" / "eval_test.json"
        if not path.is_file():
            missing.append(k)
            continue
        result = json.loads(path.read_text())
        history = json.loads((args.out / f"fold-{k}" / "history.json").read_text())
        best = max(history, key=lambda r: r["val_mean_patient_dice"])
        for r in result["per_patient"]:
            rows.append({"fold": k, **r})
        agg = result["aggregates"]
        per_fold.append(
            {
                "fold": k,
                "patients": len(result["per_patient"]),
                "mean_patient_dice": agg["mean_patient_dice"],
                "patients_missed": agg["patients_missed"],
                "epochs": len(history),
                "epoch_1_seconds": history[0]["seconds"],
                "training_minutes": sum(r["seconds"] for r in history) / 60,
                "best_epoch": best["epoch"],
                "best_val": best["val_mean_patient_dice"],
            }
        )
    if not rows:
        raise SystemExit(f"{args.out}: no fold has an eval_test.json yet")
    tumor = [r for r in rows if r["tumor_pixels"] > 0]
    dice = np.array([r["dice"] for r in tumor])
    raw = np.array([r.get("dice_without_postprocess", r["dice"]) for r in tumor])
    n = len(dice)
    interval = paired_bootstrap_ci(dice) if n >= MIN_PATIENTS_FOR_INTERVAL else None
    missed = [r["patient"] for r in tumor if not r["detected"]]
    pooled = {
        "patients": n,
        "folds_done": [f["fold"] for f in per_fold],
        "folds_missing": missing,
        "mean_patient_dice": float(dice.mean()),
        "ci95": [interval[1], interval[2]] if interval else None,
        "median_patient_dice": float(np.median(dice)),
        "mean_patient_dice_without_postprocess": float(raw.mean()),
        "patients_missed": missed,
        "patients_below_0_5": int((dice < 0.5).sum()),
        "tumor_free_patients": [r["patient"] for r in rows if r["tumor_pixels"] == 0],
    }
    record = {
        "command": args.command,
        "date": dt.date.today().isoformat(),
        "machine": machine_info(),
        "pooled": pooled,
        "folds": per_fold,
        "per_patient": rows,
    }
    write_json_atomic(args.out / "crossval.json", record)
    lines = [
        f"# Cross-validation: {args.folds} folds, {len(per_fold)} run ({dt.date.today().isoformat()})",
        "",
        f"- command: `{args.command}`" if args.command else None,
        f"- each fold's machine and date: fold-k/README.md; pooled on {_machine_line(record['machine'])}",
        "",
        "Every fold's test patients are scored by the model trained without them (val picks its best epoch). Pooled "
        f"over **{n} patients with tumor** of {len(per_fold)} fold(s)"
        + (f"; folds {missing} not run yet" if missing else "")
        + ":",
        "",
        "| metric | value |",
        "|---|---|",
        f"| mean per-patient Dice | {dice.mean():.3f}"
        + (
            f" (95 % bootstrap over patients {interval[1]:.3f}–{interval[2]:.3f})"
            if interval
            else f" (n = {n}: no interval)"
        )
        + " |",
        f"| median per-patient Dice | {np.median(dice):.3f} |",
        f"| mean per-patient Dice without post-processing | {raw.mean():.3f} |",
        f"| patients missed (no overlap) | {len(missed)} of {n}{': ' + ', '.join(missed) if missed else ''} |",
        f"| patients below Dice 0.5 | {int((dice < 0.5).sum())} of {n} |",
        "",
        "With --budget-minutes a fold sets its length after epoch 1 and revises it until the cosine's middle, so a busy "
        "host early in a fold means fewer steps.",
        "",
        "| fold | test patients | mean per-patient Dice | missed | epochs | epoch 1 (s) | all epochs (min) | best epoch (val Dice) |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {f['fold']} | {f['patients']} | {f['mean_patient_dice']:.3f} | {f['patients_missed']} | {f['epochs']} | {f['epoch_1_seconds']:.0f} | {f['training_minutes']:.1f} | "
            f"{f['best_epoch']} ({f['best_val']:.3f}) |"
            for f in per_fold
        ],
        "",
        "| fold | patient | slices | tumor slices | Dice | Dice without post-processing | detected |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['fold']} | {r['patient']} | {r['slices']} | {r['tumor_slices']} | {r['dice']:.3f} | {r.get('dice_without_postprocess', r['dice']):.3f} | {r['detected']} |"
            for r in rows
        ],
    ]
    write_text_atomic(args.out / "README.md", "\n".join(line for line in lines if line is not None) + "\n")
    print("\n".join(lines[:14]))


if __name__ == "__main__":
    main()

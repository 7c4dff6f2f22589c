"""Where a model's per-patient Dice is lost, on finished runs: a diagnosis that chooses the next lever.

usage: .venv/bin/python benchmarks/error_anatomy.py --data DATA --out OUT [--exclude SPLIT_JSON] [--parts val,test]
       LABEL=RUN_DIR [...]

Each run's best.pt masks (its threshold, then its stored post-processing) on its val and test patients, minus the
test patients of --exclude (the hold-out patients). A patient's loss 1 - Dice = (FP + FN) / (2 TP + FP + FN) is split
exactly into four shares by where the wrong voxels lie:

- fp-empty: false positives on slices without tumor (what a slice-level "is there tumor here" decision removes);
- fp-tumor: false positives on tumor slices (the outline drawn too wide, or a second blob beside the tumor);
- fn-missed: false negatives on tumor slices where the model drew nothing (a tumor slice not detected: mostly
  the lesion's first and last slices);
- fn-tumor: false negatives on tumor slices where the model drew something (the outline drawn too narrow).

Beside it, three oracles (each one fixes one kind of error with the truth; the gain is a ceiling, not a lever):
no-fp-empty (tumor-free slices cleared), true-components (only predicted 3-D components touching the tumor kept),
missed-slices-filled (the true mask pasted on undetected tumor slices). Patient-runs are pooled per distinct
patient first, then over patients. Writes OUT/error_anatomy.json and OUT/error_anatomy.md.
"""

from __future__ import annotations

import numpy as np
from report_recipe import finished_runs_parser, logits_of, scored_runs, write_report

from lggdeploy.metrics import dice_from_counts
from lggdeploy.postprocess import PostProcess, connected_components

SHARES = ("fp-empty", "fp-tumor", "fn-missed", "fn-tumor")
ORACLES = ("stored", "no-fp-empty", "true-components", "missed-slices-filled")


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice of one patient's volume (lggdeploy's metric: 1 where both are empty)."""
    return float(dice_from_counts((pred & true).sum(), (pred & ~true).sum(), (true & ~pred).sum()))


def anatomy(pred: np.ndarray, true: np.ndarray) -> dict:
    """The four loss shares (summing to 1 - Dice) and the oracles' Dice for one patient's (slices, H, W) volumes."""
    tumor_slice = true.reshape(len(true), -1).any(1)
    drawn_slice = pred.reshape(len(pred), -1).any(1)
    fp, fn = pred & ~true, true & ~pred
    denom = 2 * int((pred & true).sum()) + int(fp.sum()) + int(fn.sum())
    counts = {
        "fp-empty": int(fp[~tumor_slice].sum()),
        "fp-tumor": int(fp[tumor_slice].sum()),
        "fn-missed": int(fn[tumor_slice & ~drawn_slice].sum()),
        "fn-tumor": int(fn[tumor_slice & drawn_slice].sum()),
    }
    shares = {k: (v / denom if denom else 0.0) for k, v in counts.items()}
    cleared = pred.copy()
    cleared[~tumor_slice] = False
    filled = pred.copy()
    filled[tumor_slice & ~drawn_slice] = true[tumor_slice & ~drawn_slice]
    touching = pred.copy()
    if pred.any():
        labels, ids, _ = connected_components(pred)
        touching = np.isin(labels, np.unique(labels[pred & true]))
    oracles = {
        "stored": dice(pred, true),
        "no-fp-empty": dice(cleared, true),
        "true-components": dice(touching, true),
        "missed-slices-filled": dice(filled, true),
    }
    return {
        "shares": shares,
        "oracles": oracles,
        "tumor_slices": int(tumor_slice.sum()),
        "tumor_slices_missed": int((tumor_slice & ~drawn_slice).sum()),
        "empty_slices_with_fp": int((~tumor_slice & drawn_slice).sum()),
        "tumor_voxels": int(true.sum()),
    }


def score(ckpt: dict, slices) -> dict:
    """patient -> anatomy of the run's delivered masks (threshold, then the stored post-processing)."""
    threshold = float(ckpt["threshold"])
    predicted = logits_of(ckpt, slices) > np.float32(np.log(threshold / (1 - threshold)))
    rule = PostProcess.from_json(ckpt.get("postprocess"))
    out = {}
    for pid in dict.fromkeys(slices.patients.tolist()):
        sel = slices.patients == pid
        out[pid] = anatomy(rule.apply(predicted[sel]), np.asarray(slices.masks[sel], bool))
    return out


def pooled(runs: dict) -> dict:
    """Each distinct patient's patient-runs averaged first; then the mean over patients of shares and oracles."""
    by_patient: dict[str, list[dict]] = {}
    for r in runs.values():
        for pid, a in r["dice"].items():
            by_patient.setdefault(pid, []).append(a)

    def mean_of(group: str, key: str) -> float:
        return float(np.mean([np.mean([a[group][key] for a in rows]) for rows in by_patient.values()]))

    return {
        "patients": len(by_patient),
        "patient_runs": sum(len(v) for v in by_patient.values()),
        "shares": {k: mean_of("shares", k) for k in SHARES},
        "oracles": {k: mean_of("oracles", k) for k in ORACLES},
        "per_patient": {
            pid: {
                "runs": len(rows),
                "dice": float(np.mean([a["oracles"]["stored"] for a in rows])),
                **{k: float(np.mean([a["shares"][k] for a in rows])) for k in SHARES},
            }
            for pid, rows in sorted(by_patient.items())
        },
    }


def markdown(runs: dict, pool: dict) -> list[str]:
    lines = [
        "# Where per-patient Dice is lost (finished runs; patients of --exclude's test split left out)",
        "",
        f"{pool['patient_runs']} patient-runs, {pool['patients']} distinct patients (each patient's runs averaged "
        "first). Loss shares in Dice points (they sum to 100 x (1 - mean per-patient Dice)); oracles: the mean "
        "per-patient Dice with one kind of error fixed from the truth (a ceiling, not a lever).",
        "",
        "| " + " | ".join(["", *SHARES, "total lost"]) + " |",
        "|---|" + "---|" * (len(SHARES) + 1),
        "| points lost | "
        + " | ".join(f"{100 * pool['shares'][k]:.2f}" for k in SHARES)
        + f" | {100 * sum(pool['shares'].values()):.2f} |",
        "",
        "| oracle | mean per-patient Dice | gain, points |",
        "|---|---|---|",
    ]
    base = pool["oracles"]["stored"]
    lines += [f"| {k} | {v:.4f} | {100 * (v - base):+.2f} |" for k, v in pool["oracles"].items()]
    lines += [
        "",
        "Per patient (mean over its runs), worst first:",
        "",
        "| patient | runs | Dice | " + " | ".join(SHARES) + " |",
        "|---|---|---|" + "---|" * len(SHARES),
    ]
    for pid, row in sorted(pool["per_patient"].items(), key=lambda kv: kv[1]["dice"]):
        lines.append(
            f"| {pid} | {row['runs']} | {row['dice']:.3f} | " + " | ".join(f"{100 * row[k]:.1f}" for k in SHARES) + " |"
        )
    totals = {
        k: sum(a[k] for r in runs.values() for a in r["dice"].values())
        for k in ("tumor_slices", "tumor_slices_missed", "empty_slices_with_fp")
    }
    lines += [
        "",
        f"Slices over all patient-runs: {totals['tumor_slices']} tumor slices, {totals['tumor_slices_missed']} of them "
        f"with nothing drawn; {totals['empty_slices_with_fp']} tumor-free slices with something drawn.",
    ]
    return lines


def main() -> None:
    args = finished_runs_parser().parse_args()
    runs = scored_runs(args.runs, args.data, args.exclude, score, args.parts.split(","))
    pool = pooled(runs)
    write_report(args.out, "error_anatomy", {"runs": runs, "pooled": pool}, markdown(runs, pool))


if __name__ == "__main__":
    main()

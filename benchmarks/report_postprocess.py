"""Post-processing chosen on the val patients (lggdeploy/postprocess.py), applied to finished training runs.

usage: .venv/bin/python benchmarks/report_postprocess.py --data DATA --out OUT LABEL=RUN_DIR [...]

For every run's best.pt, at its stored threshold: the rule `lggdeploy train` stores today (components smaller than
half the smallest train tumor removed, kept only if the val patients say it does not hurt; `postprocess.tune`, the
same function training calls), then on the test patients the mean per-patient Dice and the patients missed without
post-processing, with the stored rule, and with the largest 3-D component only (Buda et al.; nnU-Net's candidate).
A run whose best.pt already stores a tuned rule is reported with that record. Writes OUT/postprocess.json and
OUT/postprocess.md (the narrative is added by hand in OUT/README.md).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np

from lggdeploy.common.machine import machine_info
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.transforms import logits_to_masks
from lggdeploy.metrics import confusion_counts, summarize
from lggdeploy.models.checkpoint import load_checkpoint, split_of
from lggdeploy.postprocess import LARGEST, PostProcess, smallest_tumor, tune

from report_recipe import logits_of, parse_run_args


def scored(predicted: np.ndarray, slices, rule: PostProcess) -> dict:
    return summarize(confusion_counts(rule.apply_per_patient(predicted, slices.patients), slices.masks), slices.patients)


def main() -> None:
    args = parse_run_args()
    dataset = load_dataset(args.data)
    rows, per_patient = [], {}
    for item in args.runs:
        label, run = item.split("=", 1)
        ckpt = load_checkpoint(Path(run) / "best.pt")
        split = split_of(ckpt)
        threshold = ckpt["threshold"]
        if "postprocess_tuning" in ckpt:
            record, origin = ckpt["postprocess_tuning"], "stored by training"
        else:
            train_masks = load_slices(dataset, split.train)
            val = load_slices(dataset, split.val)
            val_predicted = logits_to_masks(logits_of(ckpt, val), threshold=threshold)
            record, origin = tune(val_predicted, val.masks, val.patients, smallest_tumor(train_masks.masks, train_masks.patients)), "tuned afterwards (same function)"
        rule = PostProcess.from_json(record["postprocess"])
        test = load_slices(dataset, split.test)
        predicted = logits_to_masks(logits_of(ckpt, test), threshold=threshold)
        none, stored, largest = (scored(predicted, test, r) for r in (PostProcess(), rule, PostProcess(LARGEST)))
        agg = lambda s: s["aggregates"]  # noqa: E731
        rows.append({
            "label": label, "run": run, "threshold": threshold, "origin": origin, "tuning": record, "rule": rule.describe(),
            "test_patients": len(split.test),
            "test_dice_none": agg(none)["mean_patient_dice"], "test_missed_none": agg(none)["patients_missed"],
            "test_dice_rule": agg(stored)["mean_patient_dice"], "test_missed_rule": agg(stored)["patients_missed"],
            "test_median_rule": agg(stored)["median_patient_dice"],
            "test_fp_slice_rate_none": agg(none)["false_positive_slice_rate"], "test_fp_slice_rate_rule": agg(stored)["false_positive_slice_rate"],
            "test_dice_largest": agg(largest)["mean_patient_dice"], "test_missed_largest": agg(largest)["patients_missed"],
        })
        per_patient[label] = [{"patient": a["patient"], "tumor_slices": a["tumor_slices"], "none": a["dice"], "rule": b["dice"], "largest": c["dice"]}
                              for a, b, c in zip(none["per_patient"], stored["per_patient"], largest["per_patient"])]
        r = rows[-1]
        print(f"{label}: {r['rule']}; test {r['test_dice_none']:.4f} -> {r['test_dice_rule']:.4f} (largest only {r['test_dice_largest']:.4f})", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    (args.out / "postprocess.json").write_text(json.dumps({"date": dt.date.today().isoformat(), "machine": machine, "runs": rows, "per_patient": per_patient}, indent=2) + "\n")
    f4 = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        "| run | threshold | smallest train tumor (voxels) | rule stored | val Dice without → with (n) | test Dice none | test Dice stored rule | test Dice largest only | test missed none / rule / largest (n) | FP slice rate none → rule |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["tuning"]
        val = f"{f4(t.get('val_mean_patient_dice_without'))} → {f4(t.get('val_mean_patient_dice_with'))} ({len(t['patients'])})"
        lines.append(f"| {r['label']} | {r['threshold']} | {t['smallest_train_tumor_voxels']} | {r['rule']}{'' if t['kept'] else ' (' + t['why'] + ')'} | {val} | "
                     f"{f4(r['test_dice_none'])} | {f4(r['test_dice_rule'])} | {f4(r['test_dice_largest'])} | "
                     f"{r['test_missed_none']} / {r['test_missed_rule']} / {r['test_missed_largest']} ({r['test_patients']}) | "
                     f"{f4(r['test_fp_slice_rate_none'])} → {f4(r['test_fp_slice_rate_rule'])} |")
    lines += ["", "Per test patient: Dice without post-processing / with the stored rule / largest component only:", ""]
    for label, patients in per_patient.items():
        lines += [f"**{label}**: " + "; ".join(f"{p['patient']} ({p['tumor_slices']} tumor slices) {p['none']:.3f} / {p['rule']:.3f} / {p['largest']:.3f}" for p in patients), ""]
    cpu = machine["cpu"]
    lines += [f"Machine: {cpu['model']}, {cpu['cores']} cores ({', '.join(cpu['isa'])}); {dt.date.today().isoformat()}."]
    (args.out / "postprocess.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Post-processing chosen on the val patients (lggdeploy/postprocess.py), applied to finished training runs.

usage: .venv/bin/python benchmarks/report_postprocess.py --data DATA --out OUT LABEL=RUN_DIR [...]

For every run's best.pt, at its stored threshold, the rules side by side on its val and test patients: none; the
absolute size alone (components under half the smallest train tumor removed, largest kept); the two-part rule (also
components under half the patient's largest removed); the largest 3-D component only (Buda et al.; nnU-Net's
candidate); and the rule `postprocess.tune` picks today from the val patients (the function training calls). A run
whose best.pt stores the rule its training chose is also reported with that stored rule. Per rule: mean per-patient
Dice and patients missed (Dice < 0.05). Writes OUT/postprocess.json and OUT/postprocess.md (the narrative is added by
hand in OUT/README.md).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from report_recipe import logits_of, parse_run_args, write_markdown

from lggdeploy.common.files import write_json_atomic
from lggdeploy.common.machine import machine_info
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.transforms import logits_to_masks
from lggdeploy.metrics import confusion_counts, summarize
from lggdeploy.models.checkpoint import load_checkpoint, split_of
from lggdeploy.postprocess import LARGEST, PostProcess, smallest_tumor, tune

COLUMNS = ("none", "size", "two-part", "largest", "tuned today")
LARGEST_FRACTION = 0.5  # the two-part rule: also components under half the patient's largest (`--postprocess N,0.5`)


def scored(predicted: np.ndarray, slices, rule: PostProcess) -> dict:
    return summarize(
        confusion_counts(rule.apply_per_patient(predicted, slices.patients), slices.masks), slices.patients
    )


def main() -> None:
    args = parse_run_args()
    dataset = load_dataset(args.data)
    rows, per_patient = [], {}
    for item in args.runs:
        label, run = item.split("=", 1)
        ckpt = load_checkpoint(Path(run) / "best.pt")
        split = split_of(ckpt)
        threshold = ckpt["threshold"]
        train_masks = load_slices(dataset, split.train)
        val, test = load_slices(dataset, split.val), load_slices(dataset, split.test)
        val_predicted = logits_to_masks(logits_of(ckpt, val), threshold=threshold)
        record = tune(val_predicted, val.masks, val.patients, smallest_tumor(train_masks.masks, train_masks.patients))
        size = record["candidate"][
            "min_component_voxels"
        ]  # the size rule's own size (every split here has train tumors)
        rules = {
            "none": PostProcess(),
            "size": PostProcess(size),
            "two-part": PostProcess(size, LARGEST_FRACTION),
            "largest": PostProcess(LARGEST),
            "tuned today": PostProcess.from_json(record["postprocess"]),
        }
        stored = ckpt.get("postprocess_tuning")
        if stored is not None:
            rules["stored by training"] = PostProcess.from_json(ckpt["postprocess"])
        predicted = logits_to_masks(logits_of(ckpt, test), threshold=threshold)
        figures = {
            part: {name: scored(masks, slices, rule) for name, rule in rules.items()}
            for part, masks, slices in (("val", val_predicted, val), ("test", predicted, test))
        }
        agg = lambda part, name: figures[part][name]["aggregates"]  # noqa: E731
        rows.append(
            {
                "label": label,
                "run": run,
                "threshold": threshold,
                "size_voxels": size,
                "tuning_today": record,
                "rules": {name: rule.to_json() for name, rule in rules.items()},
                "rule_today": rules["tuned today"].describe(),
                "rule_stored": rules["stored by training"].describe() if stored is not None else None,
                "val_patients": len(split.val),
                "test_patients": len(split.test),
                **{f"{part}_dice_{name}": agg(part, name)["mean_patient_dice"] for part in figures for name in rules},
                **{f"{part}_missed_{name}": agg(part, name)["patients_missed"] for part in figures for name in rules},
                "test_median_tuned_today": agg("test", "tuned today")["median_patient_dice"],
                "test_fp_slice_rate_none": agg("test", "none")["false_positive_slice_rate"],
                "test_fp_slice_rate_tuned_today": agg("test", "tuned today")["false_positive_slice_rate"],
            }
        )
        per_patient[label] = [
            {
                "patient": rows_[0]["patient"],
                "tumor_slices": rows_[0]["tumor_slices"],
                **{name: r["dice"] for name, r in zip(rules, rows_)},
            }
            for rows_ in zip(*(figures["test"][name]["per_patient"] for name in rules))
        ]
        r = rows[-1]
        print(
            f"{label}: today {r['rule_today']}; test "
            + ", ".join(f"{name} {r['test_dice_' + name]:.4f}" for name in rules),
            flush=True,
        )

    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    write_json_atomic(
        args.out / "postprocess.json",
        {"date": dt.date.today().isoformat(), "machine": machine, "runs": rows, "per_patient": per_patient},
    )
    f3 = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731

    def cells(r, part):
        return " | ".join(f"{f3(r[f'{part}_dice_{name}'])} ({r[f'{part}_missed_{name}']})" for name in COLUMNS)  # noqa: E731

    head = " | ".join(COLUMNS)
    lines = [
        "Mean per-patient Dice (patients missed) per rule; size = components under half the smallest train tumor removed; two-part = also those under "
        f"{LARGEST_FRACTION:g} x the patient's largest component; largest = the largest 3-D component only; tuned today = what `postprocess.tune` keeps on the val patients.",
        "",
        f"| run | threshold | size (voxels) | rule tuned today | stored by training (test Dice) | val n | val: {head} | test n | test: {head} | test FP slice rate none → tuned |",
        "|---|---|---|---|---|---|" + "---|" * len(COLUMNS) + "---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for r in rows:
        stored = f"{r['rule_stored']} ({f3(r['test_dice_stored by training'])})" if r["rule_stored"] else "—"
        lines.append(
            f"| {r['label']} | {r['threshold']} | {r['size_voxels']} | {r['rule_today']} | {stored} | {r['val_patients']} | {cells(r, 'val')} | "
            f"{r['test_patients']} | {cells(r, 'test')} | {f3(r['test_fp_slice_rate_none'])} → {f3(r['test_fp_slice_rate_tuned_today'])} |"
        )
    lines += ["", f"Per test patient: Dice {' / '.join(COLUMNS[:4])}:"]
    for label, patients in per_patient.items():
        lines += [
            "",
            f"**{label}**: "
            + "; ".join(
                f"{p['patient']} ({p['tumor_slices']} tumor slices) " + " / ".join(f"{p[c]:.3f}" for c in COLUMNS[:4])
                for p in patients
            ),
        ]
    write_markdown(args.out / "postprocess.md", lines, machine)


if __name__ == "__main__":
    main()

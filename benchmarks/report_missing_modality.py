"""Missing sequences: how each trained run segments when pre- and/or post-contrast is missing.

usage: .venv/bin/python benchmarks/report_missing_modality.py --data DATA --out OUT LABEL=RUN_DIR [...]

The data set fills a missing sequence with FLAIR (its README: 9 of the 110 patients lack post-contrast, 6
pre-contrast; two of the 34 shared patients, TCGA_FG_A60K and TCGA_HT_A616, have FLAIR in all three channels). For
every run's best.pt, at its stored threshold and post-processing, on its val and test patients: the mean
per-patient Dice and the patients missed (Dice < 0.05) with the slices as they are, and with the data set's fill
applied to every slice — pre-contrast missing, post-contrast missing, both missing — and with FLAIR darkened to 0.6
of its intensity (as TCGA_HT_A5RC's FLAIR is, against the other shared patients': 99th percentile 85 vs 94–181), and
with the whole scan at 0.6 and 1.4 of its intensity (MR has no absolute intensity scale).
Patients whose channels are already filled are scored as they are in the fill columns. Writes OUT/missing_modality.json and OUT/missing_modality.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
from report_recipe import best_runs, dice_record, logits_of, parse_run_args, split_parts, write_markdown

from lggdeploy.common.files import write_json_atomic
from lggdeploy.common.machine import machine_info
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.transforms import logits_to_masks
from lggdeploy.postprocess import PostProcess


def fill(*channels: int):
    """The data set's fill: `channels` of a (N, H, W, 3) uint8 stack replaced by FLAIR (channel 1), in place."""

    def apply(images: np.ndarray) -> None:
        for c in channels:
            images[..., c] = images[..., 1]

    return apply


def gain(factor: float, *channels: int):
    """`channels` of a (N, H, W, 3) uint8 stack at `factor` x their intensity (rounded, clipped to 255), in place."""

    def apply(images: np.ndarray) -> None:
        for c in channels:
            images[..., c] = np.clip(np.round(images[..., c] * factor), 0, 255).astype(np.uint8)

    return apply


CONDITIONS = {
    "as acquired": fill(),
    "pre-contrast missing": fill(0),
    "post-contrast missing": fill(2),
    "both missing": fill(0, 2),
    "FLAIR x0.6": gain(0.6, 1),
    "scan x0.6": gain(0.6, 0, 1, 2),
    "scan x1.4": gain(1.4, 0, 1, 2),
}


def altered(slices, condition):
    """A copy of `slices` with `condition` applied to its images."""
    images = slices.images.copy()
    condition(images)
    return dataclasses.replace(slices, images=images)


def main() -> None:
    args = parse_run_args()
    dataset = load_dataset(args.data)
    rows = []
    for label, run, ckpt in best_runs(args.runs):
        rule = PostProcess.from_json(ckpt.get("postprocess"))
        row = {
            "label": label,
            "run": run,
            "missing_modality": ckpt.get("train_config", {}).get("missing_modality", 0.0),
            "normalization": ckpt["normalization"].get("mode", "fixed"),
            "threshold": ckpt["threshold"],
            "postprocess": rule.describe(),
        }
        for part, slices in split_parts(dataset, ckpt).items():
            row[f"{part}_patients"] = len(slices.patient_ids)
            for name, condition in CONDITIONS.items():
                variant = altered(slices, condition)
                predicted = rule.apply_per_patient(
                    logits_to_masks(logits_of(ckpt, variant), threshold=ckpt["threshold"]), slices.patients
                )
                row[f"{part}|{name}"] = dice_record(predicted, slices)
        rows.append(row)
        print(
            label,
            " ".join(f"{k}={v['dice']:.3f}/{v['missed']}" for k, v in row.items() if isinstance(v, dict)),
            flush=True,
        )

    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    write_json_atomic(
        args.out / "missing_modality.json", {"date": dt.date.today().isoformat(), "machine": machine, "runs": rows}
    )
    names = list(CONDITIONS)
    lines = [
        "Mean per-patient Dice (patients missed) at each run's stored threshold and post-processing; the data set's fill (FLAIR copied into the missing "
        "channels), FLAIR at 0.6 of its intensity, or the whole scan at 0.6 or 1.4, applied to every slice of the split.",
        "",
        "| run | --missing-modality | --normalization | split (n) | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        for part in ("val", "test"):
            lines.append(
                f"| {r['label']} | {r['missing_modality']:g} | {r['normalization']} | {part} ({r[f'{part}_patients']}) | "
                + " | ".join(f"{r[f'{part}|{n}']['dice']:.3f} ({r[f'{part}|{n}']['missed']})" for n in names)
                + " |"
            )
    write_markdown(args.out / "missing_modality.md", lines, machine)


if __name__ == "__main__":
    main()

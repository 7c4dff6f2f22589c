"""A finished checkpoint's post-processing decided again by today's training-time rule, then scored like `eval`.

usage: .venv/bin/python benchmarks/retune_postprocess.py CKPT --data DATA --out EVAL.json [--split test]

What `lggdeploy train` stores today (the size rule, the mean-probability floor, the outline step), for a model trained
before it: the library's own `postprocess.tune` on the checkpoint's val patients (their masks at the stored threshold,
every pixel's probability and the slices; the size candidate from its train patients' smallest tumor), then the checkpoint scored on `--split` with the rule it
decides — the weights untouched. EVAL.json has `lggdeploy eval`'s per-patient rows and aggregates (so
benchmarks/compare_evals.py pairs it with the stored rule's eval), plus the decision under "postprocess_tuning".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from report_recipe import logits_of

from lggdeploy.common.files import write_json_atomic
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.transforms import masks_and_probabilities
from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of, split_of
from lggdeploy.models.evaluate import score_model
from lggdeploy.outline import OutlineCRF
from lggdeploy.postprocess import PostProcess, smallest_tumor, tune


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    dataset, split, threshold = load_dataset(args.data), split_of(ckpt), float(ckpt["threshold"])
    train = load_slices(dataset, split.train)
    val = load_slices(dataset, split.val)
    predicted, probabilities = masks_and_probabilities(logits_of(ckpt, val), threshold=threshold, every_pixel=True)
    record = tune(
        predicted,
        val.masks,
        val.patients,
        smallest_tumor(train.masks, train.patients),
        probabilities=probabilities,
        images=val.images,
        outline=OutlineCRF(),
    )
    rule = PostProcess.from_json(record["postprocess"])
    summary = score_model(
        model_from_checkpoint(ckpt).eval(),
        load_slices(dataset, split.patients(args.split)),
        ckpt["img_size"],
        normalization_of(ckpt),
        8,
        "cpu",
        show_progress=False,
        threshold=threshold,
        postprocess=rule,
    )
    summary["meta"] = {
        "checkpoint": str(args.checkpoint),
        "split": args.split,
        "postprocess": rule.to_json(),
        "stored_postprocess": ckpt.get("postprocess"),
        "postprocess_tuning": record,
    }
    write_json_atomic(args.out, summary)
    print(
        f"{args.checkpoint}: {rule.describe()} (stored: {PostProcess.from_json(ckpt.get('postprocess')).describe()}); "
        f"{args.split} mean per-patient Dice {summary['aggregates']['mean_patient_dice']:.4f} on "
        f"{len(summary['per_patient'])} patients, missed {summary['aggregates']['patients_missed']}; "
        f"val decision: size {record.get('kept')}, floor {record.get('confidence', {}).get('kept')}, "
        f"outline {record.get('outline', {}).get('kept')}",
        flush=True,
    )


if __name__ == "__main__":
    main()

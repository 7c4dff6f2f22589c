"""Inference on an upscaled slice, on finished runs: a finer effective output stride without training.

usage: .venv/bin/python benchmarks/test_time_scale.py --data DATA --out OUT [--exclude SPLIT_JSON] [--parts val,test]
       LABEL=RUN_DIR [...]

PSPNet draws its outline from logits at 1/8 of its input. Run on the slice resized up by s (bilinear, normalized at
that size, as `preprocess` does at any `img_size`), its logits come at stride 8 / s of the slice's own pixels; they are
brought back to 256 x 256 (bilinear) before the threshold. Variants: scales 1 (the baseline), 1.125, 1.25, 1.5, and
"1+1.25" (the mean of the logits at 256 and 320 px). Each ends with the delivered post-processing: the run's stored
size rule, then the mean-probability floor 0.9 (training's second step). Scored on each run's val and test patients
(--parts) minus the test patients of --exclude; pooled per patient against scale 1. The plan and its bar:
benchmarks/results/test-time-scale-zen4/plan.md. Writes OUT/test_time_scale.json and OUT/test_time_scale.md.
"""

from __future__ import annotations

import numpy as np
from report_recipe import (
    delivered,
    finished_runs_parser,
    pooled_against,
    pooled_table,
    rule_rows,
    rule_table_head,
    scored_runs,
    write_report,
)

from lggdeploy.data.transforms import NATIVE_SIZE, native_logits, sigmoid
from lggdeploy.engines.precision.gate import run_on_slices
from lggdeploy.metrics import confusion_counts, summarize
from lggdeploy.models.checkpoint import model_from_checkpoint, normalization_of
from lggdeploy.models.torch_runner import TorchRunner

SCALES = (1.0, 1.125, 1.25, 1.5)
ENSEMBLE = ("1+1.25", (1.0, 1.25))


def input_size(scale: float) -> int:
    """The model input for `scale`: 256 x scale, a multiple of 32 (PSPNet's encoder needs it)."""
    return int(round(NATIVE_SIZE * scale / 32)) * 32


def native_logits_at(runner: TorchRunner, ckpt: dict, slices, size: int) -> np.ndarray:
    """The model's logits on `slices` run at `size` px, brought back to (slices, 256, 256)."""
    return native_logits(run_on_slices(runner, slices, size, normalization_of(ckpt), 0.5, f"{size}px").logits)


def score(ckpt: dict, slices) -> dict:
    """variant -> {patient: Dice} of the delivered masks."""
    runner = TorchRunner(model_from_checkpoint(ckpt).eval(), "cpu")
    logits = {f"{s:g}": native_logits_at(runner, ckpt, slices, input_size(s)) for s in SCALES}
    name, parts = ENSEMBLE
    logits[name] = np.mean([logits[f"{s:g}"] for s in parts], axis=0)
    threshold = float(ckpt["threshold"])
    rule = delivered(ckpt)
    out: dict = {}
    for variant, native in logits.items():
        predicted = native > np.float32(np.log(threshold / (1 - threshold)))
        prob = np.where(predicted, sigmoid(native), np.float32(0))
        masks = np.array(predicted, copy=True)
        for pid in dict.fromkeys(slices.patients.tolist()):
            sel = slices.patients == pid
            masks[sel] = rule.apply(predicted[sel], prob[sel])
        summary = summarize(confusion_counts(masks, slices.masks), slices.patients)
        out[variant] = {r["patient"]: r["dice"] for r in summary["per_patient"]}
    return out


def main() -> None:
    args = finished_runs_parser().parse_args()
    runs = scored_runs(args.runs, args.data, args.exclude, score, args.parts.split(","))
    names = list(next(iter(runs.values()))["dice"])
    cost = {f"{s:g}": (input_size(s) / NATIVE_SIZE) ** 2 for s in SCALES}
    cost[ENSEMBLE[0]] = sum(cost[f"{s:g}"] for s in ENSEMBLE[1])
    lines = [
        "# Inference on an upscaled slice (finished runs; patients of --exclude's test split left out)",
        "",
        "Mean per-patient Dice of the delivered masks (stored size rule, then the mean-probability floor 0.9); "
        "[missed / lost] — lost: found at scale 1, missed by the variant.",
        "",
        *rule_table_head(names),
    ]
    lines += rule_rows(runs, names, found_by="1")
    pooled = {n: pooled_against(runs, n, "1") for n in names if n != "1"}
    lines += [
        "",
        "Against scale 1, pooled over patients (each patient's runs averaged first; points):",
        "",
        *pooled_table(
            pooled,
            "variant",
            {
                "input px": {n: " + ".join(str(input_size(float(s))) for s in n.split("+")) for n in pooled},
                "pixels vs 256": {n: f"{cost[n]:.2f}x" for n in pooled},
            },
        ),
    ]
    write_report(args.out, "test_time_scale", {"runs": runs, "pooled": pooled}, lines)


if __name__ == "__main__":
    main()

"""A dense CRF that redraws the outlines of the delivered masks, on finished runs (post-processing, no training).

usage: .venv/bin/python benchmarks/crf_outline.py --data DATA --out OUT [--exclude SPLIT_JSON] [--parts val,test]
       [--variants b10,...] LABEL=RUN_DIR [...]

Needs `pydensecrf2` (the `outline` extra, part of `train`). The delivered post-processing (the run's stored size rule,
then the mean-probability floor 0.9) decides which tumors exist; then the library's outline step
(lggdeploy/outline.py: a 2-D fully connected CRF, Kraehenbuehl & Koltun 2011, on the crop around each slice's kept
mask dilated by 8 px, its labels kept only inside that dilation) redraws the outlines with each variant's terms.
Variants: VARIANTS below (`g`: the smoothness term alone, the appearance term weighted 0; --variants: some of them,
for the guard). Scored on each run's val and test patients
(--parts) minus the test patients of --exclude; pooled per patient against "none". The plan and its bar:
benchmarks/results/crf-outline-zen4/plan.md. Writes OUT/crf_outline.json and OUT/crf_outline.md.
"""

from __future__ import annotations

import time

import numpy as np
from report_recipe import (
    delivered,
    finished_runs_parser,
    logits_of,
    pooled_against,
    pooled_table,
    rule_rows,
    rule_table_head,
    scored_runs,
    write_report,
)

from lggdeploy.data.transforms import native_logits, sigmoid
from lggdeploy.metrics import confusion_counts, summarize
from lggdeploy.outline import OutlineCRF

VARIANTS = {
    "g": OutlineCRF(compat=0.0),
    "b10": OutlineCRF(sxy=10, srgb=10, compat=5),  # the one adopted: OutlineCRF's defaults
    "b20": OutlineCRF(sxy=20, srgb=20, compat=5),
    "b20x": OutlineCRF(sxy=20, srgb=20, compat=10),
}


def score(ckpt: dict, slices, variants: dict) -> dict:
    """variant -> {patient: Dice} of the delivered masks, then of each of `variants`; seconds per slice in
    "_seconds"."""
    native = native_logits(logits_of(ckpt, slices))
    threshold = float(ckpt["threshold"])
    predicted = native > np.float32(np.log(threshold / (1 - threshold)))
    prob = sigmoid(native)
    rule = delivered(ckpt)
    kept = np.array(predicted, copy=True)
    for pid in dict.fromkeys(slices.patients.tolist()):
        sel = slices.patients == pid
        kept[sel] = rule.apply(predicted[sel], np.where(predicted[sel], prob[sel], np.float32(0)))
    masks = {"none": kept}
    seconds: dict[str, float] = {}
    for name, outline in variants.items():
        start = time.perf_counter()
        masks[name] = outline.redraw(kept, prob, slices.images)
        seconds[name] = (time.perf_counter() - start) / max(int(kept.any(axis=(1, 2)).sum()), 1)
    out: dict = {}
    for name, m in masks.items():
        summary = summarize(confusion_counts(m, slices.masks), slices.patients)
        out[name] = {r["patient"]: r["dice"] for r in summary["per_patient"]}
    out["_seconds"] = seconds
    return out


def terms(outline: OutlineCRF) -> str:
    appearance = f" + appearance (sxy {outline.sxy:g}, srgb {outline.srgb:g}, compat {outline.compat:g})"
    return "smoothness" + (appearance if outline.compat else "")


def main() -> None:
    parser = finished_runs_parser()
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which of the CRF variants to run")
    args = parser.parse_args()
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    runs = scored_runs(
        args.runs, args.data, args.exclude, lambda ckpt, slices: score(ckpt, slices, variants), args.parts.split(",")
    )
    seconds = {label: run["dice"].pop("_seconds") for label, run in runs.items()}
    names = list(next(iter(runs.values()))["dice"])
    per_slice = {n: float(np.median([s[n] for s in seconds.values()])) for n in variants}
    lines = [
        "# A dense CRF redraws the outlines (finished runs; patients of --exclude's test split left out)",
        "",
        "Mean per-patient Dice: `none` the delivered masks (stored size rule, then the mean-probability floor 0.9), "
        "the others those masks redrawn by a 2-D dense CRF within 8 px; [missed / lost] — lost: found by "
        "`none`, missed by the variant.",
        "",
        *rule_table_head(names),
    ]
    lines += rule_rows(runs, names, found_by="none")
    pooled = {n: pooled_against(runs, n, "none") for n in variants}
    lines += [
        "",
        "Against `none`, pooled over patients (each patient's runs averaged first; points):",
        "",
        *pooled_table(
            pooled,
            "variant",
            {
                "terms": {n: terms(VARIANTS[n]) for n in pooled},
                "CRF s per slice with a mask (median of runs)": {n: f"{per_slice[n]:.3f}" for n in pooled},
            },
        ),
    ]
    write_report(args.out, "crf_outline", {"runs": runs, "pooled": pooled, "seconds": seconds}, lines)


if __name__ == "__main__":
    main()

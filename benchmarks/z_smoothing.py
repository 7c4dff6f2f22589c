"""Smoothing each patient's probabilities along the slice axis before the threshold, on finished runs.

usage: .venv/bin/python benchmarks/z_smoothing.py --data DATA --out OUT [--exclude SPLIT_JSON] [--parts val,test]
       [--kernels 0.15,0.25,0.3333] LABEL=RUN_DIR [...]

A glioma runs through neighbouring slices: a false positive alone in its slice, or a one-slice gap in a tumor, is
what smoothing along z changes. For each kernel a: p'_k = a p_(k-1) + (1 - 2a) p_k + a p_(k+1) within a patient
(slices in acquisition order; the first and last slice renormalized over the neighbours they have), then the
run's threshold and its stored post-processing. Rows per run: none (raw masks), stored (the run's best.pt rule),
z-a (smoothing, then the stored rule). "lost": patients the stored rule finds (Dice >= 0.05) that the variant misses.
Patients in --exclude's test split are never scored. Writes OUT/z_smoothing.json and OUT/z_smoothing.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from report_recipe import logits_of, rule_rows, scored_runs, write_markdown

from lggdeploy.common.files import write_json_atomic
from lggdeploy.common.machine import machine_info
from lggdeploy.metrics import confusion_counts, summarize
from lggdeploy.postprocess import PostProcess


def smooth_along_slices(prob: np.ndarray, a: float) -> np.ndarray:
    """(slices, H, W) probabilities of one patient, smoothed along the slice axis with the kernel (a, 1 - 2a, a)."""
    if a == 0 or len(prob) < 2:
        return prob
    total = (1 - 2 * a) * prob
    weight = np.full(len(prob), 1 - 2 * a)
    total[1:] += a * prob[:-1]
    weight[1:] += a
    total[:-1] += a * prob[1:]
    weight[:-1] += a
    return total / weight[:, None, None]


def score_run(ckpt: dict, slices, kernels: list[float]) -> dict:
    logits = logits_of(ckpt, slices)  # (slices, H, W) at the model's resolution (256: native)
    threshold = float(ckpt["threshold"])
    prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    base = PostProcess.from_json(ckpt.get("postprocess"))
    variants: dict[str, np.ndarray] = {"none": prob > threshold}
    variants["stored"] = np.array(variants["none"])
    for a in kernels:
        variants[f"z-{a:g}"] = np.zeros_like(variants["none"])
    for pid in dict.fromkeys(slices.patients.tolist()):
        sel = slices.patients == pid
        variants["stored"][sel] = base.apply(variants["none"][sel])
        for a in kernels:
            variants[f"z-{a:g}"][sel] = base.apply(smooth_along_slices(prob[sel], a) > threshold)
    out = {}
    for name, masks in variants.items():
        summary = summarize(confusion_counts(masks, slices.masks), slices.patients)
        out[name] = {r["patient"]: r["dice"] for r in summary["per_patient"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--exclude", type=Path, help="a split file whose test patients are never scored")
    parser.add_argument("--parts", default="val,test", help="which of the run's split parts to score")
    parser.add_argument("--kernels", default="0.15,0.25,0.3333")
    args = parser.parse_args()
    kernels = [float(v) for v in args.kernels.split(",")]
    runs = scored_runs(
        args.runs, args.data, args.exclude, lambda ckpt, slices: score_run(ckpt, slices, kernels), args.parts.split(",")
    )
    names = list(next(iter(runs.values()))["dice"])
    lines = [
        "# Smoothing along the slice axis on finished runs (patients of --exclude's test split left out)",
        "",
        "Mean per-patient Dice; [missed / lost] — lost: found by the stored rule, missed by the variant.",
        "",
        "| run | model | n | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for model in sorted({r["model"] for r in runs.values()}):
        of_model = {label: r for label, r in runs.items() if r["model"] == model}
        lines += rule_rows(of_model, names, found_by="stored", digits=4, model_column=True)
    machine = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "z_smoothing.json", {"runs": runs, "kernels": kernels, "machine": machine})
    write_markdown(args.out / "z_smoothing.md", lines, machine)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

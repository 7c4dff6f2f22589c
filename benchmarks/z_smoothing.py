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

import numpy as np
from report_recipe import finished_runs_parser, rule_rows, rule_table_head, score_rules, scored_runs, write_markdown

from lggdeploy.common.files import write_json_atomic
from lggdeploy.common.machine import machine_info
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


def rules(kernels: list[float]):
    """none, the stored rule, and each kernel's smoothing followed by the stored rule."""

    def of(base: PostProcess, threshold: float) -> dict:
        out = {"none": lambda v, p: np.asarray(v, bool), "stored": lambda v, p: base.apply(v)}
        for a in kernels:
            out[f"z-{a:g}"] = lambda v, p, a=a: base.apply(smooth_along_slices(p, a) > threshold)
        return out

    return of


def main() -> None:
    parser = finished_runs_parser()
    parser.add_argument("--kernels", default="0.15,0.25,0.3333")
    args = parser.parse_args()
    kernels = [float(v) for v in args.kernels.split(",")]
    runs = scored_runs(
        args.runs,
        args.data,
        args.exclude,
        lambda ckpt, slices: score_rules(ckpt, slices, rules(kernels)),
        args.parts.split(","),
    )
    names = list(next(iter(runs.values()))["dice"])
    lines = [
        "# Smoothing along the slice axis on finished runs (patients of --exclude's test split left out)",
        "",
        "Mean per-patient Dice; [missed / lost] — lost: found by the stored rule, missed by the variant.",
        "",
        *rule_table_head(names, model_column=True),
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

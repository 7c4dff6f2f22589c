"""Which 3-D component is the tumor? Component rules side by side on finished runs, never on excluded patients.

usage: .venv/bin/python benchmarks/component_rules.py --data DATA --out OUT [--exclude SPLIT_JSON] [--parts val,test]
       LABEL=RUN_DIR [...]

A low-grade glioma is one lesion, so keeping only the component that is the tumor removes every false positive apart
from it — when the rule picks the right component. The size rule training stores never removes the largest; keeping
the largest only deletes the tumor the model found when a false positive outgrows it (benchmarks/results/postprocess/).
This report asks whether ranking components by the model's own confidence picks the tumor more often than size does:

- none; stored (the run's best.pt rule); largest (by voxels);
- mass: the component with the largest sum of foreground probabilities only;
- mass-F: every component whose probability mass is under F x the largest mass removed (F = 0.5, 0.2, 0.1), on top
  of the stored rule;
- size-F: the same by voxels (the two-part rule `--postprocess N,F`);
- conf-Q: every component whose mean foreground probability is under Q removed (Q = 0.85, 0.9), never the one with
  the highest mean, on top of the stored rule (the library's `PostProcess(..., min_mean_probability=Q)`, what
  training's second step stores); conf-top: only the component with the highest mean kept.

Every run is scored on its val and test patients (--parts) minus those of `--exclude`'s test split (the hold-out patients no
choice may look at). Per rule: mean per-patient Dice, patients missed, and "lost": patients found without
post-processing (Dice >= 0.05) that the rule turns into a miss — the failure that keeps a rule out of the defaults.
Writes OUT/component_rules.json and OUT/component_rules.md.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from report_recipe import (
    finished_runs_parser,
    pooled_against,
    pooled_table,
    rule_rows,
    rule_table_head,
    score_rules,
    scored_runs,
    write_report,
)

from lggdeploy.postprocess import LARGEST, PostProcess, connected_components

FRACTIONS = (0.5, 0.2, 0.1)
CONFIDENCE_FLOORS = (0.85, 0.9)


def keep_by_mass(volume: np.ndarray, prob: np.ndarray, base: PostProcess, fraction: float | None) -> np.ndarray:
    """The stored rule, then: fraction None keeps the single component with the largest probability mass; else every
    component under `fraction` x the top mass is removed. (By voxels these are the library's own rules.)"""
    volume = base.apply(volume) if base.active and base.min_component_voxels != LARGEST else np.asarray(volume, bool)
    if not volume.any():
        return volume
    labels, ids, _ = connected_components(volume)
    mass = np.bincount(labels.ravel(), prob.ravel())[ids]
    keep = ids[[int(np.argmax(mass))]] if fraction is None else ids[mass >= fraction * mass.max()]
    return np.isin(labels, keep)


def keep_most_confident(volume: np.ndarray, prob: np.ndarray, base: PostProcess) -> np.ndarray:
    """The stored rule, then only the component with the highest mean foreground probability."""
    volume = base.apply(volume) if base.active and base.min_component_voxels != LARGEST else np.asarray(volume, bool)
    if not volume.any():
        return volume
    labels, ids, sizes = connected_components(volume)
    confidence = np.bincount(labels.ravel(), prob.ravel())[ids] / sizes
    return np.isin(labels, ids[confidence == confidence.max()])


def rules(base: PostProcess, threshold: float) -> dict:
    size = max(base.min_component_voxels, 0)  # the stored rule's absolute size (0 when it stores none or largest)
    out = {
        "none": lambda v, p: np.asarray(v, bool),
        "stored": lambda v, p: base.apply(v),
        "largest": lambda v, p: PostProcess(LARGEST).apply(v),
        "mass": lambda v, p: keep_by_mass(v, p, PostProcess(), None),
    }
    for f in FRACTIONS:
        out[f"mass-{f:g}"] = lambda v, p, f=f: keep_by_mass(v, p, base, f)
        out[f"size-{f:g}"] = lambda v, p, f=f: PostProcess(size, f).apply(v)  # the two-part rule, `--postprocess N,F`
    floored = base if base.min_component_voxels != LARGEST else PostProcess()
    for q in CONFIDENCE_FLOORS:  # the library's second step, on top of the stored rule
        out[f"conf-{q:g}"] = lambda v, p, q=q: replace(floored, min_mean_probability=q).apply(v, p)
    out["conf-top"] = lambda v, p: keep_most_confident(v, p, base)
    return out


def main() -> None:
    args = finished_runs_parser().parse_args()
    runs = scored_runs(
        args.runs, args.data, args.exclude, lambda ckpt, slices: score_rules(ckpt, slices, rules), args.parts.split(",")
    )
    names = list(next(iter(runs.values()))["dice"])
    lines = [
        "# Component rules on finished runs (patients of --exclude's test split left out)",
        "",
        "Mean per-patient Dice; [missed / lost] — lost: found without post-processing, missed with the rule.",
        "",
        *rule_table_head(names),
    ]
    lines += rule_rows(runs, names, found_by="none")
    pooled = {n: pooled_against(runs, n, "stored") for n in names if n != "stored"}
    lines += [
        "",
        "Against the stored rule, pooled over patients (each patient's runs averaged first; points; lost: found by the "
        "stored rule, missed by this one):",
        "",
        *pooled_table(pooled, "rule"),
    ]
    write_report(args.out, "component_rules", {"runs": runs, "pooled": pooled}, lines)


if __name__ == "__main__":
    main()

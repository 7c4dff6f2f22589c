"""A dense CRF that redraws the outlines of the delivered masks, on finished runs (post-processing, no training).

usage: .venv/bin/python benchmarks/crf_outline.py --data DATA --out OUT [--exclude SPLIT_JSON] [--parts val,test]
       [--variants b10,...] LABEL=RUN_DIR [...]

Needs `pydensecrf2` (pip install pydensecrf2; not a dependency of lggdeploy). The delivered post-processing (the
run's stored size rule, then the mean-probability floor 0.9) decides which tumors exist; then, slice by slice, a 2-D
fully connected CRF (Kraehenbuehl & Koltun 2011) on the crop around the slice's kept mask dilated by MARGIN px redraws
the outline, and its labels are kept only inside that dilation: an outline moves by at most MARGIN px, no component
is added or deleted elsewhere. Unary: -log of the network's probability; image: the three sequences after the model's
slice normalization, clipped to [0, 1], x 255. Variants: VARIANTS below (--variants: some of them, for the guard). Scored on each run's val and test patients
(--parts) minus the test patients of --exclude; pooled per patient against "none". The plan and its bar:
benchmarks/results/crf-outline-zen4/plan.md. Writes OUT/crf_outline.json and OUT/crf_outline.md.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax
from report_recipe import (
    finished_runs_parser,
    logits_of,
    pooled_against,
    pooled_table,
    rule_rows,
    rule_table_head,
    scored_runs,
    write_report,
)
from scipy import ndimage

from lggdeploy.data.transforms import native_logits, sigmoid, to_unit
from lggdeploy.metrics import confusion_counts, summarize
from lggdeploy.models.checkpoint import normalization_of
from lggdeploy.postprocess import LARGEST, PostProcess

FLOOR = 0.9  # the mean-probability floor training stores as its second step
MARGIN = 8  # px: one logit cell of PSPNet's output stride
ITERATIONS = 5
SMOOTH = {"sxy": 3, "compat": 3}
VARIANTS: dict[str, dict | None] = {
    "g": None,
    "b10": {"sxy": 10, "srgb": 10, "compat": 5},
    "b20": {"sxy": 20, "srgb": 20, "compat": 5},
    "b20x": {"sxy": 20, "srgb": 20, "compat": 10},
}


def delivered(ckpt: dict) -> PostProcess:
    """The run's stored rule with training's second step on top (a stored "largest" keeps no size step)."""
    stored = PostProcess.from_json(ckpt.get("postprocess"))
    base = stored if stored.min_component_voxels != LARGEST else PostProcess()
    return replace(base, min_mean_probability=FLOOR)


def crf_image(images: np.ndarray, ckpt: dict) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, H, W, 3) uint8: the sequences after the model's slice normalization."""
    x01 = to_unit(images)
    norm = normalization_of(ckpt)
    if norm.mode == "slice":
        x01 = x01 * norm.slice_factors(x01)
    return np.ascontiguousarray((np.clip(x01, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1))


def redraw(mask: np.ndarray, prob: np.ndarray, image: np.ndarray, appearance: dict | None) -> np.ndarray:
    """One slice's kept mask, its outline redrawn by the CRF within MARGIN px of it."""
    if not mask.any():
        return mask
    zone = ndimage.binary_dilation(mask, iterations=MARGIN)
    rows, cols = np.nonzero(zone)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    p = np.clip(prob[r0:r1, c0:c1], 1e-5, 1 - 1e-5).astype(np.float32)
    h, w = p.shape
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(unary_from_softmax(np.stack([1 - p, p])))
    crf.addPairwiseGaussian(**SMOOTH)
    if appearance is not None:
        crf.addPairwiseBilateral(rgbim=np.ascontiguousarray(image[r0:r1, c0:c1]), **appearance)
    q = np.asarray(crf.inference(ITERATIONS)).reshape(2, h, w)
    out = np.zeros_like(mask)
    out[r0:r1, c0:c1] = q[1] > q[0]
    return out & zone


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
    images = crf_image(slices.images, ckpt)
    masks = {"none": kept}
    seconds: dict[str, float] = {}
    for name, appearance in variants.items():
        start = time.perf_counter()
        masks[name] = np.stack([redraw(m, p, im, appearance) for m, p, im in zip(kept, prob, images, strict=True)])
        seconds[name] = (time.perf_counter() - start) / max(int(kept.any(axis=(1, 2)).sum()), 1)
    out: dict = {}
    for name, m in masks.items():
        summary = summarize(confusion_counts(m, slices.masks), slices.patients)
        out[name] = {r["patient"]: r["dice"] for r in summary["per_patient"]}
    out["_seconds"] = seconds
    return out


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
        f"the others those masks redrawn by a 2-D dense CRF within {MARGIN} px; [missed / lost] — lost: found by "
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
                "terms": {n: "smoothness" + (f" + appearance {VARIANTS[n]}" if VARIANTS[n] else "") for n in pooled},
                "CRF s per slice with a mask (median of runs)": {n: f"{per_slice[n]:.3f}" for n in pooled},
            },
        ),
    ]
    write_report(args.out, "crf_outline", {"runs": runs, "pooled": pooled, "seconds": seconds}, lines)


if __name__ == "__main__":
    main()

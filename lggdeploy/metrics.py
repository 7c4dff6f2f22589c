"""Segmentation metrics, numpy only (the edge runtime and bench use them without torch).

Everything is computed from per-slice confusion counts (TP, FP, FN, TN), so per-patient, global and
per-slice figures all come from one pass over the predictions.

Empty-mask conventions (also in the README):
- Dice = 2TP / (2TP + FP + FN) and IoU = TP / (TP + FP + FN); when ground truth and prediction are both
  empty (the denominator is 0) the score is 1. An empty ground truth with any predicted pixel scores 0.
- per-patient Dice pools all slices of the patient into one volume (Buda et al. 2019). Every LGG patient
  has tumor, so the empty-empty case does not arise there on the real data.
- "per-slice mean Dice (study style)" averages per-slice Dice over all slices, empty-empty slices scoring 1;
  it rewards the many tumor-free slices and is not comparable with per-patient Dice.
- "tumor-slice Dice" averages per-slice Dice over slices whose ground truth has tumor.
- "false-positive slice rate" is the fraction of tumor-free slices with any predicted tumor pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def confusion_counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N, H, W) bool masks -> (N, 4) int64 counts [TP, FP, FN, TN] per slice."""
    pred = np.asarray(pred, bool).reshape(len(pred), -1)
    truth = np.asarray(truth, bool).reshape(len(truth), -1)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {truth.shape}")
    tp = np.count_nonzero(pred & truth, axis=1)
    fp = np.count_nonzero(pred & ~truth, axis=1)
    fn = np.count_nonzero(~pred & truth, axis=1)
    tn = pred.shape[1] - tp - fp - fn
    return np.stack([tp, fp, fn, tn], axis=1).astype(np.int64)


def dice_from_counts(tp, fp, fn) -> np.ndarray:
    tp, fp, fn = (np.asarray(v, np.float64) for v in (tp, fp, fn))
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0)


def iou_from_counts(tp, fp, fn) -> np.ndarray:
    tp, fp, fn = (np.asarray(v, np.float64) for v in (tp, fp, fn))
    den = tp + fp + fn
    return np.where(den > 0, tp / np.maximum(den, 1), 1.0)


@dataclass
class SegmentationScores:
    """Accumulates per-slice confusion counts, then summarizes per patient and overall."""

    counts: list[np.ndarray] = field(default_factory=list)
    patients: list[np.ndarray] = field(default_factory=list)

    def add(self, pred: np.ndarray, truth: np.ndarray, patient_ids) -> None:
        self.counts.append(confusion_counts(pred, truth))
        self.patients.append(np.asarray(patient_ids))

    def summary(self) -> dict:
        if not self.counts:
            raise ValueError("no predictions were scored")
        return summarize(np.concatenate(self.counts), np.concatenate(self.patients))


def summarize(counts: np.ndarray, patients: np.ndarray) -> dict:
    """Per-patient rows plus aggregates, from (N, 4) per-slice counts and the patient id of each slice."""
    counts = np.asarray(counts, np.int64)
    patients = np.asarray(patients)
    tp, fp, fn, tn = counts.T
    slice_dice = dice_from_counts(tp, fp, fn)
    has_tumor = (tp + fn) > 0
    predicted = (tp + fp) > 0

    rows = []
    for pid in dict.fromkeys(patients.tolist()):
        sel = patients == pid
        ptp, pfp, pfn, ptn = counts[sel].sum(axis=0)
        rows.append(
            {
                "patient": pid,
                "slices": int(sel.sum()),
                "tumor_slices": int(has_tumor[sel].sum()),
                "dice": float(dice_from_counts(ptp, pfp, pfn)),
                "iou": float(iou_from_counts(ptp, pfp, pfn)),
                "accuracy": float((ptp + ptn) / (ptp + pfp + pfn + ptn)),
                "tumor_pixels": int(ptp + pfn),
                "predicted_pixels": int(ptp + pfp),
                "detected": bool(ptp > 0) if ptp + pfn > 0 else None,  # any overlap with the tumor (None: no tumor)
            }
        )
    patient_dice = np.array([r["dice"] for r in rows])
    patient_iou = np.array([r["iou"] for r in rows])
    gtp, gfp, gfn, gtn = counts.sum(axis=0)
    empty = ~has_tumor
    with_tumor = [r for r in rows if r["detected"] is not None]
    aggregates = {
        "patients": len(rows),
        "patients_with_tumor": len(with_tumor),
        "patients_missed": sum(1 for r in with_tumor if not r["detected"]),
        "slices": int(len(counts)),
        "mean_patient_dice": float(patient_dice.mean()),
        "median_patient_dice": float(np.median(patient_dice)),
        "mean_patient_iou": float(patient_iou.mean()),
        "global_dice": float(dice_from_counts(gtp, gfp, gfn)),
        "global_iou": float(iou_from_counts(gtp, gfp, gfn)),
        "pixel_accuracy": float((gtp + gtn) / counts.sum()),
        "tumor_slice_dice": float(slice_dice[has_tumor].mean()) if has_tumor.any() else None,
        "false_positive_slice_rate": float(predicted[empty].mean()) if empty.any() else None,
        "slice_mean_dice_study_style": float(slice_dice.mean()),
    }
    return {"aggregates": aggregates, "per_patient": rows}


METRIC_LABELS = {
    "mean_patient_dice": "mean per-patient Dice (primary)",
    "patients_missed": "patients missed (tumor, no overlap with the prediction)",
    "median_patient_dice": "median per-patient Dice",
    "mean_patient_dice_without_postprocess": "mean per-patient Dice without the stored post-processing",
    "patients_missed_without_postprocess": "patients missed without the stored post-processing",
    "mean_patient_dice_largest_component": "mean per-patient Dice, largest 3-D component kept (Buda et al.)",
    "mean_patient_iou": "mean per-patient IoU",
    "global_dice": "global Dice (all pixels pooled)",
    "global_iou": "global IoU",
    "pixel_accuracy": "pixel accuracy",
    "tumor_slice_dice": "tumor-slice Dice (mean over slices with tumor)",
    "false_positive_slice_rate": "false-positive slice rate (tumor-free slices)",
    "slice_mean_dice_study_style": "per-slice mean Dice, empty-empty = 1 (study style)",
}

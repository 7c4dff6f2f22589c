"""`lggdeploy predict`: masks, overlays and per-patient volumes for a TIFF, a patient folder or a kaggle_3m root.

Torch-free (runs on the edge runtime). One bad file does not stop the others: it is reported at the end.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lggdeploy.common.errors import DataError
from lggdeploy.common.files import (
    atomic_path,
    check_can_create,
    ensure_folder,
    remove_stale_temporaries,
    write_text_atomic,
)
from lggdeploy.common.progress import progress_bar
from lggdeploy.data.kaggle import read_image, read_mask
from lggdeploy.data.overlay import overlay
from lggdeploy.metrics import dice_from_counts

IMAGE = re.compile(r"^(?P<patient>.+)_(?P<number>\d+)\.tif$")
MASK = re.compile(r"^(?P<patient>.+)_(?P<number>\d+)_mask\.tif$")


@dataclass
class PredictReport:
    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    written: int = 0


def collect_inputs(source: str | os.PathLike) -> dict[str, list[Path]]:
    """patient -> image files (masks excluded), sorted by slice number."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source} does not exist: give a slice .tif, a patient folder or a kaggle_3m folder")
    images = [p for p in _tif_files(source) if IMAGE.match(p.name) and not p.name.endswith("_mask.tif")]
    if not images:
        raise DataError(f"no slice images (<PATIENT>_<N>.tif) found in {source}")
    patients: dict[str, list[Path]] = {}
    for path in images:
        patients.setdefault(IMAGE.match(path.name)["patient"], []).append(path)
    return {
        pid: sorted(paths, key=lambda p: int(IMAGE.match(p.name)["number"])) for pid, paths in sorted(patients.items())
    }


def unrecognized(source: str | os.PathLike) -> list[Path]:
    """.tif files beside the slices that are neither a slice (<PATIENT>_<N>.tif) nor a mask: said, not skipped silently."""
    source = Path(source)
    if source.is_file():
        return []
    return sorted(p for p in _tif_files(source) if not IMAGE.match(p.name) and not MASK.match(p.name))


def _tif_files(source: Path) -> list[Path]:
    """The .tif files predict looks at: the file itself, a patient folder's, or (else) a kaggle_3m folder's patients'."""
    if source.is_file():
        return [source]
    return list(source.glob("*.tif")) or list(source.glob("*/*.tif"))


def _read_patient(paths: list[Path], report: PredictReport, advance) -> tuple[list, list, list]:
    """A patient's readable slices (a slice that cannot be read is listed and skipped) and their ground truth where
    a readable mask lies beside them."""
    kept, images, truths = [], [], []
    for path in paths:
        advance()
        try:
            image = read_image(path)
        except DataError as exc:  # no image, no prediction: listed, and the slice's outputs are not written
            report.problems.append(str(exc))
            continue
        truth = None
        mask_path = path.with_name(path.stem + "_mask.tif")
        if mask_path.is_file():
            try:
                truth = read_mask(mask_path)
            except DataError as exc:  # the slice is still predicted; it only has no ground truth
                report.problems.append(f"{exc} (slice {path.name} predicted without ground truth)")
        kept.append(path)
        images.append(image)
        truths.append(truth)
    return kept, images, truths


def _write_patient(folder: Path, kept, images, masks, truths, report: PredictReport) -> tuple[int, int, int]:
    """Each slice's mask (TIFF) and overlay (PNG), written atomically; the patient's TP, FP, FN against its truth."""
    import tifffile
    from PIL import Image

    folder = ensure_folder(folder)
    tp = fp = fn = 0
    for path, image, mask, truth in zip(kept, images, masks, truths, strict=True):
        with atomic_path(folder / f"{path.stem}_pred_mask.tif") as tmp:
            tifffile.imwrite(tmp, mask.astype(np.uint8) * 255)
        with atomic_path(folder / f"{path.stem}_overlay.png") as tmp:
            Image.fromarray(overlay(image, mask, truth)).save(tmp, format="PNG")
        report.written += 1
        if truth is not None:
            tp += int((mask & truth).sum())
            fp += int((mask & ~truth).sum())
            fn += int((~mask & truth).sum())
    return tp, fp, fn


def predict_paths(
    segmenter,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    largest_component: bool = False,
    spacing_mm: float | None = None,
) -> PredictReport:
    """Every patient under `source`: masks and overlays per slice, one row per patient (patients.csv)."""
    check_can_create(out_dir)  # before any work: an unwritable --out is one clear line, and nothing is created yet
    report = PredictReport()
    patients = collect_inputs(source)
    report.problems += [f"{p}: not named <PATIENT>_<N>.tif; not predicted (rename it)" for p in unrecognized(source)]
    out_dir = ensure_folder(out_dir)  # the input is known good: now the folder
    for folder in [out_dir, *(out_dir / pid for pid in patients)]:
        remove_stale_temporaries(folder)  # what a killed run (SIGKILL) left half-written
    with progress_bar() as bar:
        task = bar.add_task("predicting", total=sum(len(v) for v in patients.values()), info="")
        for pid, paths in patients.items():
            kept, images, truths = _read_patient(paths, report, lambda: bar.advance(task))
            if not images:
                continue
            prediction = segmenter.predict(np.stack(images), largest_component=largest_component)
            counts = _write_patient(out_dir / pid, kept, images, prediction.masks, truths, report)
            pixels = prediction.masks.reshape(len(kept), -1).sum(axis=1)
            has_truth = all(t is not None for t in truths)
            row = {
                "patient": pid,
                "slices": len(kept),
                "tumor_slices": int((pixels > 0).sum()),
                "tumor_pixels": int(pixels.sum()),
                "tumor_pixels_per_slice": " ".join(str(int(p)) for p in pixels),
                "tumor_area_mm2": round(float(pixels.sum()) * spacing_mm**2, 2) if spacing_mm else None,
                "dice": round(float(dice_from_counts(*counts)), 4) if has_truth else None,
            }
            report.rows.append(row)
    if report.rows:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(report.rows[0]))
        writer.writeheader()
        writer.writerows(report.rows)
        write_text_atomic(out_dir / "patients.csv", buffer.getvalue())
    return report

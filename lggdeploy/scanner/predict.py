"""`lggdeploy predict ENGINE DICOM_OR_NIFTI`: every case's SEG, NIfTI mask, overlays, case.json, and cases.csv.

Two phases so that the caller can show the plan before the work: `plan` (case.py: what was found, which series plays
which role and why) and `predict_cases` (segment each case, write its outputs). Every input problem is found in the
first phase, before anything is written; every file of the second is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from lggdeploy.common.errors import LggError
from lggdeploy.common.files import check_can_create, ensure_folder, remove_stale_temporaries, write_text_atomic
from lggdeploy.scanner.case import Case, RoleChoice, plan, segment_case
from lggdeploy.scanner.intensity import MODES
from lggdeploy.scanner.outputs import case_row, write_case

logger = logging.getLogger(__name__)


def check_intensity(mode: str) -> str:
    if mode not in MODES:
        raise LggError(f"unknown --intensity {mode!r}: choose {', '.join(MODES)}")
    return mode


def prepare(source, out_dir: str | os.PathLike, choice: RoleChoice, intensity: str = "auto") -> list[Case]:
    """Phase one: the options and the output folder checked, then the input read and the roles chosen — every
    problem one line before anything is written."""
    check_intensity(intensity)
    check_can_create(out_dir)
    return plan(source, choice)


def predict_cases(
    segmenter,
    cases: list[Case],
    out_dir: str | os.PathLike,
    resample: bool = False,
    intensity: str = "auto",
    overlays: bool = True,
) -> list[dict]:
    """Segment every planned case with `segmenter` and write its outputs under out_dir/<case>/; returns case.json's
    records (also summarised in out_dir/cases.csv)."""
    check_intensity(intensity)
    check_can_create(out_dir)  # an unwritable --out is one line before any work
    out = ensure_folder(out_dir)
    records = []
    for case in cases:
        remove_stale_temporaries(out / case.name)  # what a killed run left half-written
        result = segment_case(segmenter, case, resample, intensity)
        record = write_case(result, segmenter.manifest, out, resample, overlays)
        logger.info(
            f"{case.name}: {record['tumor']['slices']} of {len(result.masks)} slices with tumor, "
            f"{record['tumor']['volume_ml']:.2f} ml"
        )
        records.append(record)
    buffer = io.StringIO()
    rows = [case_row(r) for r in records]
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(Path(out) / "cases.csv", buffer.getvalue())
    return records

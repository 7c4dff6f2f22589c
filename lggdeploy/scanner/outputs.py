"""What a scanner case's prediction leaves: a DICOM SEG a PACS overlays on the FLAIR series, a NIfTI mask with FLAIR's
affine, overlays, case.json and a row of cases.csv. Every file is written to a temporary name and renamed.

The SEG (highdicom): binary, one segment "tumor" — segmented property category "Morphologically abnormal structure"
(SCT 49755003), type "Neoplasm" (SCT 108369006), algorithm type AUTOMATIC — whose frames reference the FLAIR series'
instances; the algorithm identification names lggdeploy and its version, the preset, and carries the engine's sha256
and the manifest's as parameters. Patient and study attributes are copied by highdicom from the source series, as the
standard requires; nothing of them is logged.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from lggdeploy.common.files import atomic_path, ensure_folder, write_json_atomic
from lggdeploy.scanner.case import CaseResult
from lggdeploy.scanner.series import FLAIR, ROLE_NAMES

logger = logging.getLogger(__name__)

SEG_FILE, NIFTI_FILE, CASE_FILE = "tumor-seg.dcm", "tumor-mask.nii.gz", "case.json"


def algorithm(manifest: dict) -> dict[str, str]:
    """What identifies the algorithm in every output: lggdeploy's version, the preset, the engine's and manifest's sha256."""
    from lggdeploy import __version__

    record = json.dumps(manifest.to_json() if hasattr(manifest, "to_json") else dict(manifest), sort_keys=True)
    return {
        "lggdeploy_version": __version__,
        "preset": str(manifest["model"]["name"]),
        "engine_sha256": str(manifest["sha256"]),
        "manifest_sha256": hashlib.sha256(record.encode()).hexdigest(),
        "backend": f"{manifest['backend']} {manifest['precision']}",
        "threshold": f"{float(manifest['threshold']):g}",
    }


def write_seg(result: CaseResult, identity: dict[str, str], folder: Path) -> Path | None:
    """The DICOM SEG of a DICOM case (None for NIfTI input: there are no instances to reference)."""
    flair = result.case.flair
    if flair.origin != "dicom":
        return None
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="tumor",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="lggdeploy",
            family=codes.DCM.ArtificialIntelligence,
            version=identity["lggdeploy_version"],
            source="lggdeploy (low-grade glioma segmentation)",
            parameters={k: v for k, v in identity.items() if k != "lggdeploy_version"},
        ),
    )
    mask = flair.volume.with_array(result.masks.astype(np.uint8))
    seg = hd.seg.Segmentation(
        source_images=flair.datasets,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=_seg_series_number(flair),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="lggdeploy",
        manufacturer_model_name=identity["preset"],
        software_versions=identity["lggdeploy_version"],
        device_serial_number=identity["engine_sha256"][:16],
        series_description=f"lggdeploy tumor ({identity['preset']})"[:64],
        omit_empty_frames=False,
    )
    target = folder / SEG_FILE
    with atomic_path(target) as tmp:
        seg.save_as(tmp)
    return target


def _seg_series_number(flair) -> int:
    try:
        return 1000 + int(flair.number)
    except ValueError:
        return 1000


def write_nifti_mask(result: CaseResult, folder: Path) -> Path:
    """The mask as NIfTI with FLAIR's affine: the input file's own layout and affine for NIfTI input; for DICOM, the
    volume as dcm2niix lays one out (i = column, j = row, k = slice) with the affine from the DICOM geometry."""
    import nibabel as nib

    flair = result.case.flair
    data = np.transpose(result.masks.astype(np.uint8), (2, 1, 0))  # (slice, row, col) -> (i = col, j = row, k)
    if flair.origin == "nifti":
        image = nib.Nifti1Image(np.ascontiguousarray(data), flair.nifti_affine)
    else:
        image = flair.volume.with_array(result.masks.astype(np.uint8)).permute_spatial_axes([2, 1, 0]).to_nibabel()
    image.set_data_dtype(np.uint8)
    image.header["descrip"] = b"lggdeploy tumor mask"
    target = folder / NIFTI_FILE
    with atomic_path(target) as tmp:
        tmp.write_bytes(gzip.compress(image.to_bytes(), mtime=0))  # .nii.gz: nibabel reads it by its name
    return target


def write_overlays(result: CaseResult, folder: Path) -> int:
    """One PNG per slice in the data set's layout (FLAIR in grey, the predicted contour in red)."""
    from PIL import Image

    from lggdeploy.data.overlay import overlay

    folder = ensure_folder(folder)
    for k, (image, mask) in enumerate(zip(result.model_input, result.model_masks), start=1):
        with atomic_path(folder / f"slice-{k:03d}.png") as tmp:
            Image.fromarray(overlay(image, mask, None)).save(tmp, format="PNG")
    return len(result.model_input)


def case_record(result: CaseResult, identity: dict[str, str], outputs: dict[str, str | None], resample: bool) -> dict:
    """case.json: which series played which role and why, how intensities were mapped, the geometry, the volume."""
    case, flair = result.case, result.case.flair.volume
    return {
        "case": case.name,
        "algorithm": identity,
        "sequences": {
            role: {
                "name": ROLE_NAMES[role],
                "series": s.label,
                "series_instance_uid": s.key if s.origin == "dicom" else None,
                "file": s.key if s.origin == "nifti" else None,
                "slices": s.slices,
                "why": s.role_reason,
                "intensity": result.ranges[role].to_json(),
            }
            for role, s in case.roles.items()
        },
        "filled_with_flair": [ROLE_NAMES[r] for r in case.missing],
        "resample": resample,
        "notes": case.notes,
        "intensity_mapping": "uint8 = clip(floor(256 (value - low) / (high - low + step)), 0, 255) per sequence "
        "(lggdeploy.scanner.intensity)",
        "grid": {
            "shape": [int(n) for n in flair.spatial_shape],
            "pixel_spacing_mm": [float(v) for v in flair.pixel_spacing],
            "slice_spacing_mm": float(flair.spacing_between_slices),
            "voxel_mm3": result.voxel_mm3,
            "orientation": "".join(str(getattr(c, "value", c)) for c in flair.get_closest_patient_orientation()),
        },
        "tumor": {
            "voxels": int(result.masks.sum()),
            "slices": int(result.masks.reshape(len(result.masks), -1).any(axis=1).sum()),
            "volume_ml": round(result.volume_ml, 3),
        },
        "outputs": outputs,
    }


def write_case(result: CaseResult, manifest: dict, out: Path, resample: bool, overlays: bool = True) -> dict:
    folder = ensure_folder(out / result.case.name)
    identity = algorithm(manifest)  # the manifest hashed once per case
    seg = write_seg(result, identity, folder)
    nifti = write_nifti_mask(result, folder)
    count = write_overlays(result, folder / "overlays") if overlays else 0
    outputs = {
        "seg": seg.name if seg else None,
        "nifti_mask": nifti.name,
        "overlays": f"overlays/ ({count} PNG)" if count else None,
    }
    record = case_record(result, identity, outputs, resample)
    write_json_atomic(folder / CASE_FILE, record)
    return record


def case_row(record: dict) -> dict:
    """cases.csv's row of a case."""
    sequences = record["sequences"]
    return {
        "case": record["case"],
        "flair": sequences[FLAIR]["series"],
        "filled_with_flair": " ".join(record["filled_with_flair"]),
        "slices": record["grid"]["shape"][0],
        "tumor_slices": record["tumor"]["slices"],
        "tumor_voxels": record["tumor"]["voxels"],
        "volume_ml": record["tumor"]["volume_ml"],
        "intensity": " ".join(f"{r}:{s['intensity']['source']}" for r, s in sequences.items()),
    }

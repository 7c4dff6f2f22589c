"""Reading scanner sequences: DICOM series (any file names, nested folders, several studies mixed) and NIfTI volumes.

Each sequence becomes a highdicom Volume (the array with its affine in the patient's LPS frame), built by highdicom
itself — slices sorted by ImagePositionPatient along the slice normal (never by InstanceNumber or file name),
RescaleSlope / RescaleIntercept applied, positions checked to be regularly spaced, enhanced (multi-frame) MR read
from its per-frame functional groups — or by nibabel for NIfTI (`Volume.from_nibabel`, the scl_slope / scl_inter
scaling applied). Compressed DICOM pixel data is decoded by pydicom's plugins: pylibjpeg-libjpeg (JPEG baseline,
extended, lossless), pylibjpeg-openjpeg (JPEG 2000), pylibjpeg-rle or pydicom's own (RLE), pyjpegls (JPEG-LS) — all in
the `lggdeploy[dicom]` extra; a syntax none of them decodes is one line.

Roles (FLAIR, pre- and post-contrast T1) are read from the headers (`guess_role`) or given by the user. Patient
identifying values (names, IDs, birth dates, accession numbers) are never put in a label or a message: a sequence is
named by its series number, description and a UID suffix.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lggdeploy.common.errors import DataError
from lggdeploy.scanner.intensity import CALIBRATION, WINDOW, DisplayRange, window_range

logger = logging.getLogger(__name__)

FLAIR, PRE, POST = "flair", "pre", "post"
ROLES = (PRE, FLAIR, POST)  # the data set's channel order: pre-contrast T1, FLAIR, post-contrast T1
ROLE_NAMES = {FLAIR: "FLAIR", PRE: "T1 pre-contrast", POST: "T1 post-contrast"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index of the files, not an image
MR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.4.1": "enhanced MR",
    "1.2.840.10008.5.1.4.1.1.4.4": "legacy converted enhanced MR",
}
MULTIFRAME_CLASSES = {"1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4"}


@dataclass(eq=False)  # compared by identity: a sequence is one object, its arrays are not compared
class Sequence:
    """One MR sequence as read: its volume (modality values, LPS affine), what it is and where it came from."""

    key: str  # SeriesInstanceUID, or the NIfTI file (and volume index of a 4-D file)
    number: str  # SeriesNumber ("" when none), or the NIfTI file name
    description: str  # SeriesDescription / ProtocolName, or the NIfTI file name
    study: str  # StudyInstanceUID ("" for NIfTI)
    volume: object  # highdicom.Volume
    display: DisplayRange | None  # the display range the sequence carries (window, cal_min/cal_max), if any
    datasets: list = field(default_factory=list)  # DICOM: the source instances (SEG references)
    role: str | None = None
    role_reason: str = ""
    origin: str = "dicom"  # "dicom" or "nifti"
    nifti_affine: np.ndarray | None = None  # NIfTI: the file's own affine (the output mask keeps it)
    nifti_header: object = None
    problem: str = ""  # why this series cannot be used as a volume (volume is None then): said if it is chosen
    step: float = 1.0  # one stored code in modality units (intensity.DisplayRange.step)

    @property
    def usable(self) -> bool:
        return self.volume is not None

    @property
    def slices(self) -> int:
        return int(self.volume.spatial_shape[0]) if self.volume is not None else len(self.datasets)

    @property
    def label(self) -> str:
        number = f"series {self.number}" if self.origin == "dicom" and self.number else self.number or "series"
        return f"{number} '{self.description}'" if self.description and self.description != self.number else number

    @property
    def uid_suffix(self) -> str:
        return "…" + self.key[-12:] if self.origin == "dicom" else ""


@dataclass
class Found:
    """What a DICOM folder or NIfTI input holds: MR sequences grouped by study, and what was not used (said)."""

    sequences: list[Sequence]
    ignored: list[str] = field(default_factory=list)  # e.g. "DICOMDIR (an index of the files)", "series 2: SR"

    def studies(self) -> dict[str, list[Sequence]]:
        grouped: dict[str, list[Sequence]] = defaultdict(list)
        for s in self.sequences:
            grouped[s.study].append(s)
        return dict(grouped)


def is_scanner_input(path: Path) -> bool:
    """A NIfTI file, or a folder holding NIfTI files or DICOM files (checked by the DICM preamble)."""
    if path.is_file():
        return path.name.endswith(NIFTI_SUFFIXES) or _is_dicom_file(path)
    if not path.is_dir():
        return False
    files = _files_under(path)
    if any(f.name.endswith(NIFTI_SUFFIXES) for f in files):
        return True
    return not any(f.suffix == ".tif" for f in files) and any(_is_dicom_file(f) for f in files[:200])


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_input(source: Path) -> Found:
    """Every MR sequence under `source` (DICOM files and folders, NIfTI files); what cannot be used is one line."""
    from lggdeploy.scanner import require_scanner_libraries

    require_scanner_libraries()
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source} does not exist: give a DICOM folder, a NIfTI file or a folder of NIfTI files")
    files = [source] if source.is_file() else _files_under(source)
    nifti = [f for f in files if f.name.endswith(NIFTI_SUFFIXES)]
    if nifti:
        others = [f for f in files if f not in nifti and not f.name.endswith((".json", ".txt", ".md"))]
        if others:
            raise DataError(
                f"{source} mixes NIfTI files with {len(others)} other file(s) ({others[0].name}…): give the NIfTI "
                "files on their own (or the DICOM folder)"
            )
        return Found([seq for f in nifti for seq in read_nifti(f)])
    return read_dicom_files(files, source)


def read_dicom_files(files: list[Path], source: Path) -> Found:
    import pydicom
    from pydicom.errors import InvalidDicomError

    not_dicom, by_series, ignored = [], defaultdict(list), []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            not_dicom.append(path)
            continue
        except Exception as exc:  # a truncated or damaged file: pydicom's own reason, one line
            raise DataError(
                f"{path}: not a readable DICOM file ({_first_line(exc)}); remove or replace it (a copy cut short?)"
            ) from None
        sop_class = str(getattr(ds, "SOPClassUID", "") or getattr(ds.file_meta, "MediaStorageSOPClassUID", ""))
        if sop_class == DICOMDIR_CLASS:
            ignored.append(f"{path.name}: a DICOMDIR (an index of the files, not an image)")
            continue
        if sop_class not in MR_CLASSES:
            what = f"{getattr(ds, 'Modality', '?')} object ({getattr(ds, 'SOPClassUID', 'no SOP class')})"
            ignored.append(f"{path.name}: a {what}, not an MR image")
            continue
        if not getattr(ds, "SeriesInstanceUID", None):
            raise DataError(
                f"{path}: an MR image without a SeriesInstanceUID, so it belongs to no series; fix its headers"
            )
        by_series[str(ds.SeriesInstanceUID)].append((path, ds))
    if not_dicom:
        raise DataError(
            f"{not_dicom[0]} is not a DICOM file"
            + (f" (nor are {len(not_dicom) - 1} more under {source})" if len(not_dicom) > 1 else "")
            + ": give a folder of DICOM files only (move other files out)"
        )
    sequences = []
    for uid, members in by_series.items():
        sequence = _dicom_sequence(uid, members, ignored)
        if sequence is not None:
            sequences.append(sequence)
    if not sequences:
        raise DataError(f"no MR image series found under {source}" + (f" ({'; '.join(ignored)})" if ignored else ""))
    return Found(sorted(sequences, key=_series_order), ignored)


def _series_order(s: Sequence):
    return (s.study, int(s.number) if s.number.isdigit() else 1 << 30, s.key)


def _first_line(exc: Exception) -> str:
    """An exception's message on one line (a multi-line one, e.g. every decoder plugin's reason, joined by '; ')."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return "; ".join(text) if text else type(exc).__name__


def _dicom_sequence(uid: str, members: list, ignored: list[str]) -> Sequence | None:
    """The series as a Sequence; one that cannot be a volume (one slice, mixed orientations, a gap) keeps the reason in
    `problem` — a study holds localizers and scouts that are never used — and it is raised only if the series is
    chosen for a role. Pixel data that cannot be decoded is a broken or unreadable file: one line at once."""
    paths = [p for p, _ in members]
    datasets = [ds for _, ds in members]
    first = datasets[0]
    name = _describe(first)
    label = f"series {getattr(first, 'SeriesNumber', '') or '?'} '{name}'"
    if any("LOCALIZER" in [str(v).upper() for v in getattr(ds, "ImageType", [])] for ds in datasets):
        ignored.append(f"{label}: a localizer")
        return None
    _decode_all(datasets, paths)
    volume, problem = None, ""
    try:
        volume = _dicom_volume(label, datasets, paths)
    except DataError as exc:
        problem = str(exc)
    return Sequence(
        key=uid,
        number=str(getattr(first, "SeriesNumber", "") or ""),
        description=name,
        study=str(getattr(first, "StudyInstanceUID", "")),
        volume=volume,
        display=_dicom_display(datasets),
        datasets=datasets,
        problem=problem,
        step=dicom_step(first),
    )


def _dicom_volume(label: str, datasets: list, paths: list[Path]):
    import highdicom as hd

    if {str(ds.SOPClassUID) for ds in datasets} & MULTIFRAME_CLASSES:
        if len(datasets) != 1:
            raise DataError(
                f"{label}: {len(datasets)} enhanced (multi-frame) MR objects in one series; give one per series"
            )
        try:
            volume = hd.Image.from_dataset(datasets[0], copy=False).get_volume(dtype=np.float32)
        except (ValueError, RuntimeError, AttributeError, KeyError, NotImplementedError) as exc:
            raise DataError(f"{label} ({paths[0]}): {_volume_problem(exc)}") from None
        if volume.spatial_shape[0] < 2:
            raise DataError(f"{label} ({paths[0]}) has one frame: a volume needs at least 2 slices")
        return volume
    if len(datasets) < 2:
        raise DataError(
            f"{label} ({paths[0]}) has one slice: a volume needs at least 2 (the model post-processes the volume and "
            "the tumor volume needs the slice spacing); give the whole series"
        )
    _check_one_grid(label, datasets, paths)
    try:
        return hd.get_volume_from_series(datasets, dtype=np.float32)
    except (ValueError, RuntimeError, AttributeError, KeyError, NotImplementedError) as exc:
        raise DataError(f"{label} under {paths[0].parent}: {_volume_problem(exc)}") from None


def _describe(ds) -> str:
    return str(getattr(ds, "SeriesDescription", "") or getattr(ds, "ProtocolName", "") or "").strip()


def _decode_all(datasets: list, paths: list[Path]) -> None:
    """Every instance's pixel data decoded now, so that a compressed syntax no plugin decodes, or pixel data cut short,
    is one line naming the file."""
    for path, ds in zip(paths, datasets):
        try:
            ds.pixel_array  # noqa: B018 (decodes and caches)
        except Exception as exc:
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            name = getattr(syntax, "name", str(syntax))
            if syntax is not None and getattr(syntax, "is_compressed", False):
                raise DataError(
                    f"{path}: its pixel data ({name}) cannot be decoded here ({_first_line(exc)}); the decoders are "
                    "pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle and pyjpegls (lggdeploy[dicom]); or convert "
                    "the series to an uncompressed transfer syntax"
                ) from None
            raise DataError(
                f"{path}: its pixel data cannot be read ({_first_line(exc)}); the file may be cut short"
            ) from None


def _check_one_grid(label: str, datasets: list, paths: list[Path]) -> None:
    """Same orientation, rows, columns and pixel spacing on every slice: one line naming the odd slice otherwise."""
    first = datasets[0]
    for path, ds in zip(paths, datasets):
        for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
            if getattr(ds, tag, None) is None:
                raise DataError(f"{path}: {label} has no {tag}; the slice cannot be placed in the patient")
        if not np.allclose(
            np.array(ds.ImageOrientationPatient, float), np.array(first.ImageOrientationPatient, float), atol=1e-3
        ):
            raise DataError(
                f"{path}: {label} mixes slice orientations ({list(first.ImageOrientationPatient)} and "
                f"{list(ds.ImageOrientationPatient)}); give one orientation per series"
            )
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns) or not np.allclose(
            np.array(ds.PixelSpacing, float), np.array(first.PixelSpacing, float), rtol=1e-3
        ):
            raise DataError(f"{path}: {label} mixes image sizes or pixel spacings; give one grid per series")


def _volume_problem(exc: Exception) -> str:
    text = _first_line(exc)
    if "regularly-spaced" in text or "spacing" in text.lower():
        return (
            f"its slice positions are not regularly spaced ({text}): a slice is missing (a gap) or two series are "
            "mixed; give the complete series"
        )
    return f"cannot be read as a volume ({text})"


def _dicom_display(datasets: list) -> DisplayRange | None:
    """The series' VOI window (the first of several); when slices carry different windows, the widest span of them."""
    ranges = []
    for ds in datasets:
        center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
        if center is None or width is None:
            continue
        center, width = _first_value(center), _first_value(width)
        try:
            if float(width) >= 1:
                ranges.append(window_range(float(center), float(width)))
        except (TypeError, ValueError):
            continue
    if len(ranges) != len(datasets):  # a slice without a window: the series has no one display range
        return None
    return DisplayRange(min(r[0] for r in ranges), max(r[1] for r in ranges), WINDOW, dicom_step(datasets[0]))


def dicom_step(ds) -> float:
    """One stored code in modality units: RescaleSlope (1 when absent)."""
    try:
        return abs(float(getattr(ds, "RescaleSlope", 1) or 1))
    except (TypeError, ValueError):
        return 1.0


def _first_value(value):
    """A multi-valued DICOM attribute's first value (several windows: the first is the default one)."""
    from pydicom.multival import MultiValue

    return value[0] if isinstance(value, MultiValue | list | tuple) else value


def read_nifti(path: Path, roles: tuple[str, ...] = ROLES) -> list[Sequence]:
    """A NIfTI volume (one sequence), or a 4-D file (one sequence per volume, in the data set's channel order
    pre-contrast, FLAIR, post-contrast — `roles` gives another)."""
    import highdicom as hd
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))  # scl_slope / scl_inter applied by nibabel
    except Exception as exc:
        raise DataError(f"{path}: not a readable NIfTI file ({_first_line(exc)})") from None
    header = image.header
    display = None
    cal_min, cal_max = float(header.get("cal_min", 0) or 0), float(header.get("cal_max", 0) or 0)
    slope = image.dataobj.slope
    step = (
        (abs(float(slope)) if slope is not None and np.isfinite(slope) and slope != 0 else 1.0)
        if np.issubdtype(image.get_data_dtype(), np.integer)
        else 0.0
    )
    if cal_max > cal_min:
        display = DisplayRange(cal_min, cal_max, CALIBRATION, step)
    volumes = [data] if data.ndim == 3 else [data[..., i] for i in range(data.shape[3])] if data.ndim == 4 else None
    if volumes is None or any(v.ndim != 3 for v in volumes):
        raise DataError(f"{path}: a {data.ndim}-D image; give a 3-D volume per sequence or one 4-D file of them")
    if any(v.shape[2] < 2 for v in volumes):
        raise DataError(f"{path} has one slice: a volume needs at least 2; give the whole volume")
    if len(volumes) > 1 and len(volumes) != len(roles):
        raise DataError(f"{path}: {len(volumes)} volumes in a 4-D file; expected {len(roles)} ({', '.join(roles)})")
    sequences = []
    for i, values in enumerate(volumes):
        volume = _nifti_volume(hd, nib, values, image.affine)
        name = path.name if len(volumes) == 1 else f"{path.name}[{i}]"
        sequence = Sequence(
            key=str(path) if len(volumes) == 1 else f"{path}#{i}",
            number=name,
            description=name,
            study="",
            volume=volume,
            display=display,
            step=step,
            origin="nifti",
            nifti_affine=np.array(image.affine),
            nifti_header=header,
        )
        if len(volumes) > 1:
            sequence.role, sequence.role_reason = roles[i], f"volume {i} of a 4-D file"
        sequences.append(sequence)
    return sequences


def _nifti_volume(hd, nib, values: np.ndarray, affine: np.ndarray):
    """A NIfTI array (i, j, k) as a highdicom Volume whose axes are (slice k, row j, column i), as DICOM's are."""
    return hd.Volume.from_nibabel(nib.Nifti1Image(values, affine)).permute_spatial_axes([2, 1, 0])


FLAIR_WORDS = re.compile(r"flair|dark[ _-]?fluid|\btirm|\bt2[ _-]?fl(?!a)", re.I)
POST_WORDS = re.compile(r"post|\+ ?c\b|\bgd\b|gad|contrast|\bt1 ?c(e)?\b|\bce\b|mprage.*\+", re.I)
T1_WORDS = re.compile(r"\bt1|mprage|spgr|\bpre\b", re.I)


def guess_role(sequence: Sequence) -> tuple[str | None, str]:
    """(role, why) from the headers: FLAIR by name or by an inversion time of 1500 ms or more with a long echo time;
    post-contrast T1 by a contrast agent in the headers or its name; pre-contrast T1 by name. None: another sequence."""
    if sequence.role:
        return sequence.role, sequence.role_reason
    ds = sequence.datasets[0] if sequence.datasets else None
    text = (
        " ".join(str(getattr(ds, tag, "") or "") for tag in ("SeriesDescription", "ProtocolName", "SequenceName"))
        if ds is not None
        else sequence.description
    )
    if FLAIR_WORDS.search(text):
        return FLAIR, f"'{FLAIR_WORDS.search(text).group(0)}' in its name"
    if ds is not None:
        ti, te = _number(ds, "InversionTime"), _number(ds, "EchoTime")
        if ti is not None and ti >= 1500 and te is not None and te >= 60:
            return FLAIR, f"inversion recovery, TI {ti:g} ms, TE {te:g} ms"
        agent = str(getattr(ds, "ContrastBolusAgent", "") or "").strip()
        if agent and T1_WORDS.search(text) is not None or agent and not FLAIR_WORDS.search(text):
            return POST, "a contrast agent in its headers (ContrastBolusAgent)"
    if POST_WORDS.search(text) and T1_WORDS.search(text):
        return POST, f"'{POST_WORDS.search(text).group(0)}' in its name"
    if T1_WORDS.search(text):
        return PRE, f"'{T1_WORDS.search(text).group(0)}' in its name, no contrast agent"
    return None, "not FLAIR or T1 by its headers"


def _number(ds, tag: str) -> float | None:
    try:
        value = getattr(ds, tag, None)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def os_path(value: str) -> Path | None:
    """A role flag that names a file or folder (else it names a series)."""
    path = Path(os.path.expanduser(value))
    return path if path.exists() else None

"""One patient's scanner sequences, assembled into the model's input and its masks brought back to the FLAIR grid.

Phases: choose the roles (`plan`: from the headers or the user's flags, one line when FLAIR is missing or
ambiguous), put every sequence on the FLAIR grid (`on_flair_grid`: the same grid within tolerance, or resampled
when asked), map the intensities (intensity.py), turn the volume into the data set's orientation and size
(`ModelGrid`: axial slices with the patient's anterior at the top and right on the left, as the data set's slices
are; a matrix other than 256 × 256 is padded to a square and resized, the masks brought back by nearest neighbour),
run the Segmenter, and return the mask on FLAIR's own grid with its volume in millilitres (voxel size from
PixelSpacing and the spacing of the slice positions — never SliceThickness).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np

from lggdeploy.common.errors import DataError
from lggdeploy.scanner.intensity import MINMAX, DisplayRange, minmax_range, to_model_scale
from lggdeploy.scanner.series import (
    FLAIR,
    ROLE_NAMES,
    ROLES,
    Found,
    Sequence,
    guess_role,
    os_path,
    read_input,
)

logger = logging.getLogger(__name__)

MODEL_SIZE = 256  # the data set's matrix
GRID_TOLERANCE_MM = 0.01  # positions and spacings: sequences within this of FLAIR's share its grid
ORIENTATION_TOLERANCE = 1e-3  # direction cosines


@dataclass
class RoleChoice:
    """The user's --flair / --pre / --post: a SeriesInstanceUID, a series number, or a path to the series (DICOM
    folder or NIfTI file). None: found from the headers."""

    flair: str | None = None
    pre: str | None = None
    post: str | None = None

    def get(self, role: str) -> str | None:
        return getattr(self, role)


@dataclass
class Case:
    """A patient's study: its sequences by role (FLAIR always), the rest found beside them, and what was said."""

    name: str
    roles: dict[str, Sequence]
    others: list[Sequence] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def flair(self) -> Sequence:
        return self.roles[FLAIR]

    @property
    def missing(self) -> list[str]:
        return [r for r in ROLES if r not in self.roles]


def plan(source, choice: RoleChoice | None = None) -> list[Case]:
    """The cases under `source` with their roles: what predict will do, said before it starts (`plan_rows`)."""
    choice = choice or RoleChoice()
    found = read_input(source)
    for sequence in found.sequences:
        sequence.role, sequence.role_reason = guess_role(sequence)
    explicit = {role: _chosen(found, role, choice.get(role)) for role in ROLES if choice.get(role)}
    studies = found.studies()
    if explicit.get(FLAIR) is not None:
        study = explicit[FLAIR].study
        studies = {study: studies.get(study, [explicit[FLAIR]])}
    cases = []
    for number, (study, sequences) in enumerate(studies.items(), start=1):
        name = _case_name(study, number)
        cases.append(_case(name, sequences, explicit, found))
    return cases


def _case_name(study: str, number: int) -> str:
    """A folder name that identifies nobody: the study's UID hashed ("nifti" for NIfTI input)."""
    if not study:
        return "nifti"
    return f"study-{number}-{hashlib.sha256(study.encode()).hexdigest()[:8]}"


def _chosen(found: Found, role: str, value: str) -> Sequence:
    path = os_path(value)
    if path is not None:
        sequences = read_input(path).sequences
        if len(sequences) != 1:
            raise DataError(
                f"--{role} {value}: holds {len(sequences)} MR sequences; give the folder or file of one series"
            )
        sequence = sequences[0]
    else:
        matches = [s for s in found.sequences if value in (s.key, s.number)]
        if len(matches) != 1:
            listed = "; ".join(f"{s.label} (UID {s.key})" for s in found.sequences)
            how = "matches several" if matches else "matches none"
            raise DataError(f"--{role} {value} {how} of the series found: {listed}; give a SeriesInstanceUID or a path")
        sequence = matches[0]
    sequence.role, sequence.role_reason = role, f"--{role}"
    return sequence


def _case(name: str, sequences: list[Sequence], explicit: dict[str, Sequence], found: Found) -> Case:
    roles, notes = {}, []
    for role in ROLES:
        if role in explicit:
            roles[role] = explicit[role]
            continue
        candidates = [s for s in sequences if s.role == role and s not in explicit.values()]
        if len(candidates) == 1:
            roles[role] = candidates[0]
        elif len(candidates) > 1:
            listed = "; ".join(f"{s.label}: {s.role_reason} (UID {s.key})" for s in candidates)
            raise DataError(
                f"{name}: {len(candidates)} series look like {ROLE_NAMES[role]}: {listed}; choose one with --{role} UID "
                "(or a path to its folder)"
            )
    if FLAIR not in roles:
        listed = "; ".join(f"{s.label} ({s.slices} slices, UID {s.key})" for s in sequences) or "none"
        raise DataError(
            f"{name}: no FLAIR series found among: {listed}; the model needs FLAIR — name it with --flair UID (or a "
            "path to its folder or NIfTI file)"
        )
    for role, sequence in roles.items():
        if not sequence.usable:
            raise DataError(f"{name}: the {ROLE_NAMES[role]} series cannot be used: {sequence.problem}")
    for role in ROLES:
        if role not in roles:
            notes.append(f"{ROLE_NAMES[role]} missing: FLAIR in its channel (the data set's fill)")
    used = set(id(s) for s in roles.values())
    others = [s for s in sequences if id(s) not in used]
    notes += [f"ignored: {line}" for line in found.ignored]
    return Case(name, roles, others, notes)


def plan_rows(cases: list[Case]) -> list[dict]:
    """One row per sequence found, its role and why: the table predict prints before any work."""
    rows = []
    for case in cases:
        for sequence in [*case.roles.values(), *case.others]:
            volume, used = sequence.volume, sequence in case.roles.values()
            grid = (
                "{} × {} × {}, {:.3g} × {:.3g} × {:.3g} mm".format(
                    *volume.spatial_shape, volume.spacing_between_slices, *volume.pixel_spacing
                )
                if volume is not None
                else "—"
            )
            rows.append(
                {
                    "case": case.name,
                    "series": sequence.label,
                    "uid": sequence.uid_suffix,
                    "slices": sequence.slices,
                    "grid": grid,
                    "role": ROLE_NAMES[sequence.role] if used else "not used",
                    "why": sequence.role_reason if used or sequence.usable else sequence.problem.split(": ", 1)[-1],
                }
            )
    return rows


def grid_mismatch(reference, other) -> str | None:
    """What differs between two volumes' grids (shape, orientation, spacing, position), or None when they share it."""
    if tuple(reference.spatial_shape) != tuple(other.spatial_shape):
        return "{} × {} × {} voxels against FLAIR's {} × {} × {}".format(*other.spatial_shape, *reference.spatial_shape)
    if not np.allclose(reference.direction, other.direction, atol=ORIENTATION_TOLERANCE):
        return "another orientation than FLAIR's"
    if not np.allclose(reference.spacing, other.spacing, atol=GRID_TOLERANCE_MM):
        return "voxel spacing {:.4g} × {:.4g} × {:.4g} mm against FLAIR's {:.4g} × {:.4g} × {:.4g} mm".format(
            *other.spacing, *reference.spacing
        )
    if not np.allclose(reference.position, other.position, atol=GRID_TOLERANCE_MM):
        shift = np.linalg.norm(np.asarray(reference.position) - np.asarray(other.position))
        return f"positions shifted by {shift:.3g} mm from FLAIR's"
    return None


def on_flair_grid(case: Case, resample: bool) -> dict[str, np.ndarray]:
    """Every role's values on FLAIR's grid (arrays shaped as FLAIR's volume): as they are when the grids agree,
    resampled (trilinear, in patient coordinates; 0 outside) with --resample, else one line naming the mismatch."""
    flair = case.flair.volume
    arrays = {FLAIR: np.asarray(flair.array, np.float32)}
    for role, sequence in case.roles.items():
        if role == FLAIR:
            continue
        mismatch = grid_mismatch(flair, sequence.volume)
        if mismatch is None:
            arrays[role] = np.asarray(sequence.volume.array, np.float32)
        elif resample:
            arrays[role] = resample_onto(sequence.volume, flair)
            case.notes.append(f"{ROLE_NAMES[role]} resampled onto FLAIR's grid ({mismatch})")
        else:
            raise DataError(
                f"{case.name}: {sequence.label} ({ROLE_NAMES[role]}) is not on FLAIR's grid: {mismatch}; "
                "add --resample to resample it onto FLAIR's grid, or give a sequence acquired on it"
            )
    return arrays


def resample_onto(source, target) -> np.ndarray:
    """`source`'s values at `target`'s voxel centres (trilinear, 0 outside), one target slice at a time."""
    from scipy import ndimage

    values = np.asarray(source.array, np.float32)
    out = np.zeros(target.spatial_shape, np.float32)
    rows, cols = np.meshgrid(np.arange(target.spatial_shape[1]), np.arange(target.spatial_shape[2]), indexing="ij")
    for k in range(target.spatial_shape[0]):
        indices = np.stack([np.full(rows.size, k), rows.ravel(), cols.ravel()], axis=1)
        points = source.map_reference_to_indices(target.map_indices_to_reference(indices))
        out[k] = ndimage.map_coordinates(values, points.T, order=1, cval=0.0).reshape(rows.shape)
    return out


def display_ranges(case: Case, mode: str) -> dict[str, DisplayRange]:
    """Each role's display range: the sequence's own (window / cal_min-cal_max) in "auto", forced "window" (refused
    in one line when a sequence has none) or "minmax"."""
    ranges = {}
    for role, sequence in case.roles.items():
        own = sequence.display
        if mode == MINMAX or (mode == "auto" and own is None):
            ranges[role] = minmax_range(np.asarray(sequence.volume.array), sequence.step)
        elif own is None:
            raise DataError(
                f"{case.name}: {sequence.label} carries no display range (no WindowCenter/WindowWidth, no "
                "cal_min/cal_max); use --intensity auto or minmax"
            )
        else:
            ranges[role] = own
    return ranges


class ModelGrid:
    """FLAIR's volume turned into the data set's layout — axial slices from the feet to the head, rows running to the
    patient's posterior, columns to the patient's left (DICOM's axial display), 256 × 256 — and masks turned back."""

    def __init__(self, flair_volume):
        self.volume = flair_volume
        self.original = tuple(flair_volume.get_closest_patient_orientation())
        axis = self.original[0]
        if str(getattr(axis, "value", axis)) not in ("H", "F"):
            raise DataError(
                f"the FLAIR series is not axial (its slices stack along {'/'.join(map(_code, self.original))}): the "
                "model was trained on axial slices; give an axial FLAIR series"
            )
        self.canonical = ("H", "P", "L")  # slices from the feet to the head
        shape = flair_volume.to_patient_orientation(self.canonical).spatial_shape
        self.rows, self.cols = int(shape[1]), int(shape[2])
        self.side = max(self.rows, self.cols)

    def to_model(self, array: np.ndarray) -> np.ndarray:
        """(N, rows, cols[, C]) on FLAIR's grid -> (N, 256, 256[, C]) in the data set's layout (uint8 in, uint8 out)."""
        if array.ndim == 4:
            canonical = np.stack([self.displayed(array[..., c]) for c in range(array.shape[-1])], axis=-1)
        else:
            canonical = self.displayed(array)
        return self._resize(self._pad(canonical), MODEL_SIZE, bilinear=True)

    def from_model(self, masks: np.ndarray) -> np.ndarray:
        """(N, 256, 256) bool in the data set's layout -> (N, rows, cols) bool on FLAIR's own grid and layout."""
        square = self._resize(masks.astype(np.uint8), self.side, bilinear=False)
        top, left = self.offsets
        canonical = square[:, top : top + self.rows, left : left + self.cols].astype(bool)
        volume = self.volume.to_patient_orientation(self.canonical).with_array(canonical)
        return np.asarray(volume.to_patient_orientation(self.original).array, bool)

    def displayed(self, array: np.ndarray) -> np.ndarray:
        """An array on FLAIR's grid in the data set's layout at its native size (the overlays)."""
        return np.asarray(self.volume.with_array(array).to_patient_orientation(self.canonical).array)

    @property
    def offsets(self) -> tuple[int, int]:
        """Where FLAIR's matrix sits in the padded square (centred)."""
        return (self.side - self.rows) // 2, (self.side - self.cols) // 2

    def _pad(self, array: np.ndarray) -> np.ndarray:
        if self.rows == self.cols:
            return array
        top, left = self.offsets
        padding = [(0, 0), (top, self.side - self.rows - top), (left, self.side - self.cols - left)]
        return np.pad(array, padding + [(0, 0)] * (array.ndim - 3))

    @staticmethod
    def _resize(array: np.ndarray, size: int, bilinear: bool) -> np.ndarray:
        if array.shape[1:3] == (size, size):
            return np.ascontiguousarray(array)
        from PIL import Image

        method = Image.Resampling.BILINEAR if bilinear else Image.Resampling.NEAREST
        out = np.empty((array.shape[0], size, size, *array.shape[3:]), array.dtype)
        for i, image in enumerate(array):
            channels = image[..., None] if image.ndim == 2 else image
            for c in range(channels.shape[-1]):
                resized = np.asarray(Image.fromarray(channels[..., c]).resize((size, size), method))
                if image.ndim == 2:
                    out[i] = resized
                else:
                    out[i, ..., c] = resized
        return out


def _code(value) -> str:
    return str(getattr(value, "value", value))


@dataclass
class CaseResult:
    case: Case
    masks: np.ndarray  # (N, rows, cols) bool on FLAIR's grid, in FLAIR's layout (the SEG's and the NIfTI's frames)
    model_input: np.ndarray  # (N, 256, 256, 3) uint8 in the data set's layout: what the engine saw
    model_masks: np.ndarray  # (N, 256, 256) bool, the same layout (the overlays)
    ranges: dict[str, DisplayRange]
    voxel_mm3: float  # PixelSpacing × the spacing of the slice positions

    @property
    def volume_ml(self) -> float:
        return float(self.masks.sum()) * self.voxel_mm3 / 1000


def model_input(case: Case, resample: bool, intensity: str) -> tuple[np.ndarray, dict[str, DisplayRange], ModelGrid]:
    """The (N, 256, 256, 3) uint8 stack the engine sees (pre-contrast, FLAIR, post-contrast; FLAIR in a missing
    sequence's channel), the display range of each sequence, and the grid that maps masks back."""
    arrays = on_flair_grid(case, resample)
    ranges = display_ranges(case, intensity)
    channels = {role: to_model_scale(arrays[role], ranges[role]) for role in arrays}
    stacked = np.stack([channels.get(role, channels[FLAIR]) for role in ROLES], axis=-1)
    grid = ModelGrid(case.flair.volume)
    return grid.to_model(stacked), ranges, grid


def segment_case(segmenter, case: Case, resample: bool = False, intensity: str = "auto") -> CaseResult:
    """The case's masks from the engine (the Segmenter post-processes the volume as the manifest says)."""
    x, ranges, grid = model_input(case, resample, intensity)
    prediction = segmenter.predict(x)
    masks = grid.from_model(prediction.masks)
    return CaseResult(case, masks, x, prediction.masks, ranges, float(case.flair.volume.voxel_volume))

"""Reader and validator of the Kaggle "LGG MRI Segmentation" layout (kaggle_3m).

    ROOT/<PATIENT>/<PATIENT>_<N>.tif        256x256x3 uint8 (pre-contrast, FLAIR, post-contrast)
    ROOT/<PATIENT>/<PATIENT>_<N>_mask.tif   256x256 uint8 with values {0, 255}
    ROOT/data.csv, ROOT/README.md           optional (the data set's own files)

`scan` checks the folder structure, `read_image` / `read_mask` check one file's pixels; `check_dataset`
runs both over everything and returns every problem; `load_dataset` is what training uses and raises on
any problem, so nothing is ever skipped silently.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lggdeploy.common.errors import DataError

IMAGE_SHAPE = (256, 256, 3)
MASK_SHAPE = (256, 256)
CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")
ROOT_FILES = {"data.csv", "README.md"}  # shipped with the original data set; not slices
DATA_ENV = "LGG_DATA_DIR"


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class SliceFiles:
    patient: str
    number: int
    image: Path
    mask: Path


@dataclass
class Patient:
    id: str
    folder: Path
    slices: list[SliceFiles] = field(default_factory=list)


@dataclass
class Dataset:
    root: Path
    patients: dict[str, Patient]

    @property
    def patient_ids(self) -> list[str]:
        return sorted(self.patients)

    @property
    def num_slices(self) -> int:
        return sum(len(p.slices) for p in self.patients.values())

    def slices_of(self, patient_ids: Iterable[str]) -> list[SliceFiles]:
        out: list[SliceFiles] = []
        for pid in patient_ids:
            if pid not in self.patients:
                raise DataError(f"patient {pid} is not in {self.root}: use a split file made for this data folder")
            out.extend(self.patients[pid].slices)
        return out


def _slice_pattern(patient: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(patient)}_(\d+)(_mask)?\.tif$")


def scan(root: str | os.PathLike) -> tuple[Dataset, list[Problem]]:
    """Walk the folder structure (no pixels read). Returns what was found and every structural problem."""
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"data folder {root} does not exist: give the kaggle_3m folder (or make one with `lggdeploy data synth`)"
        )
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: give the kaggle_3m folder that holds one sub-folder per patient")
    own = _slice_pattern(root.name)
    if any(own.match(entry.name) for entry in root.iterdir()):
        raise DataError(
            f"{root} is a patient folder (it holds {root.name}_<N>.tif slices): give its parent, the kaggle_3m folder that holds one sub-folder per patient"
        )
    problems: list[Problem] = []
    patients: dict[str, Patient] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            patient, found = _scan_patient(entry)
            problems.extend(found)
            if patient.slices:
                patients[patient.id] = patient
        elif entry.name not in ROOT_FILES:
            problems.append(
                Problem(
                    entry,
                    "stray file in the data root: only patient folders, data.csv and README.md belong here; move it away",
                )
            )
    if not any(entry.is_dir() for entry in root.iterdir()):
        problems.append(
            Problem(root, "empty data folder: no patient folders (expected ROOT/<PATIENT>/<PATIENT>_<N>.tif)")
        )
    return Dataset(root=root, patients=patients), problems


def _scan_patient(folder: Path) -> tuple[Patient, list[Problem]]:
    patient = Patient(id=folder.name, folder=folder)
    problems: list[Problem] = []
    pattern = _slice_pattern(folder.name)
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    for entry in sorted(folder.iterdir()):
        match = pattern.match(entry.name) if entry.is_file() else None
        if match is None:
            what = "folder" if entry.is_dir() else "file"
            problems.append(
                Problem(
                    entry,
                    f"stray {what}: expected only {folder.name}_<N>.tif and {folder.name}_<N>_mask.tif; move it away",
                )
            )
            continue
        number = int(match.group(1))
        table = masks if match.group(2) else images
        if number in table:
            problems.append(
                Problem(entry, f"slice number {number} appears twice (also {table[number].name}); rename or remove one")
            )
            continue
        table[number] = entry
    for number in sorted(set(images) | set(masks)):
        if number not in masks:
            problems.append(
                Problem(images[number], f"missing mask: {folder.name}_{number}_mask.tif not found next to it")
            )
        elif number not in images:
            problems.append(
                Problem(masks[number], f"missing image: {folder.name}_{number}.tif not found next to this mask")
            )
        else:
            patient.slices.append(SliceFiles(folder.name, number, images[number], masks[number]))
    if not images and not masks:
        problems.append(Problem(folder, "patient folder has no slices (no <PATIENT>_<N>.tif files)"))
    return patient, problems


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                raise ValueError("no image in the file")
            if len(tif.pages) > 1:  # a stack: which page is the slice is a guess lggdeploy does not make
                pages = len(tif.pages)
                raise DataError(f"{path}: holds {pages} pages; a kaggle_3m slice is one page: split it or replace it")
            page = tif.pages[0]
            end = max((o + n for o, n in zip(page.dataoffsets, page.databytecounts)), default=0)
            if end > path.stat().st_size:
                raise ValueError(f"image data runs to byte {end} but the file has {path.stat().st_size}")
            return page.asarray()
    except DataError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: unreadable TIFF, truncated or corrupt ({reason}); replace the file") from None


def _read_checked(path: Path, what: str, shape: tuple[int, ...], hint: str = "") -> np.ndarray:
    array = _read_tiff(path)
    if array.dtype != np.uint8:
        raise DataError(f"{path}: {what} dtype is {array.dtype}, expected uint8")
    if array.shape != shape:
        raise DataError(f"{path}: {what} shape is {array.shape}, expected {shape}{hint}")
    return array


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One MRI slice as HxWx3 uint8 (pre-contrast, FLAIR, post-contrast), validated."""
    return _read_checked(Path(path), "image", IMAGE_SHAPE, " (pre-contrast, FLAIR, post-contrast)")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """One tumor mask as HxW bool, validated (the file must hold only 0 and 255)."""
    path = Path(path)
    mask = _read_checked(path, "mask", MASK_SHAPE)
    bad = np.setdiff1d(np.unique(mask), [0, 255])
    if bad.size:
        raise DataError(f"{path}: mask values {bad[:5].tolist()} are outside {{0, 255}}")
    return mask == 255


def read_slice(sl: SliceFiles, problems: list[Problem]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Image and mask of one slice; each file that fails validation adds a Problem and comes back None."""
    out: list[np.ndarray | None] = []
    for reader, path in ((read_image, sl.image), (read_mask, sl.mask)):
        try:
            out.append(reader(path))
        except DataError as exc:
            problems.append(Problem(path, str(exc).removeprefix(f"{path}: ")))
            out.append(None)
    return out[0], out[1]


def check_dataset(root: str | os.PathLike, on_file: Callable[[], None] | None = None) -> tuple[Dataset, list[Problem]]:
    """Every structural and pixel problem in the folder, each naming its file."""
    dataset, problems = scan(root)
    for patient in dataset.patients.values():
        for sl in patient.slices:
            read_slice(sl, problems)
            if on_file:
                on_file()
    return dataset, problems


def raise_for_problems(root: Path, problems: list[Problem]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; run `lggdeploy data check {root}` to list every problem")


def load_dataset(root: str | os.PathLike) -> Dataset:
    """The folder's patients and slices; raises DataError on any structural problem."""
    dataset, problems = scan(root)
    raise_for_problems(dataset.root, problems)
    return dataset


def resolve_data_root(given: str | os.PathLike | None, recorded: str | os.PathLike | None, purpose: str) -> Path:
    """`--data` when given, else the folder a checkpoint recorded; one clear error when neither is here."""
    if given:
        folder = Path(given)
        if not folder.is_dir():
            raise DataError(
                f"data folder {folder} does not exist or is not a folder: give the kaggle_3m folder with --data"
            )
        return folder
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    where = (
        f"the checkpoint's data folder {recorded} is not here" if recorded else "the checkpoint records no data folder"
    )
    raise DataError(f"{where}: pass --data DIR (the kaggle_3m folder) for {purpose}")


def default_data_dir() -> Path | None:
    """$LGG_DATA_DIR, else the shared real patients next to the checkout, else None."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data" / "kaggle_3m"
        if candidate.is_dir():
            return candidate
    return None

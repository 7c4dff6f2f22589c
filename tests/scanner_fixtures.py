"""DICOM series and NIfTI volumes written from the real shared patients' slices (pydicom / nibabel), as a scanner or a
converter would: realistic MR headers, shuffled file names, spacings that are not 1 mm, 12-bit values."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lggdeploy.data.kaggle import read_image
from lggdeploy.runtime.predict import collect_inputs

SEQUENCES = {  # channel of the data set's slices -> (description, sequence headers)
    0: ("AX T1 PRE", {"ScanningSequence": "SE", "RepetitionTime": 550, "EchoTime": 12}),
    1: (
        "AX T2 FLAIR",
        {"ScanningSequence": ["SE", "IR"], "RepetitionTime": 9000, "EchoTime": 120, "InversionTime": 2500},
    ),
    2: (
        "AX T1 POST GD",
        {"ScanningSequence": "SE", "RepetitionTime": 550, "EchoTime": 12, "ContrastBolusAgent": "Gadavist"},
    ),
}


@dataclass(frozen=True)
class Geometry:
    pixel_mm: tuple[float, float] = (0.9375, 0.9375)  # rows, columns
    slice_mm: float = 5.5  # spacing of the slice positions (SliceThickness is written as 5.0: not what is used)
    origin: tuple[float, float, float] = (-120.0, -118.0, -40.0)


def patient_slices(root: Path, patient: str) -> np.ndarray:
    """The patient's (N, 256, 256, 3) uint8 slices in slice-number order."""
    paths = collect_inputs(root / patient)[patient]
    return np.stack([read_image(p) for p in paths])


def write_dicom_study(
    folder: Path,
    slices: np.ndarray,
    geometry: Geometry = Geometry(),
    scanner_bits: bool = False,
    seed: int = 0,
    reverse: tuple[int, ...] = (),
    channels: tuple[int, ...] = (0, 1, 2),
    patient_name: str = "DOE^JANE",
) -> dict[int, str]:
    """One study, one series per channel, under `folder` in shuffled file names and nested folders. Returns the
    SeriesInstanceUID of each channel. `scanner_bits`: 12-bit values (×16 plus noise in the low bits) with a rescale
    slope and intercept, and the window that displays their range; else the 8-bit values with window c 128, w 256.
    `reverse`: channels whose files are numbered (InstanceNumber) in reverse slice order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    study, frame = generate_uid(), generate_uid()
    uids = {}
    files = []
    for number, channel in enumerate(channels, start=2):
        description, headers = SEQUENCES[channel]
        series = uids[channel] = generate_uid()
        for k, image in enumerate(slices[..., channel]):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, "MRN-0042", "19700101", "F"
            ds.AccessionNumber, ds.StudyID, ds.StudyDate, ds.StudyTime = "ACC-77", "1", "20200101", "120000"
            ds.ReferringPhysicianName = "REF^DOC"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.Modality, ds.Manufacturer, ds.MagneticFieldStrength = "MR", "ACME", 1.5
            ds.SeriesNumber, ds.SeriesDescription, ds.ProtocolName = number, description, description
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SK", "", "2D"
            for tag, value in headers.items():
                setattr(ds, tag, value)
            ds.InstanceNumber = len(slices) - k if channel in reverse else k + 1
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [
                geometry.origin[0],
                geometry.origin[1],
                geometry.origin[2] + k * geometry.slice_mm,
            ]
            ds.SliceLocation = geometry.origin[2] + k * geometry.slice_mm
            ds.PixelSpacing = list(geometry.pixel_mm)
            ds.SliceThickness, ds.SpacingBetweenSlices = 5.0, geometry.slice_mm
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = image.shape
            ds.BitsAllocated, ds.PixelRepresentation = 16, 0
            if (
                scanner_bits
            ):  # stored = 16 v + noise; modality = 0.5 stored + 10; the window shows [10, 10 + 0.5 × 4095]
                stored = image.astype(np.uint16) * 16 + noise.integers(0, 16, image.shape, dtype=np.uint16)
                ds.BitsStored, ds.HighBit = 12, 11
                ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 0.5, 10, "US"
                low, high = 10.0, 10.0 + 0.5 * 4095
            else:
                stored = image.astype(np.uint16)
                ds.BitsStored, ds.HighBit = 8, 7
                low, high = 0.0, 255.0
            width = high - low + 1
            ds.WindowCenter, ds.WindowWidth = round((low + high) / 2 + 0.5, 4), round(width, 4)
            ds.PixelData = stored.tobytes()
            files.append(ds)
    rng.shuffle(files)
    for i, ds in enumerate(files):
        path = folder / f"d{i % 3}" / f"IM{rng.randrange(10**8):08d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return uids


def write_nifti(path: Path, volume: np.ndarray, geometry: Geometry = Geometry(), flip_rows: bool = True) -> np.ndarray:
    """One sequence (N, rows, cols) as a NIfTI file the way dcm2niix writes one: i = column, j = row (flipped, so that
    the affine is close to RAS), k = slice; cal_min / cal_max 0 / 255. Returns the affine."""
    import nibabel as nib

    n, rows, cols = volume.shape
    dr, dc = geometry.pixel_mm
    x0, y0, z0 = geometry.origin
    data = np.transpose(volume, (2, 1, 0)).astype(np.int16)  # (i=col, j=row, k=slice)
    # LPS: column index -> +x (left), row index -> +y (posterior); RAS flips x and y
    affine = np.array([[-dc, 0, 0, -x0], [0, -dr, 0, -y0], [0, 0, geometry.slice_mm, z0], [0, 0, 0, 1]], dtype=float)
    if flip_rows:
        data = data[:, ::-1, :]
        affine = affine @ np.array([[1, 0, 0, 0], [0, -1, 0, rows - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.header["cal_min"], image.header["cal_max"] = 0, 255
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))
    return affine

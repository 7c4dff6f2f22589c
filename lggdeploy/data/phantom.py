"""Synthetic phantom patients in the kaggle_3m layout: the embedded default for the demo and fast tests.

Each patient is a volume of consecutive axial slices through an ellipsoidal head: a skull ring, brain
tissue with smooth texture, a brighter cortical rim and dark ventricles, and one irregular lesion that is
bright on FLAIR, slightly dark on pre-contrast and faintly enhancing at its rim on post-contrast. The
lesion spans roughly a third of the slices, as LGG lesions in the real set do. Written with the real
file names, dtypes and value conventions, so everything that reads kaggle_3m reads a phantom too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from lggdeploy.common.errors import DataError
from lggdeploy.common.files import atomic_path, check_can_create, ensure_folder
from lggdeploy.data.kaggle import IMAGE_SHAPE

SIZE = IMAGE_SHAPE[0]
# Mean intensities per tissue on (pre-contrast, FLAIR, post-contrast), in the real data's uint8 range.
TISSUE = {
    "skull": (150.0, 70.0, 140.0),
    "white": (115.0, 95.0, 118.0),
    "grey": (95.0, 120.0, 100.0),
    "csf": (40.0, 30.0, 45.0),
    "lesion": (88.0, 165.0, 104.0),
}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-8)


def phantom_volume(rng: np.random.Generator, n_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """One patient: images (S, 256, 256, 3) uint8 and masks (S, 256, 256) bool."""
    z = np.linspace(-0.85, 0.85, n_slices, dtype=np.float32)[:, None, None]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cy, cx = SIZE / 2 + rng.uniform(-8, 8), SIZE / 2 + rng.uniform(-8, 8)
    ry, rx = rng.uniform(100, 112), rng.uniform(78, 92)
    scale = np.sqrt(np.clip(1 - z**2, 0.05, None))
    head = ((yy - cy) / (ry * scale)) ** 2 + ((xx - cx) / (rx * scale)) ** 2  # < 1 inside the head
    skull = (head < 1) & (head > 0.80)
    brain = head <= 0.80
    grey = brain & (head > 0.55)
    ventricles = np.zeros_like(brain)
    for side in (-1, 1):
        v = ((yy - cy + 8) / (22 * scale)) ** 2 + ((xx - cx - side * 13) / (7 * scale)) ** 2
        ventricles |= (v < 1) & (np.abs(z) < 0.45)

    # Lesion: a noisy ellipsoid inside the brain, centred so it spans about a third of the slices.
    span = rng.uniform(0.28, 0.40) * n_slices
    z_centre = rng.uniform(-0.3, 0.3)
    angle = rng.uniform(0, 2 * np.pi)
    radius = rng.uniform(0.2, 0.45)
    ly, lx = cy + radius * ry * np.sin(angle), cx + radius * rx * np.cos(angle)
    lr_y, lr_x = rng.uniform(14, 30), rng.uniform(14, 30)
    lz = (span / n_slices) * 0.85  # half-extent in z units
    distance = ((yy - ly) / lr_y) ** 2 + ((xx - lx) / lr_x) ** 2 + ((z - z_centre) / lz) ** 2
    wobble = _smooth_noise(rng, (n_slices, SIZE, SIZE), (1.0, 10.0, 10.0))
    lesion = (distance + 0.35 * wobble < 1.0) & brain & ~ventricles

    texture = _smooth_noise(rng, (n_slices, SIZE, SIZE), (0.8, 3.0, 3.0))
    images = np.zeros((n_slices, SIZE, SIZE, 3), np.float32)
    for region, name in ((skull, "skull"), (brain, "white"), (grey, "grey"), (ventricles, "csf"), (lesion, "lesion")):
        images[region] = TISSUE[name]
    tissue = brain | skull
    images += (9.0 * texture)[..., None] * tissue[..., None]
    rim = lesion & ~ndimage.binary_erosion(lesion, iterations=2)
    images[..., 2] += 25.0 * rim  # faint post-contrast rim enhancement
    images = ndimage.gaussian_filter(images, (0, 1.0, 1.0, 0))  # partial-volume blur at edges
    images += rng.normal(0, 3.0, images.shape).astype(np.float32) * (
        tissue[..., None] | (rng.random(images.shape[:3]) < 0.02)[..., None]
    )
    bias = 1 + 0.08 * _smooth_noise(rng, (1, SIZE, SIZE), (0, 60, 60))  # coil bias field
    images *= bias[..., None]
    return np.clip(images, 0, 255).astype(np.uint8), lesion


def check_target(out: str | os.PathLike, patients: int, slices: tuple[int, int]) -> Path:
    """The options of `synthesize`, checked before any work."""

    if patients < 1:
        raise DataError(f"--patients must be at least 1, got {patients}")
    lo, hi = slices
    if not 4 <= lo <= hi:
        raise DataError(f"slices per patient must satisfy 4 <= min <= max, got {slices}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file: give a new folder for the phantom set")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty: give a new folder for the phantom set")
    return check_can_create(out)


def synthesize(
    out: str | os.PathLike,
    patients: int = 8,
    slices: tuple[int, int] = (16, 24),
    seed: int = 0,
    on_patient: Callable[[str], None] | None = None,
) -> list[str]:
    """Write `patients` phantom patients under `out` in the kaggle_3m layout. Returns their ids."""
    import tifffile

    out = check_target(out, patients, slices)
    lo, hi = slices
    ensure_folder(out)
    rng = np.random.default_rng(seed)
    ids = []
    for k in range(patients):
        pid = f"PHANTOM_{k + 1:03d}_{seed:04d}"
        images, masks = phantom_volume(rng, int(rng.integers(lo, hi + 1)))
        folder = out / pid
        folder.mkdir()
        for n, (image, mask) in enumerate(zip(images, masks), start=1):
            for path, array in (
                (folder / f"{pid}_{n}.tif", image),
                (folder / f"{pid}_{n}_mask.tif", mask.astype(np.uint8) * 255),
            ):
                with atomic_path(path) as tmp:
                    tifffile.imwrite(tmp, array)
        ids.append(pid)
        if on_patient:
            on_patient(pid)
    return ids

"""Slices of chosen patients loaded into memory as arrays (every file validated on the way)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from lggdeploy.data.kaggle import Dataset, Problem, raise_for_problems, read_slice
from lggdeploy.errors import DataError


@dataclass
class SliceArrays:
    images: np.ndarray  # (N, 256, 256, 3) uint8
    masks: np.ndarray  # (N, 256, 256) bool
    patients: np.ndarray  # (N,) patient id of each slice
    numbers: np.ndarray  # (N,) slice number N of each slice

    def __len__(self) -> int:
        return len(self.images)

    @property
    def patient_ids(self) -> list[str]:
        return list(dict.fromkeys(self.patients.tolist()))

    def tumor_slices(self) -> np.ndarray:
        return self.masks.reshape(len(self), -1).any(axis=1)


def load_slices(
    dataset: Dataset, patient_ids: Iterable[str], on_slice: Callable[[], None] | None = None
) -> SliceArrays:
    """Read the slices of `patient_ids` in patient order, slices sorted by number."""
    slices = sorted(dataset.slices_of(patient_ids), key=lambda s: (s.patient, s.number))
    if not slices:
        raise DataError(f"no slices to load from {dataset.root} for the requested patients")
    images = np.empty((len(slices), 256, 256, 3), np.uint8)
    masks = np.empty((len(slices), 256, 256), bool)
    problems: list[Problem] = []
    for i, sl in enumerate(slices):
        image, mask = read_slice(sl, problems)
        if image is not None and mask is not None:
            images[i], masks[i] = image, mask
        if on_slice:
            on_slice()
    raise_for_problems(dataset.root, problems)
    return SliceArrays(
        images=images,
        masks=masks,
        patients=np.array([s.patient for s in slices]),
        numbers=np.array([s.number for s in slices]),
    )

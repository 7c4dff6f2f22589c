"""Slices of chosen patients loaded into memory as arrays (every file validated on the way)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from lggdeploy.common.errors import DataError
from lggdeploy.data.kaggle import Dataset, Problem, raise_for_problems, read_slice


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


def pick_slices(slices: SliceArrays, count: int) -> SliceArrays:
    """`count` slices spread over every patient, half with tumor and half without where the data allow.

    Patients take turns (round robin) so each contributes; within a patient the picks are evenly spaced
    through its tumor (or tumor-free) slices, centred in equal segments rather than at the volume's edges.
    Used for INT8 calibration, the export parity check and the quantization sensitivity ranking.
    """
    if count < 1:
        raise DataError(f"at least one slice must be picked, got {count}")
    tumor = slices.tumor_slices()
    n_tumor = min(int(tumor.sum()), max(count // 2, count - int((~tumor).sum())))
    n_empty = min(int((~tumor).sum()), count - n_tumor)

    def spread(flag: bool, k: int) -> list[int]:
        pools = [np.flatnonzero((slices.patients == p) & (tumor == flag)) for p in slices.patient_ids]
        pools = [pool for pool in pools if len(pool)]
        take = [0] * len(pools)
        while k > 0:
            for i, pool in enumerate(pools):
                if k > 0 and take[i] < len(pool):
                    take[i] += 1
                    k -= 1
        return [int(pool[int((j + 0.5) * len(pool) / t)]) for pool, t in zip(pools, take) for j in range(t)]

    picks = np.array(sorted(spread(True, n_tumor) + spread(False, n_empty)), dtype=int)
    return SliceArrays(slices.images[picks], slices.masks[picks], slices.patients[picks], slices.numbers[picks])

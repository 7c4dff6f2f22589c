import numpy as np
import pytest

from lggdeploy.common.errors import DataError
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import check_dataset
from lggdeploy.data.phantom import phantom_volume, synthesize


def test_phantom_set_passes_the_real_validator(phantom_dir):
    dataset, problems = check_dataset(phantom_dir)
    assert problems == [] and len(dataset.patients) == 6


def test_phantom_lesions_span_about_a_third_and_are_flair_bright(phantom_dir):
    dataset, _ = check_dataset(phantom_dir)
    for pid in dataset.patient_ids:
        arrays = load_slices(dataset, [pid])
        fraction = arrays.tumor_slices().mean()
        assert 0.15 <= fraction <= 0.55, (pid, fraction)
        flair = arrays.images[..., 1].astype(float)
        tissue = (arrays.images.max(axis=-1) > 50) & ~arrays.masks
        assert flair[arrays.masks].mean() > flair[tissue].mean() + 30


def test_phantom_is_deterministic_and_refuses_non_empty_folder(tmp_path):
    a_images, a_masks = phantom_volume(np.random.default_rng(7), 8)
    b_images, b_masks = phantom_volume(np.random.default_rng(7), 8)
    assert np.array_equal(a_images, b_images) and np.array_equal(a_masks, b_masks)
    synthesize(tmp_path / "p", patients=1, slices=(6, 6))
    with pytest.raises(DataError, match="not empty"):
        synthesize(tmp_path / "p", patients=1)

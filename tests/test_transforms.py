import numpy as np
import torch

from lggdeploy.data.transforms import Augmentation, Normalization, logits_to_masks, preprocess, resize_masks


def test_preprocess_shape_and_normalization():
    images = np.full((2, 256, 256, 3), 255, np.uint8)
    x = preprocess(images, 128, Normalization())
    assert x.shape == (2, 3, 128, 128) and x.dtype == np.float32
    expected = (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(x[0, :, 5, 5], expected, atol=1e-5)
    assert np.allclose(Normalization().apply_torch(torch.ones(1, 3, 2, 2)).numpy()[0, :, 0, 0], expected, atol=1e-5)


def test_logits_to_masks_threshold_and_native_resize():
    logits = np.full((1, 1, 128, 128), -5.0, np.float32)
    logits[0, 0, 32:64, 32:64] = 5.0
    mask = logits_to_masks(logits)
    assert mask.shape == (1, 256, 256)
    assert mask[0, 70:120, 70:120].all() and not mask[0, :50].any()
    assert not logits_to_masks(np.full((1, 8, 8), 0.5, np.float32), size=8, threshold=0.7).any()
    assert logits_to_masks(np.full((1, 8, 8), 0.5, np.float32), size=8, threshold=0.5).all()
    assert resize_masks(mask, 128)[0, 40:60, 40:60].all()


def test_augmentation_moves_image_and_mask_together():
    mask = torch.zeros(4, 1, 64, 64)
    mask[:, :, 10:30, 5:25] = 1  # off-centre, so flips and rotations move it
    image = mask.repeat(1, 3, 1, 1) * 0.8 + 0.1
    geometry_only = Augmentation(gain=(1.0, 1.0), shift=0.0, hflip=1.0)
    aug_image, aug_mask = geometry_only(image, mask, torch.Generator().manual_seed(0))
    moved = (aug_mask != mask).float().mean()
    assert moved > 0.02  # the transform did something
    from_image = aug_image[:, 1:2] > 0.5
    agreement = (from_image == (aug_mask > 0.5)).float().mean()
    assert agreement > 0.99
    jittered, _ = Augmentation()(image, mask, torch.Generator().manual_seed(1))
    assert jittered.min() >= 0 and jittered.max() <= 1


def test_missing_sequence_fill_copies_flair_into_the_missing_channels_at_the_requested_share():
    from lggdeploy.data.transforms import simulate_missing_sequences

    image = torch.rand(3000, 3, 4, 4)
    filled = simulate_missing_sequences(image, 0.3, torch.Generator().manual_seed(0))
    same_as_flair = lambda c: (filled[:, c] == filled[:, 1]).flatten(1).all(1)  # noqa: E731
    pre, post = same_as_flair(0), same_as_flair(2)
    assert torch.equal(filled[:, 1], image[:, 1])  # FLAIR itself is never touched
    assert abs(pre.float().mean() - 0.2) < 0.03 and abs(post.float().mean() - 0.2) < 0.03  # each pattern a third of 0.3
    assert abs((pre & post).float().mean() - 0.1) < 0.02
    untouched = ~(pre | post)
    assert torch.equal(filled[untouched], image[untouched])
    # In the augmentation the fill comes after geometry and intensity, drawn from the same generator after them:
    # the augmented FLAIR is the same with the fill on or off, and every slice copies it (share 1).
    mask = (torch.rand(4, 1, 16, 16) > 0.5).float()
    off, _ = Augmentation()(image[:4, :, :4, :4].repeat(1, 1, 4, 4), mask, torch.Generator().manual_seed(3))
    on, _ = Augmentation(missing_modality=1.0)(
        image[:4, :, :4, :4].repeat(1, 1, 4, 4), mask, torch.Generator().manual_seed(3)
    )
    assert torch.equal(on[:, 1], off[:, 1])
    assert all(torch.equal(on[i, 0], on[i, 1]) or torch.equal(on[i, 2], on[i, 1]) for i in range(4))


def test_slice_normalization_removes_a_scans_brightness_on_real_slices(real_data):
    """A FLAIR recorded 0.6x as bright (as TCGA_HT_A5RC's) reaches the network almost unchanged in slice mode, and
    clearly changed in fixed mode; numpy (engines) and torch (training) compute the same gains."""
    from conftest import SMALL_REAL_PATIENT

    from lggdeploy.data.arrays import load_slices
    from lggdeploy.data.kaggle import load_dataset

    images = load_slices(load_dataset(real_data), [SMALL_REAL_PATIENT]).images
    darker = images.copy()
    darker[..., 1] = np.round(darker[..., 1] * 0.6).astype(np.uint8)
    slice_mode = Normalization(mode="slice")
    brain = images.max(-1)[:, None].repeat(3, 1) > 40  # (N, 3, H, W): well inside the tissue
    for norm, bound in ((slice_mode, 0.05), (Normalization(), None)):
        a, b = preprocess(images, 256, norm), preprocess(darker, 256, norm)
        flair_change = np.abs(a - b)[:, 1][brain[:, 1]].mean() / np.abs(a[:, 1][brain[:, 1]]).mean()
        if bound is not None:
            assert flair_change < bound, flair_change  # uint8 rounding and the tissue threshold's edge only
            assert np.array_equal(a[:, 0], b[:, 0]) and np.array_equal(a[:, 2], b[:, 2])  # the other channels untouched
        else:
            assert flair_change > 0.3, flair_change
    from lggdeploy.data.transforms import to_unit

    x01 = to_unit(images)
    assert np.allclose(
        slice_mode.slice_factors(x01), slice_mode.slice_factors_torch(torch.from_numpy(x01)).numpy(), rtol=1e-6
    )
    factors = slice_mode.slice_factors(x01)
    assert 0.25 <= factors.min() and factors.max() <= 4 and len(np.unique(factors)) > 10  # per slice and channel
    # A slice without tissue (under 1 % of the samples above the threshold) keeps its values.
    empty = np.zeros((1, 256, 256, 3), np.uint8)
    empty[0, :10, :10] = 200
    assert np.array_equal(preprocess(empty, 256, slice_mode), preprocess(empty, 256, Normalization()))


def test_normalization_records_round_trip_and_unknown_modes_are_refused():
    import pytest

    from lggdeploy.common.errors import LggError

    slice_mode = Normalization(mode="slice")
    assert Normalization.from_json(slice_mode.to_json()) == slice_mode
    assert Normalization.from_json(Normalization().to_json()) == Normalization()
    old = {
        "scale": 1 / 255,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }  # written before modes existed
    assert Normalization.from_json(old) == Normalization()
    with pytest.raises(LggError, match=r"engines/x.onnx: normalization mode 'volume' is unknown to lggdeploy"):
        Normalization.from_json(dict(old, mode="volume"), origin="engines/x.onnx")
    # Every constant of the slice mode is recorded and read back: a record keeps computing the gains it was written
    # with when the module's defaults change. A record of the previous release (level and threshold only) reads with
    # today's constants, which are the ones it was written with.
    record = slice_mode.to_json()
    assert {"tissue_stride", "tissue_top_quantile", "tissue_min_share", "tissue_min_top", "tissue_max_gain"} <= set(
        record
    )
    coarse = Normalization.from_json(dict(record, tissue_stride=8, tissue_max_gain=2.0))
    assert (coarse.tissue_stride, coarse.tissue_max_gain) == (8, 2.0)
    x01 = np.random.default_rng(0).random((2, 3, 64, 64), np.float32) * 0.05  # dim slices: the gain bound decides
    x01[:, :, 16:48, 16:48] += 0.04
    assert coarse.slice_factors(x01).max() == np.float32(2.0) and slice_mode.slice_factors(x01).max() > 2.0
    previous = {k: record[k] for k in ("scale", "mean", "std", "mode", "tissue_level", "tissue_above")}
    assert Normalization.from_json(previous) == slice_mode
    with pytest.raises(LggError, match=r"bundle.json: its normalization record is damaged"):
        Normalization.from_json(dict(record, tissue_stride=0), origin="bundle.json")
    with pytest.raises(LggError, match=r"bundle.json: its normalization record is damaged"):
        Normalization.from_json({"mode": "slice"}, origin="bundle.json")

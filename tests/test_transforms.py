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

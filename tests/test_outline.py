"""Outline redrawing by a dense CRF (lggdeploy/outline.py): on real slices, in post-processing, records and refusals."""

import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from lggdeploy.common.errors import LggError
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.models.config import TrainConfig
from lggdeploy.outline import OutlineCRF, dilate, require_densecrf
from lggdeploy.postprocess import PostProcess, tune, tuned_val_dice


def coarse(mask: np.ndarray) -> np.ndarray:
    """A PSPNet-like probability of `mask`: averaged over 8 x 8 cells, upsampled bilinearly, kept within 0.1-0.9."""
    small = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((32, 32), Image.BOX))
    return (0.1 + 0.8 * np.clip(np.asarray(Image.fromarray(small).resize((256, 256), Image.BILINEAR)), 0, 1)).astype(
        np.float32
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def tumor_slices(real_data):
    """The tumor slices (over 200 px of tumor) of the first four shared patients that have three or more."""
    dataset = load_dataset(real_data)
    picked = []
    for pid in sorted(dataset.patient_ids):
        slices = load_slices(dataset, [pid])
        if (slices.masks.sum(axis=(1, 2)) > 200).sum() >= 3:
            picked.append(pid)
        if len(picked) == 4:
            break
    slices = load_slices(dataset, picked)
    keep = slices.masks.sum(axis=(1, 2)) > 200
    return slices.images[keep], slices.masks[keep], slices.patients[keep]


@pytest.mark.parametrize("move", ["widened", "narrowed"])
def test_the_crf_moves_a_coarse_outline_towards_the_real_tumor_edge(tumor_slices, move):
    """Each slice's true tumor widened or narrowed by 4 px and drawn at PSPNet's stride with uncertain probabilities:
    the redrawn outline agrees better with the reader's, on real FLAIR edges."""
    images, truth, _ = tumor_slices
    op = ndimage.binary_dilation if move == "widened" else ndimage.binary_erosion
    prob = np.stack([coarse(op(m, iterations=4)) for m in truth])
    kept = prob > 0.5
    redrawn = OutlineCRF().redraw(kept, prob, images)
    assert dice(redrawn, truth) > dice(kept, truth) + 0.02
    assert (redrawn <= np.stack([dilate(m, 8) for m in kept])).all()


def test_the_crf_changes_nothing_away_from_the_masks():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    prob = rng.random((3, 64, 64)).astype(np.float32)
    masks = np.zeros((3, 64, 64), bool)
    masks[1, 20:30, 20:30] = True
    out = OutlineCRF(margin=3).redraw(masks, prob, images)
    assert not out[0].any() and not out[2].any()
    assert (out[1] <= dilate(masks[1], 3)).all()
    assert not OutlineCRF().redraw(np.zeros_like(masks), prob, images).any()


def test_dilate_is_scipys_binary_dilation():
    rng = np.random.default_rng(1)
    for steps in (1, 3, 8):
        mask = rng.random((40, 50)) < 0.02
        assert np.array_equal(dilate(mask, steps), ndimage.binary_dilation(mask, iterations=steps))


def test_the_outline_step_in_post_processing_and_its_record():
    rule = PostProcess.parse("1034,0,0.9+crf")
    assert rule.outline == OutlineCRF() and rule.needs_images and rule.needs_probabilities
    assert PostProcess.from_json(rule.to_json()) == rule
    assert rule.to_json()["outline"]["image"]["mode"] == "slice"
    assert "dense CRF within 8 px" in rule.describe()
    assert PostProcess.parse("none+crf").active and PostProcess.parse("none+crf").min_component_voxels == 0
    with pytest.raises(ValueError, match="largest-only"):
        PostProcess.parse("largest+crf")
    damaged = rule.to_json()
    del damaged["outline"]["sxy"]
    with pytest.raises(ValueError, match="outline record is damaged"):
        PostProcess.from_json(damaged)
    newer = rule.to_json()
    newer["outline"]["sigma_z"] = 2
    with pytest.raises(ValueError, match="sigma_z"):
        PostProcess.from_json(newer)
    volume = np.zeros((2, 16, 16), bool)
    volume[0, 4:8, 4:8] = True
    with pytest.raises(ValueError, match="needs the slices"):
        rule.apply(volume, np.full(volume.shape, 0.95, np.float32))


def test_tune_keeps_the_outline_step_where_the_val_patients_gain(tumor_slices):
    images, truth, patients = tumor_slices
    prob = np.stack([coarse(ndimage.binary_dilation(m, iterations=4)) for m in truth])
    predicted = prob > 0.5
    record = tune(
        predicted, truth, patients, train_smallest_tumor=100, probabilities=prob, images=images, outline=OutlineCRF()
    )
    assert record["outline"]["kept"] and record["postprocess"]["outline"] == OutlineCRF().to_json()
    assert tuned_val_dice(record) == record["outline"]["val_mean_patient_dice_after"]
    assert record["outline"]["val_mean_patient_dice_after"] > record["outline"]["val_mean_patient_dice_before"]
    assert "outline" not in tune(predicted, truth, patients, train_smallest_tumor=100, probabilities=prob)


def test_without_pydensecrf2_one_line_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)  # an import of it now raises ImportError
    with pytest.raises(LggError, match=r"pip install 'lggdeploy\[outline\]'"):
        require_densecrf()
    masks = np.zeros((1, 16, 16), bool)
    masks[0, 4:8, 4:8] = True
    with pytest.raises(LggError, match="pydensecrf2"):
        OutlineCRF().redraw(masks, np.full(masks.shape, 0.9, np.float32), np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(LggError, match=r"--postprocess auto: .*pydensecrf2.*1034,0,0.9"):
        TrainConfig(model="pspnet-scratch", data=tmp_path, out=tmp_path / "run").validate()
    TrainConfig(model="pspnet-scratch", data=tmp_path, out=tmp_path / "run", postprocess="1034,0,0.9").validate()

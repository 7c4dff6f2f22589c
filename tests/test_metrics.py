import numpy as np
import pytest

from lggdeploy.metrics import confusion_counts, summarize


def masks(*rows):
    return np.array(rows, bool).reshape(len(rows), 1, -1)


def test_confusion_counts_by_hand():
    pred = masks([1, 1, 0, 0])
    truth = masks([1, 0, 1, 0])
    assert confusion_counts(pred, truth).tolist() == [[1, 1, 1, 1]]


def test_per_patient_dice_pools_slices_and_empty_conventions():
    # patient A: slice 1 TP=2 FP=0 FN=2; slice 2 TP=0 FP=1 FN=0 (tumor-free slice with a false positive)
    # pooled: 2*2 / (2*2 + 1 + 2) = 4/7; slice Dices: 2*2/(4+2)=2/3 and 0
    # patient B: one empty-empty slice (Dice 1 by convention) and one perfect slice
    pred = masks([1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0])
    truth = masks([1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0])
    summary = summarize(confusion_counts(pred, truth), np.array(["A", "A", "B", "B"]))
    rows = {r["patient"]: r for r in summary["per_patient"]}
    assert rows["A"]["dice"] == pytest.approx(4 / 7)
    assert rows["A"]["iou"] == pytest.approx(2 / 5)
    assert rows["A"]["accuracy"] == pytest.approx(5 / 8)
    assert rows["B"]["dice"] == 1.0 and rows["B"]["iou"] == 1.0
    agg = summary["aggregates"]
    assert agg["mean_patient_dice"] == pytest.approx((4 / 7 + 1) / 2)
    assert agg["median_patient_dice"] == pytest.approx((4 / 7 + 1) / 2)
    # global: TP=3 FP=1 FN=2 -> 6/9
    assert agg["global_dice"] == pytest.approx(6 / 9)
    assert agg["global_iou"] == pytest.approx(3 / 6)
    assert agg["pixel_accuracy"] == pytest.approx(13 / 16)
    # tumor slices: A1 (2/3) and B2 (1) -> 5/6
    assert agg["tumor_slice_dice"] == pytest.approx(5 / 6)
    # tumor-free slices: A2 (has FP) and B1 (clean) -> 1/2
    assert agg["false_positive_slice_rate"] == pytest.approx(0.5)
    # study style: mean of 2/3, 0, 1, 1
    assert agg["slice_mean_dice_study_style"] == pytest.approx((2 / 3 + 0 + 1 + 1) / 4)


def test_empty_truth_with_prediction_scores_zero_and_no_tumor_slices_is_none():
    summary = summarize(confusion_counts(masks([1, 0]), masks([0, 0])), np.array(["A"]))
    assert summary["per_patient"][0]["dice"] == 0.0
    assert summary["aggregates"]["tumor_slice_dice"] is None
    assert summary["aggregates"]["false_positive_slice_rate"] == 1.0


def test_detection_misses_and_largest_component_dice_on_constructed_volumes():
    """Patient A: the tumor found plus a stray blob far away (largest component removes it); patient B: missed."""
    from lggdeploy.data.arrays import SliceArrays
    from lggdeploy.data.transforms import Normalization
    from lggdeploy.scoring import score_runner

    truth = np.zeros((4, 256, 256), bool)
    truth[0:2, 100:140, 100:140] = True  # A
    truth[2:4, 50:60, 50:60] = True  # B
    predicted = truth.copy()
    predicted[0, 10:20, 10:20] = True  # A: a false-positive blob
    predicted[2:4] = False  # B: nothing found
    predicted[3, 200:210, 200:210] = True  # B: a false positive elsewhere, no overlap

    class Replay:
        def __init__(self):
            self.position = 0

        def infer(self, batch):
            out = np.where(predicted[self.position : self.position + len(batch)], 10.0, -10.0).astype(np.float32)[
                :, None
            ]
            self.position += len(batch)
            return out

    slices = SliceArrays(
        np.zeros((4, 256, 256, 3), np.uint8), truth, np.array(["A", "A", "B", "B"]), np.array([1, 2, 1, 2])
    )
    summary = score_runner(
        Replay(), slices, 256, Normalization(), batch_size=3, show_progress=False, largest_component=True
    )
    rows = {r["patient"]: r for r in summary["per_patient"]}
    assert rows["A"]["detected"] is True and rows["B"]["detected"] is False
    assert summary["aggregates"]["patients_missed"] == 1 and summary["aggregates"]["patients_with_tumor"] == 2
    tumor = 2 * 40 * 40
    assert rows["A"]["dice"] == pytest.approx(2 * tumor / (2 * tumor + 100))
    assert rows["A"]["dice_largest_component"] == 1.0  # the stray blob is not the largest component
    assert rows["B"]["dice"] == 0.0 and rows["B"]["dice_largest_component"] == 0.0

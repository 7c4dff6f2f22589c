"""Post-processing (small 3-D components removed), chosen on the val patients, stored and used end to end."""

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from lggdeploy.cli import app
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.outline import OutlineCRF
from lggdeploy.postprocess import LARGEST, PostProcess, connected_components, smallest_tumor, tune, tuned_val_dice
from lggdeploy.scoring import largest_connected_component, score_runner, segment


def test_connected_components_match_scipy_on_random_volumes():
    rng = np.random.default_rng(0)
    for _ in range(40):
        volume = rng.random(tuple(rng.integers(1, 14, 3))) < rng.uniform(0.0, 0.8)
        labels, ids, sizes = connected_components(volume)
        reference, n = ndimage.label(volume)  # 6-connected in 3-D by default
        assert len(ids) == n and sorted(sizes.tolist()) == sorted(np.bincount(reference.ravel())[1:].tolist())
        assert ((labels > 0) == volume).all()
        for i in ids:  # the same partition, not only the same sizes
            assert len(np.unique(reference[labels == i])) == 1


def constructed_volume():
    volume = np.zeros((6, 32, 32), bool)
    volume[1:5, 4:14, 4:14] = True  # the "tumor": 400 voxels across 4 slices
    volume[0, 25:30, 25:30] = True  # 25 voxels
    volume[5, 20:22, 2:4] = True  # 4 voxels
    return volume


def test_small_components_are_removed_and_the_largest_is_always_kept():
    volume = constructed_volume()
    assert PostProcess(30).apply(volume).sum() == 400
    assert PostProcess(20).apply(volume).sum() == 425
    assert PostProcess(0).apply(volume).sum() == 429 and not PostProcess(0).active
    assert PostProcess(LARGEST).apply(volume).sum() == 400
    only_small = np.zeros_like(volume)
    only_small[2, 3:5, 3:5] = True
    assert PostProcess(10_000).apply(only_small).sum() == 4  # a patient's only prediction is never removed
    assert not PostProcess(30).apply(np.zeros_like(volume)).any()
    assert (largest_connected_component(volume) == PostProcess(LARGEST).apply(volume)).all()
    # The two-part rule: also every component under a fraction of the largest one.
    volume[0:2, 20:30, 2:15] = True  # a 260-voxel second blob (apart from the others)
    assert PostProcess(0, 0.05).apply(volume).sum() == 400 + 260 + 25  # floor 20 voxels
    assert PostProcess(30, 0.5).apply(volume).sum() == 400 + 260  # floor max(30, 200)
    assert PostProcess(30, 0.7).apply(volume).sum() == 400  # floor 280: only the largest is left
    volume = constructed_volume()
    two = np.concatenate([volume, np.zeros_like(volume), volume[:, :, ::-1]])
    patients = np.array(["a"] * 6 + ["b"] * 12)  # each patient post-processed on its own slices
    assert PostProcess(LARGEST).apply_per_patient(two, patients).sum() == 800


def confident_and_doubtful():
    """The constructed volume plus a 600-voxel blob; probabilities: the tumor 0.97, the blob 0.8, the rest 0.95."""
    volume = constructed_volume()
    volume[0, 25:30, 25:30] = False  # (the 25-voxel one would touch the blob)
    volume[0:6, 18:28, 18:28] = True  # 600 voxels: larger than the tumor, apart from it
    probabilities = np.where(volume, 0.95, 0.1).astype(np.float32)
    probabilities[1:5, 4:14, 4:14] = 0.97
    probabilities[0:6, 18:28, 18:28] = 0.8
    return volume, probabilities


def test_components_of_low_mean_probability_are_removed_but_never_the_most_confident():
    volume, prob = confident_and_doubtful()
    assert PostProcess(0, 0, 0.9).apply(volume, prob).sum() == 400 + 4  # the larger, doubtful blob removed
    assert PostProcess(30, 0, 0.9).apply(volume, prob).sum() == 400  # the size rule first, then the floor
    assert PostProcess(30).apply(volume).sum() == 1000  # the size rule alone keeps the largest: the blob
    assert PostProcess(0, 0, 0.99).apply(volume, prob).sum() == 400  # nothing passes: the most confident stays
    assert PostProcess(30, 0, 0.9).apply(np.zeros_like(volume), None).sum() == 0  # nothing to remove, nothing needed
    with pytest.raises(ValueError, match="needs the probabilities"):
        PostProcess(30, 0, 0.9).apply(volume)
    two = np.concatenate([volume, volume])
    patients = np.repeat(["a", "b"], len(volume))
    assert PostProcess(30, 0, 0.9).apply_per_patient(two, patients, np.concatenate([prob, prob])).sum() == 800
    assert "mean probability < 0.9" in PostProcess(30, 0, 0.9).describe()


def test_parse_and_json_round_trip_and_bad_text():
    assert PostProcess.parse("none") == PostProcess() and PostProcess.parse("largest") == PostProcess(LARGEST)
    assert PostProcess.parse(" 1200 ") == PostProcess(1200)
    assert PostProcess.from_json(PostProcess(1200).to_json()) == PostProcess(1200)
    assert PostProcess.from_json(None) == PostProcess()  # checkpoints and engines from before post-processing
    assert PostProcess.parse("1034,0.5") == PostProcess(1034, 0.5) and PostProcess.parse("0,0.5").active
    assert PostProcess(1200).to_json() == {"min_component_voxels": 1200}  # rules without a fraction read as before
    assert PostProcess.from_json(PostProcess(1034, 0.5).to_json()) == PostProcess(1034, 0.5)
    for bad in ("banana", "-3", "1.5", "10,x"):
        with pytest.raises(ValueError, match="none, largest|>= 0"):
            PostProcess.parse(bad)
    with pytest.raises(ValueError, match="between 0 and 1"):
        PostProcess.parse("10,2")
    assert (
        PostProcess.parse("1034,0,0.9")
        == PostProcess(1034, 0.0, 0.9)
        == PostProcess.from_json({"min_component_voxels": 1034, "min_mean_probability": 0.9})
    )
    assert PostProcess.from_json(PostProcess(1034, 0.5, 0.9).to_json()) == PostProcess(1034, 0.5, 0.9)
    for bad in ("10,0,1", "10,0,x", "1,2,3,4"):
        with pytest.raises(ValueError, match=r"\[0, 1\)|none, largest"):
            PostProcess.parse(bad)
    with pytest.raises(ValueError, match="unknown post-processing field.*min_volume_ml"):
        PostProcess.from_json({"min_component_voxels": 10, "min_volume_ml": 2})  # a newer lggdeploy's rule


def val_case(tumor_small_and_not_largest: bool):
    """Two val patients; each has its tumor plus a false-positive blob. Returns predicted, truth, patients."""
    truth = np.zeros((2, 6, 32, 32), bool)
    predicted = np.zeros_like(truth)
    for p in range(2):
        truth[p, 1:5, 4:14, 4:14] = True
        predicted[p, 1:5, 5:14, 4:14] = True  # found, a little short
        predicted[p, 0, 25:30, 25:30] = True  # a 25-voxel false positive
    if tumor_small_and_not_largest:  # patient 1: a 4-voxel tumor, and a false positive larger than the size
        truth[1] = False
        truth[1, 3, 2:4, 20:22] = True
        predicted[1] = False
        predicted[1, 3, 2:4, 20:22] = True
        predicted[1, 0:2, 22:32, 22:32] = True  # 200 voxels
    return predicted.reshape(12, 32, 32), truth.reshape(12, 32, 32), np.repeat(["p0", "p1"], 6)


def test_tuning_keeps_the_rule_only_where_the_val_patients_say_it_does_not_hurt():
    predicted, truth, patients = val_case(False)
    record = tune(predicted, truth, patients, train_smallest_tumor=100)
    assert (
        record["candidate"] == {"min_component_voxels": 50}
        and record["kept"]
        and record["postprocess"] == record["candidate"]
    )
    assert record["val_mean_patient_dice_with"] > record["val_mean_patient_dice_without"]
    # A val patient whose small tumor would be removed (a larger false positive is kept): rejected, whatever the mean.
    predicted, truth, patients = val_case(True)
    record = tune(predicted, truth, patients, train_smallest_tumor=100)
    assert not record["kept"] and record["postprocess"] == {"min_component_voxels": 0} and "p1" in record["why"]
    assert tune(predicted, truth, patients, train_smallest_tumor=None)["postprocess"] == {"min_component_voxels": 0}
    assert smallest_tumor(truth, patients) == 4


def test_tuning_adds_the_mean_probability_floor_only_where_the_val_patients_say_it_does_not_hurt():
    predicted, truth, patients = val_case(False)
    prob = np.where(predicted, 0.97, 0.05)
    prob[0] = np.where(predicted[0], 0.7, 0.05)  # patient p0's false positive (slice 0) is doubtful
    record = tune(predicted, truth, patients, train_smallest_tumor=10, probabilities=prob)
    assert record["candidate"] == {"min_component_voxels": 5} and record["kept"]  # the 25-voxel blob stays
    confidence = record["confidence"]
    assert confidence["kept"] and confidence["val_mean_patient_dice_after"] > confidence["val_mean_patient_dice_before"]
    assert record["postprocess"] == {"min_component_voxels": 5, "min_mean_probability": 0.9}
    assert tuned_val_dice(record) == confidence["val_mean_patient_dice_after"]
    # p1's 4-voxel tumor is doubtful and a larger false positive confident: the floor would miss p1, so it is refused.
    predicted, truth, patients = val_case(True)
    prob = np.where(predicted, 0.97, 0.05)
    prob[6:12] = np.where(truth[6:12], 0.6, prob[6:12])
    record = tune(predicted, truth, patients, train_smallest_tumor=2, probabilities=prob)
    assert not record["confidence"]["kept"] and "p1" in record["confidence"]["why"]
    assert "min_mean_probability" not in record["postprocess"]
    # Without probabilities (or with a floor of 0) there is no second step.
    assert "confidence" not in tune(predicted, truth, patients, train_smallest_tumor=2)


def test_scoring_reports_the_post_processed_figures_beside_the_raw_ones():
    predicted, truth, patients = val_case(False)

    class Replay:  # logits that threshold to `predicted`
        def infer(self, x):
            start = Replay.at
            Replay.at += len(x)
            return np.where(predicted[start : start + len(x)], 6.0, -6.0).astype(np.float32)[:, None]

    from lggdeploy.data.arrays import SliceArrays
    from lggdeploy.data.transforms import Normalization

    big = lambda a: np.kron(a, np.ones((8, 8), a.dtype)).astype(a.dtype)  # noqa: E731  32 -> 256 px
    slices = SliceArrays(
        images=np.zeros((12, 256, 256, 3), np.uint8), masks=big(truth), patients=patients, numbers=np.arange(12)
    )
    predicted = big(predicted)
    Replay.at = 0
    raw = score_runner(Replay(), slices, 256, Normalization(), batch_size=5, show_progress=False)
    Replay.at = 0
    post = score_runner(
        Replay(), slices, 256, Normalization(), batch_size=5, show_progress=False, postprocess=PostProcess(50 * 64)
    )
    assert post["aggregates"]["mean_patient_dice_without_postprocess"] == raw["aggregates"]["mean_patient_dice"]
    assert post["aggregates"]["mean_patient_dice"] > raw["aggregates"]["mean_patient_dice"]
    assert [r["dice_without_postprocess"] for r in post["per_patient"]] == [r["dice"] for r in raw["per_patient"]]


@pytest.mark.slow
def test_training_stores_the_val_choice_and_eval_engines_and_runtime_use_it(segmenting_run, phantom_dir, tmp_path):
    """A default run writes the rule and its val evidence into best.pt; eval reproduces the val figure; a rule in the
    checkpoint travels to the engine's manifest and the runtime, and changes the masks there."""
    from lggdeploy.engines.build import BuildOptions, build_engines
    from lggdeploy.engines.formats import read_manifest
    from lggdeploy.models.checkpoint import load_checkpoint, save_checkpoint, split_of
    from lggdeploy.models.evaluate import evaluate_checkpoint
    from lggdeploy.models.train import TrainConfig, train
    from lggdeploy.runtime import Segmenter

    result = train(
        TrainConfig(
            model="pspnet-scratch",
            data=phantom_dir,
            out=tmp_path / "run",
            epochs=1,
            batch_size=8,
            img_size=128,
            show_progress=False,
            lr=1e-4,
            init_checkpoint=segmenting_run.best_path.parent / "last.pt",
        )
    )
    ckpt = load_checkpoint(result.best_path)
    dataset = load_dataset(phantom_dir)
    split = split_of(ckpt)
    train_slices = load_slices(dataset, split.train)
    tuning = ckpt["postprocess_tuning"]
    assert tuning["smallest_train_tumor_voxels"] == smallest_tumor(train_slices.masks, train_slices.patients) > 0
    assert tuning["candidate"] == {"min_component_voxels": int(0.5 * tuning["smallest_train_tumor_voxels"])}
    size_step = tuning["candidate"] if tuning["kept"] else {"min_component_voxels": 0}
    confidence = tuning["confidence"]  # the second step, judged on top of the first
    assert confidence["candidate"] == {**size_step, "min_mean_probability": 0.9}
    second = confidence["candidate"] if confidence["kept"] else size_step
    outline = tuning["outline"]  # the third, judged on top of the second
    assert outline["candidate"] == {**second, "outline": OutlineCRF().to_json()}
    assert ckpt["postprocess"] == (outline["candidate"] if outline["kept"] else second) == result.best["postprocess"]
    summary = evaluate_checkpoint(result.best_path, phantom_dir, split="val")
    assert summary["meta"]["postprocess"] == ckpt["postprocess"]
    expected = tuned_val_dice(tuning) or tuning["val_mean_patient_dice_without"]
    assert summary["aggregates"]["mean_patient_dice"] == pytest.approx(expected, abs=2e-3)

    # A rule written into a checkpoint (here: keep only the largest component) reaches the engine and the runtime.
    ruled = save_checkpoint(
        tmp_path / "ruled.pt", dict(ckpt, threshold=0.05, postprocess=PostProcess(LARGEST).to_json())
    )
    report = build_engines([ruled], BuildOptions(out_dir=tmp_path / "engines", data=phantom_dir, precision="fp32"))
    engine = next(Path(e["engine"]) for e in report.engines if e["engine"].endswith(".onnx"))
    assert read_manifest(engine)["postprocess"] == {"min_component_voxels": LARGEST}
    val = load_slices(dataset, split.val[:1])
    with Segmenter.load(engine) as stored:
        assert stored.postprocess == PostProcess(LARGEST) and stored.threshold == 0.05
    # A threshold low enough to leave more than one component for the rule to remove (how low depends on the CPU the
    # fixture model was trained on: its weights differ between AVX2 and AVX-512 kernels).
    for threshold in (0.05, 0.02, 0.01, 0.005, 0.002, 0.001):
        with (
            Segmenter.load(engine, threshold=threshold) as stored,
            Segmenter.load(engine, threshold=threshold, postprocess=PostProcess()) as none,
        ):
            kept, raw = stored.predict(val.images), none.predict(val.images)
        if connected_components(raw.masks)[1].size > 1:
            break
    assert connected_components(raw.masks)[1].size > 1, (
        "even threshold 0.001 leaves one component: nothing for the rule to remove"
    )
    assert (kept.masks == largest_connected_component(raw.masks)).all() and kept.masks.sum() < raw.masks.sum()
    assert (kept.probabilities[~kept.masks] <= threshold + 1e-6).all() and (
        kept.probabilities[kept.masks] > threshold
    ).all()

    # `predict --postprocess` overrides the stored rule; a bad value is one clear line.
    source = phantom_dir / split.val[0]
    for value, expected_masks in (("none", raw.masks), (None, kept.masks)):
        out = tmp_path / f"pred-{value}"
        args = ["predict", str(engine), str(source), "-o", str(out), "--threshold", str(threshold)] + (
            ["--postprocess", value] if value else []
        )
        assert CliRunner().invoke(app, args).exit_code == 0
        import tifffile

        pid = split.val[0]
        written = np.stack([tifffile.imread(out / pid / f"{pid}_{n}_pred_mask.tif") > 0 for n in val.numbers])
        assert (written == expected_masks).all()
    bad = CliRunner().invoke(
        app, ["predict", str(engine), str(source), "-o", str(tmp_path / "bad"), "--postprocess", "banana"]
    )
    assert bad.exit_code != 0 and "--postprocess" in bad.output and "Traceback" not in bad.output


def test_the_mean_probability_floor_runs_in_scoring_the_serving_loop_and_the_runtime():
    """score_runner (eval, bench's accuracy), segment (bench's end-to-end time, Triton) and the runtime's Segmenter
    all hand the rule the probabilities the masks came from."""
    from lggdeploy.data.arrays import SliceArrays
    from lggdeploy.data.transforms import Normalization
    from lggdeploy.runtime.segmenter import Segmenter

    volume, prob = confident_and_doubtful()
    truth = np.zeros_like(volume)
    truth[1:5, 4:14, 4:14] = True
    big = lambda a: np.kron(a, np.ones((8, 8), a.dtype)).astype(a.dtype)  # noqa: E731  32 -> 256 px
    logits = np.log(prob / (1 - prob)).astype(np.float32)

    class Replay:  # the logits of `prob`, batch after batch
        at = 0

        def infer(self, x):
            start, Replay.at = Replay.at, Replay.at + len(x)
            return big(logits[start : start + len(x)])[:, None]

    rule = PostProcess(30 * 64, 0, 0.9)  # voxels at 256 px
    images = np.zeros((len(volume), 256, 256, 3), np.uint8)
    slices = SliceArrays(images=images, masks=big(truth), patients=np.repeat("p", len(volume)), numbers=np.arange(6))
    Replay.at = 0
    scored = score_runner(Replay(), slices, 256, Normalization(), batch_size=4, show_progress=False, postprocess=rule)
    assert scored["aggregates"]["mean_patient_dice"] == pytest.approx(1.0)  # only the tumor is left
    assert scored["aggregates"]["mean_patient_dice_without_postprocess"] < 0.6
    Replay.at = 0
    masks = segment(Replay(), images, 256, Normalization(), 0.5, rule, batch_size=4)
    assert (masks == big(truth)).all()
    manifest = {
        "normalization": Normalization().to_json(),
        "img_size": 256,
        "threshold": 0.5,
        "postprocess": rule.to_json(),
    }
    Replay.at = 0
    result = Segmenter(Replay(), manifest, Path("replay.onnx")).predict(images, batch_size=4)
    assert (result.masks == big(truth)).all() and result.probabilities[~result.masks].max() <= 0.5

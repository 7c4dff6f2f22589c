"""The training recipe: oversampling, losses, warm-up, EMA, and the val-tuned threshold stored and used end to end."""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lggdeploy.cli import app
from lggdeploy.common.errors import LggError
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.engines.formats import read_manifest
from lggdeploy.models import threshold as thresholds
from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint, split_of
from lggdeploy.models.recipe import epoch_order, lr_factor, segmentation_loss
from lggdeploy.models.train import TrainConfig, train


def phantom_tumor_flags(phantom_dir):
    dataset = load_dataset(phantom_dir)
    slices = load_slices(dataset, sorted(dataset.patients))
    return slices.masks.reshape(len(slices), -1).any(axis=1)


def test_oversampling_changes_the_tumor_fraction_seen_per_epoch(phantom_dir):
    tumor = phantom_tumor_flags(phantom_dir)
    natural = tumor.mean()
    assert 0.05 < natural < 0.95, natural  # the phantom set has both kinds of slices
    plain = epoch_order(tumor, 7, None).numpy()
    assert sorted(plain) == list(range(len(tumor)))  # a permutation: every slice once
    for fraction in (0.25, 0.5, 0.8):
        order = epoch_order(tumor, 7, fraction).numpy()
        assert len(order) == len(tumor)
        assert tumor[order].mean() == pytest.approx(fraction, abs=1 / len(tumor))
        side = np.flatnonzero(tumor) if fraction > natural else np.flatnonzero(~tumor)  # the side drawn more often
        assert set(side) <= set(order)  # every slice of the oversampled side is seen before any repeats
    assert torch.equal(epoch_order(tumor, 7, 0.5), epoch_order(tumor, 7, 0.5))  # seeded
    assert not torch.equal(epoch_order(tumor, 7, 0.5), epoch_order(tumor, 8, 0.5))


def test_a_training_epoch_sees_the_requested_tumor_fraction(phantom_dir, tmp_path):
    kw = dict(model="pspnet-scratch", data=phantom_dir, epochs=1, batch_size=4, img_size=64, show_progress=False)
    natural = train(TrainConfig(out=tmp_path / "plain", tumor_fraction=0, **kw)).history[0][
        "train_tumor_slice_fraction"
    ]
    oversampled = train(TrainConfig(out=tmp_path / "over", tumor_fraction=0.9, **kw)).history[0][
        "train_tumor_slice_fraction"
    ]
    assert oversampled > natural + 0.2 and oversampled == pytest.approx(0.9, abs=0.05), (natural, oversampled)


def test_per_image_losses_weigh_a_missed_small_lesion():
    """Two slices, a large lesion found and a small one missed: the pooled Dice hardly notices, per-image Dice and
    Tversky do; Tversky punishes a missed pixel more than a false one."""
    target = torch.zeros(2, 1, 32, 32)
    target[0, 0, 4:28, 4:28] = 1  # 576 pixels
    target[1, 0, 10:13, 10:13] = 1  # 9 pixels
    logits = torch.where(target > 0, 8.0, -8.0)
    logits[1] = -8.0  # the small lesion missed
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target).item()
    pooled, per_image, tversky = (
        segmentation_loss(logits, target, k).item() - bce for k in ("dice", "image-dice", "tversky")
    )
    assert pooled < 0.02 and per_image > 0.4 and tversky > 0.4, (pooled, per_image, tversky)
    one = torch.zeros(1, 1, 8, 8)
    one[0, 0, :4] = 1
    missed, extra = torch.where(one > 0, 8.0, -8.0), torch.where(one > 0, 8.0, -8.0)
    missed[0, 0, 0] = -8.0  # 8 tumor pixels missed
    extra[0, 0, 4] = 8.0  # 8 false pixels
    assert segmentation_loss(missed, one, "tversky") > segmentation_loss(extra, one, "tversky")
    with pytest.raises(ValueError, match="unknown loss"):
        segmentation_loss(logits, target, "focal")


def test_warm_up_then_cosine():
    factors = [lr_factor(step, 100, 10) for step in range(101)]
    assert factors[0] == pytest.approx(0.01) and factors[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:10], factors[1:11]))  # rising during warm-up
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # falling after
    assert factors[100] == pytest.approx(0.01)
    assert lr_factor(0, 100, 0) == pytest.approx(1.0)  # no warm-up: the plain cosine


def test_threshold_choice_moves_only_for_a_real_gain():
    """Logits of a model that under-calls: the tumor sits at probability 0.35, the background at 0.05."""
    masks = np.zeros((4, 16, 16), bool)
    masks[:, 4:12, 4:12] = True
    logits = np.where(masks, np.log(0.35 / 0.65), np.log(0.05 / 0.95)).astype(np.float32)[:, None]
    patients = np.array(["a", "a", "b", "b"])
    record = thresholds.tune(logits, masks, patients, default=0.5)
    assert record["val_mean_patient_dice_at_default"] == 0.0 and record["val_mean_patient_dice"] == pytest.approx(1.0)
    assert 0.05 < record["threshold"] < 0.35 and record["patients"] == ["a", "b"]
    assert abs(record["threshold"] - 0.5) == min(
        abs(r["threshold"] - 0.5) for r in record["sweep"] if r["mean_patient_dice"] == 1.0
    )
    calibrated = np.where(masks, 4.0, -4.0).astype(np.float32)[:, None]  # every threshold gives Dice 1: keep 0.5
    assert thresholds.tune(calibrated, masks, patients, default=0.5)["threshold"] == 0.5


@pytest.mark.slow
def test_tuned_threshold_is_stored_and_used_end_to_end(segmenting_run, phantom_dir, tmp_path):
    """A run with tuning writes the chosen threshold into best.pt; eval on the val patients reproduces the Dice
    the tuning measured at that threshold; export, the engine's manifest and the runtime carry it."""
    from lggdeploy.engines.build import BuildOptions, build_engines
    from lggdeploy.models.evaluate import evaluate_checkpoint
    from lggdeploy.postprocess import PostProcess
    from lggdeploy.runtime.segmenter import Segmenter

    out = tmp_path / "tuned"
    result = train(
        TrainConfig(
            model="pspnet-scratch",
            data=phantom_dir,
            out=out,
            epochs=2,
            batch_size=8,
            img_size=128,
            show_progress=False,
            lr=1e-4,
            init_checkpoint=segmenting_run.best_path.parent / "last.pt",
            ema_decay=0.9,
            tune_threshold=True,
        )
    )
    ckpt = load_checkpoint(result.best_path)
    tuning = ckpt["threshold_tuning"]
    assert ckpt["threshold"] == tuning["threshold"] == result.best["threshold"] and ckpt["weights"] == "ema"
    assert tuning["patients"] == split_of(ckpt).val
    summary = evaluate_checkpoint(result.best_path, phantom_dir, split="val")
    assert (
        summary["meta"]["threshold"] == ckpt["threshold"]
        and summary["meta"]["threshold_origin"] == "tuned on 1 val patients"
    )
    network = summary["aggregates"].get(
        "mean_patient_dice_without_postprocess", summary["aggregates"]["mean_patient_dice"]
    )
    assert network == pytest.approx(tuning["val_mean_patient_dice"], abs=2e-3)  # the tuning judged the network's masks

    # A threshold other than 0.5 written into the checkpoint travels to the engine and the runtime and changes masks.
    moved = dict(ckpt, threshold=0.2)
    from lggdeploy.models.checkpoint import save_checkpoint

    moved_path = save_checkpoint(tmp_path / "moved.pt", moved)
    report = build_engines([moved_path], BuildOptions(out_dir=tmp_path / "engines", data=phantom_dir, precision="fp32"))
    engine = next(Path(e["engine"]) for e in report.engines if e["engine"].endswith(".onnx"))
    assert read_manifest(engine)["threshold"] == 0.2
    dataset = load_dataset(phantom_dir)
    slices = load_slices(dataset, split_of(ckpt).val)
    with (  # the network's masks: post-processing (an outline step) need not be monotone in the threshold
        Segmenter.load(engine, postprocess=PostProcess()) as low,
        Segmenter.load(engine, threshold=0.5, postprocess=PostProcess()) as default,
    ):
        assert low.threshold == 0.2
        low_masks, default_masks = low.predict(slices.images).masks, default.predict(slices.images).masks
    assert low_masks.sum() > default_masks.sum()
    assert (low_masks | default_masks).sum() == low_masks.sum()  # a lower threshold only adds pixels


def test_fine_tuning_keeps_the_threshold_it_starts_from(trained_run, phantom_dir, tmp_path):
    ckpt = load_checkpoint(trained_run.best_path)
    start = tmp_path / "start.pt"
    from lggdeploy.models.checkpoint import save_checkpoint

    save_checkpoint(start, dict(ckpt, threshold=0.35))
    result = train(
        TrainConfig(
            model="pspnet-scratch",
            data=phantom_dir,
            out=tmp_path / "ft",
            epochs=1,
            batch_size=8,
            img_size=64,
            show_progress=False,
            init_checkpoint=start,
        )
    )
    assert load_checkpoint(result.best_path)["threshold"] == 0.35
    assert model_from_checkpoint(load_checkpoint(result.best_path)) is not None


@pytest.mark.slow  # 9.6 s; the normalization units stay in the default set
def test_slice_normalization_is_stored_and_used_end_to_end(trained_run, phantom_dir, tmp_path):
    """--normalization slice: best.pt records it, the engine's manifest carries it, the runtime's probabilities are
    the model's on slice-normalized inputs (not on fixed ones); fine-tuning a checkpoint cannot switch it."""
    from lggdeploy.data.transforms import Normalization, native_logits, preprocess, sigmoid
    from lggdeploy.engines.build import BuildOptions, build_engines
    from lggdeploy.postprocess import PostProcess
    from lggdeploy.runtime.segmenter import Segmenter

    result = train(
        TrainConfig(
            model="pspnet-scratch",
            data=phantom_dir,
            out=tmp_path / "s",
            epochs=1,
            batch_size=8,
            img_size=64,
            show_progress=False,
            normalization="slice",
        )
    )
    ckpt = load_checkpoint(result.best_path)
    assert ckpt["normalization"]["mode"] == "slice" and ckpt["train_config"]["normalization"] == "slice"
    report = build_engines(
        [result.best_path], BuildOptions(out_dir=tmp_path / "engines", data=phantom_dir, precision="fp32")
    )
    engine = next(Path(e["engine"]) for e in report.engines if e["engine"].endswith(".onnx"))
    assert read_manifest(engine)["normalization"] == ckpt["normalization"]
    images = load_slices(load_dataset(phantom_dir), split_of(ckpt).val).images
    model = model_from_checkpoint(ckpt).eval()

    def torch_probabilities(normalization):
        with torch.no_grad():
            return sigmoid(native_logits(model(torch.from_numpy(preprocess(images, 64, normalization))).numpy()))

    with Segmenter.load(engine, postprocess=PostProcess()) as segmenter:
        probabilities = segmenter.predict(images).probabilities
    same, other = (
        np.abs(probabilities - torch_probabilities(n)).max() for n in (Normalization(mode="slice"), Normalization())
    )
    assert same < 1e-3 and other > 10 * same, (same, other)
    start_mode = load_checkpoint(trained_run.best_path)["normalization"].get("mode", "fixed")
    other_mode = "fixed" if start_mode == "slice" else "slice"
    with pytest.raises(LggError, match=f"--normalization {other_mode} differs from the '{start_mode}' normalization"):
        train(
            TrainConfig(
                model="pspnet-scratch",
                data=phantom_dir,
                out=tmp_path / "ft",
                epochs=1,
                batch_size=8,
                img_size=64,
                show_progress=False,
                init_checkpoint=trained_run.best_path,
                normalization=other_mode,
                explicit=frozenset({"epochs", "normalization"}),
            )
        )


def test_bad_recipe_options_are_one_clear_line(phantom_dir, tmp_path):
    for kw, message in (
        (dict(tumor_fraction=1.5), "--tumor-fraction must be 0"),
        (dict(loss="focal"), "unknown --loss 'focal'"),
        (dict(ema_decay=0.2), "--ema must be 0"),
        (dict(warmup_epochs=3), "--warmup-epochs must be"),
        (dict(missing_modality=1.5), "--missing-modality must be a share"),
        (dict(normalization="volume"), "unknown --normalization 'volume'"),
        (dict(bn_momentum=1.5), "--bn-momentum must lie between 0"),
        (dict(crop_size=48), "--crop-size must be 0"),
        (
            dict(crop_size=96),
            r"--crop-size must be 0 \(whole slices\) or a multiple of 32 from 64 to --img-size \(64\)",
        ),
    ):
        with pytest.raises(LggError, match=message):
            train(
                TrainConfig(model="pspnet-scratch", data=phantom_dir, out=tmp_path / "x", epochs=2, img_size=64, **kw)
            )
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            "pspnet-scratch",
            "--data",
            str(phantom_dir),
            "--out",
            str(tmp_path / "y"),
            "--tumor-fraction",
            "2",
        ],
    )
    assert result.exit_code != 0 and "--tumor-fraction 2.0: must lie in [0, 1)" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "y").exists()


def test_batch_norm_momentum_reaches_every_layer_and_the_run(phantom_dir, tmp_path, monkeypatch):
    """efficientnet-pytorch's batch norms average their statistics over ~100 steps (momentum 0.01), which left a
    2-epoch unet-effb7 with eval statistics of far earlier weights; training sets 0.1 in every layer unless told 0."""
    from collections import Counter

    from lggdeploy.models import train as train_module
    from lggdeploy.models.networks import build_model
    from lggdeploy.models.presets import resolve_model
    from lggdeploy.models.recipe import set_batch_norm_momentum

    def momenta(model):
        return Counter(
            round(m.momentum, 6) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        )

    effb7 = build_model(resolve_model("unet-effb7"), "random").model
    before = momenta(effb7)
    assert before[0.01] > 100  # the encoder's own
    assert set_batch_norm_momentum(effb7, 0) == 0 and momenta(effb7) == before
    assert set_batch_norm_momentum(effb7, 0.1) == before[0.01] and set(momenta(effb7)) == {0.1}

    seen = []

    def spy(model, momentum):
        seen.append(momentum)
        changed = set_batch_norm_momentum(model, momentum)
        seen.append(set(momenta(model)))
        return changed

    monkeypatch.setattr(train_module, "set_batch_norm_momentum", spy)
    kw = dict(model="pspnet-scratch", data=phantom_dir, epochs=1, batch_size=8, img_size=64, show_progress=False)
    result = train(TrainConfig(out=tmp_path / "m", bn_momentum=0.3, **kw))
    assert seen == [0.3, {0.3}] and load_checkpoint(result.last_path)["train_config"]["bn_momentum"] == 0.3
    refused = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            "pspnet-scratch",
            "--data",
            str(phantom_dir),
            "--out",
            str(tmp_path / "m"),
            "--resume",
            "--bn-momentum",
            "0.1",
        ],
    )
    assert (
        refused.exit_code != 0
        and "--bn-momentum 0.1 (the run has 0.3)" in refused.output
        and "Traceback" not in refused.output
    )


def test_crops_keep_image_and_mask_together_and_hold_the_tumor():
    from lggdeploy.data.transforms import random_crops

    n, size = 64, 64
    rows, cols = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    x01 = torch.stack([rows, cols, rows * 0]).expand(n, 3, 256, 256) / 255  # each pixel knows where it was
    masks = torch.zeros(n, 1, 256, 256)
    masks[: n // 2, 0, 250:253, 2:6] = 1  # a 12-pixel lesion in a corner: half the slices hold it
    crops, crop_masks = random_crops(x01, masks, size, torch.Generator().manual_seed(0))
    assert crops.shape == (n, 3, size, size) and crop_masks.shape == (n, 1, size, size)
    tops, lefts = (crops[:, 0, 0, 0] * 255).round().long(), (crops[:, 1, 0, 0] * 255).round().long()
    for i in range(n):  # the mask's window is the image's
        assert torch.equal(crop_masks[i], masks[i, :, tops[i] : tops[i] + size, lefts[i] : lefts[i] + size])
    assert (crop_masks[: n // 2].sum(dim=(1, 2, 3)) > 0).all()  # every tumor slice's crop holds tumor
    empty_tops = tops[n // 2 :]
    assert empty_tops.min() < 48 and empty_tops.max() > 144  # tumor-free slices are cropped anywhere
    again, _ = random_crops(x01, masks, size, torch.Generator().manual_seed(0))
    assert torch.equal(again, crops)  # seeded: a resumed epoch crops as the first run did
    assert random_crops(x01, masks, 256)[0] is x01


def test_a_run_trains_on_crops_and_records_them(phantom_dir, tmp_path, monkeypatch):
    from lggdeploy.models import train as train_module

    shapes, crop = [], train_module.random_crops

    def spy(images, masks, size, generator=None):
        assert images.min() < 0  # the normalized input of the whole slice is cropped, not the raw slice in [0, 1]
        out = crop(images, masks, size, generator)
        shapes.append((tuple(images.shape[-2:]), tuple(out[0].shape[-2:])))
        return out

    monkeypatch.setattr(train_module, "random_crops", spy)
    kw = dict(model="pspnet-scratch", data=phantom_dir, epochs=1, batch_size=8, img_size=96, show_progress=False)
    result = train(TrainConfig(out=tmp_path / "m", crop_size=64, **kw))
    assert shapes and set(shapes) == {((96, 96), (64, 64))}
    ckpt = load_checkpoint(result.best_path)
    assert ckpt["train_config"]["crop_size"] == 64 and ckpt["img_size"] == 96
    assert 0 <= result.history[-1]["val_mean_patient_dice"] <= 1


def test_budget_arithmetic_whole_epochs_then_a_shorter_last_one():
    from lggdeploy.models.train import steps_within_budget

    # 10 steps of 10 s and a 50 s validation: an epoch is 150 s
    # 1600 s * 0.97 = 1552 s: 10 more whole epochs, 52 s left
    assert steps_within_budget(1800, 200, 10, 50, 10, None) == 110
    assert steps_within_budget(1800, 200, 10, 50, 10, 6) == 60  # the cap
    assert steps_within_budget(100, 200, 10, 50, 10, None) == 10  # over budget: what is done stays done
    # 800 s * 0.97 = 776 s after 4 epochs: 5 whole (750 s), 26 s left cannot hold a validation: no partial epoch
    assert steps_within_budget(1800, 1000, 10, 50, 10, None, done=4) == 90
    # 900 s * 0.97 = 873 s: 5 whole (750 s), then 123 s = 50 s of validation + 7 steps
    assert steps_within_budget(1900, 1000, 10, 50, 10, None, done=4) == 97
    # 850 s * 0.97 = 824.5 s: 74.5 s left holds 2 steps, under a quarter of an epoch: not worth a validation
    assert steps_within_budget(1850, 1000, 10, 50, 10, None, done=4) == 90
    assert steps_within_budget(1900, 1000, 10, 50, 10, 8, done=4) == 80  # the cap leaves no partial epoch


def budget_clock(monkeypatch, phantom_dir, tmp_path, seconds):
    """A fake clock for budgeted runs on the phantoms: each training step advances it by `seconds(trainer, step)` (the
    fake times dwarf the real ones). Returns the clock, the runs' config and their steps per epoch."""
    import time as real_time

    from lggdeploy.models import train as train_module
    from lggdeploy.models.train import Trainer

    offset = [0.0]
    clock = type("Clock", (), {"perf_counter": staticmethod(lambda: real_time.perf_counter() + offset[0])})
    monkeypatch.setattr(train_module, "time", clock)
    step = Trainer.train_step

    def timed_step(self, i):
        offset[0] += seconds(self, i)
        step(self, i)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    config = dict(model="pspnet-scratch", data=phantom_dir, batch_size=8, img_size=64, show_progress=False)
    probe = Trainer(TrainConfig(out=tmp_path / "probe", **config))
    probe.on_train_start()
    return clock, config, probe.steps_per_epoch


@pytest.mark.slow  # the budget arithmetic stays in the default set
def test_budget_sets_the_length_after_epoch_1_revises_it_and_ends_on_a_partial_epoch(
    phantom_dir, tmp_path, monkeypatch, caplog
):
    """On a fake clock every training step takes 10 s and epoch 2 runs 2,000 s slow (the machine got busy; the fake
    times dwarf the real ones): epoch 1 alone says the cap of 6 epochs fits in the budget, the median after epoch 2
    says 2 more whole epochs and a shorter last one, and the cosine is re-spanned over exactly those steps (past the
    middle the length may only shrink; the faster epochs after the slow one leave it as it is). Stopped before that
    last epoch and resumed, the run still ends on it."""
    from lggdeploy.models.train import PARTIAL_EPOCH_MIN_SHARE, steps_within_budget

    step_s, slow_s = 10.0, 2000.0

    class Killed(Exception):
        pass

    def seconds(trainer, i):
        if trainer.epoch == 5 and i == 0 and not trainer.resume_ckpt:
            raise Killed  # the run is stopped before its last epoch, then resumed
        return step_s + (slow_s if trainer.epoch == 2 and i == 0 else 0.0)

    _, config, s = budget_clock(monkeypatch, phantom_dir, tmp_path, seconds)
    median_epoch = s * step_s + slow_s / 2
    budget_s = (2 * s * step_s + slow_s) + 2.6 * median_epoch / 0.97  # after epoch 2: 2.6 median epochs are left
    caplog.set_level("INFO", logger="lggdeploy.models.train")
    with pytest.raises(Killed):
        train(
            TrainConfig(
                out=tmp_path / "b",
                epochs=6,
                budget_minutes=budget_s / 60,
                explicit=frozenset({"epochs", "budget_minutes"}),
                **config,
            )
        )
    again = dict(budget_minutes=budget_s / 60, explicit=frozenset({"budget_minutes"}))  # the command with --resume
    result = train(TrainConfig(out=tmp_path / "b", resume=True, **again, **config))
    last = load_checkpoint(result.last_path)
    budget = last["budget"]
    first, second = budget["decisions"]
    assert (first["after_epoch"], first["epochs"], first["steps"]) == (1, 6, 6 * s)
    assert second["after_epoch"] == 2 and second["median_epoch_seconds"] > slow_s / 2 > budget["epoch_1_seconds"]
    assert second["epochs"] == 5 and PARTIAL_EPOCH_MIN_SHARE * s <= second["last_epoch_steps"] < s
    assert second["steps"] == 4 * s + second["last_epoch_steps"]
    said = [r.getMessage() for r in caplog.records if "so the run trains" in r.getMessage()]
    assert said[0].endswith("so the run trains 6 epochs")  # both lengths said the same way
    assert said[1].endswith(f"5 epochs (the last {second['last_epoch_steps']} of {s} steps) instead of 6 epochs")
    rows = result.history[:2]
    measured_step_s = float(np.median([(r["seconds"] - r["val_seconds"]) / r["steps"] for r in rows]))
    val_s = float(np.median([r["val_seconds"] for r in rows]))
    assert measured_step_s == pytest.approx(median_epoch / s, rel=0.05) and val_s < 30  # timed apart
    decided = steps_within_budget(budget_s, second["elapsed_seconds"], measured_step_s, val_s, s, 6, done=2)
    assert decided == second["steps"]
    assert [row["steps"] for row in result.history] == [s, s, s, s, second["last_epoch_steps"]]
    assert len(result.history) == budget["epochs"] == last["train_config"]["epochs"] == last["schedule_epochs"] == 5
    assert last["schedule_steps"] == budget["steps"] == second["steps"]
    assert result.history[-1]["lr"] == pytest.approx(3e-4 * 0.01)  # the cosine ends with the partial epoch


@pytest.mark.slow
def test_a_machine_that_slows_down_after_the_middle_shortens_the_last_epoch_instead_of_overrunning(
    phantom_dir, tmp_path, monkeypatch, caplog
):
    """Fake clock: every step takes 10 s, from epoch 4 on 13 s (the machine got busy after the length was settled).
    Epochs 1-2 fit the cap of 6 epochs in the budget; the median of the last three epochs after epoch 5 says the last
    epoch no longer fits, so it is shortened and the run ends inside the budget, its cosine still reaching the floor."""
    from lggdeploy.models.train import PARTIAL_EPOCH_MIN_SHARE, RECENT_EPOCHS

    clock, config, s = budget_clock(
        monkeypatch, phantom_dir, tmp_path, lambda trainer, i: 13.0 if trainer.epoch >= 4 else 10.0
    )
    budget_s = 6 * s * 10.0 / 0.97 + 10  # 6 epochs at the first pace, with the margin and 10 s for validations
    caplog.set_level("INFO", logger="lggdeploy.models.train")
    started = clock.perf_counter()
    result = train(
        TrainConfig(
            out=tmp_path / "slow", epochs=6, budget_minutes=budget_s / 60,
            explicit=frozenset({"epochs", "budget_minutes"}), **config,
        )
    )  # fmt: skip
    took = clock.perf_counter() - started
    decisions = load_checkpoint(result.last_path)["budget"]["decisions"]
    assert [d["epochs"] for d in decisions[:2]] == [6, 6] and "shortened_from_steps" not in decisions[1]
    shrinks = decisions[2:]  # past the middle (epoch 3 of 6 on): only the checks that shortened the run are recorded
    assert shrinks and all(d["after_epoch"] >= 4 and d["recent_epochs"] == RECENT_EPOCHS for d in shrinks)
    assert shrinks[0]["shortened_from_steps"] == 6 * s
    assert all(b["steps"] < a["steps"] for a, b in zip(shrinks, shrinks[1:]))  # never lengthened again
    shrink = shrinks[-1]
    assert shrink["after_epoch"] == 5 and PARTIAL_EPOCH_MIN_SHARE * s <= shrink["last_epoch_steps"] < s
    assert [row["steps"] for row in result.history] == [s] * 5 + [shrink["last_epoch_steps"]]
    assert took < budget_s  # without the check: 5 x 10 s + 3 x 13 s per step of every epoch after the third, over
    assert 3 * s * 10 + 3 * s * 13 > budget_s
    assert result.history[-1]["lr"] == pytest.approx(3e-4 * 0.01)
    assert any("so the run ends after 6 epochs (the last" in r.getMessage() for r in caplog.records)


def test_resuming_a_run_from_before_the_recipe_options_keeps_its_recipe(phantom_dir, tmp_path):
    from lggdeploy.models.checkpoint import save_checkpoint
    from lggdeploy.models.train import LEGACY_RECIPE

    out = tmp_path / "old"
    kw = dict(model="pspnet-scratch", data=phantom_dir, out=out, batch_size=8, img_size=64, show_progress=False)
    train(TrainConfig(epochs=1, **kw))
    last = load_checkpoint(out / "last.pt")
    last["train_config"] = {
        k: v for k, v in last["train_config"].items() if k not in LEGACY_RECIPE
    }  # as an older lggdeploy wrote it
    last["normalization"] = {k: last["normalization"][k] for k in ("scale", "mean", "std")}
    last["history"] = [{k: v for k, v in row.items() if k not in ("steps", "val_seconds")} for row in last["history"]]
    del last["schedule_steps"]
    save_checkpoint(out / "last.pt", last)
    train(TrainConfig(epochs=2, resume=True, explicit=frozenset({"epochs"}), **kw))
    config = load_checkpoint(out / "last.pt")["train_config"]
    assert {k: config[k] for k in LEGACY_RECIPE} == LEGACY_RECIPE
    old_row, new_row = csv.DictReader(io.StringIO((out / "history.csv").read_text()))
    assert old_row["steps"] == "" and int(new_row["steps"]) > 0  # the old row keeps an empty cell


@pytest.mark.parametrize(
    "isa, auto, bf16_allowed",
    [
        (["avx2", "fma"], None, False),  # no native bf16: FP32, and an explicit bf16 is refused
        (
            ["avx2", "avx512f", "avx512_bf16"],
            None,
            True,
        ),  # AVX512-BF16 without AMX: measured slower, so auto stays FP32
        (["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"], torch.bfloat16, True),  # AMX: auto trains in bf16
    ],
)
def test_bf16_training_is_chosen_only_where_the_cpu_supports_it(monkeypatch, isa, auto, bf16_allowed):
    from lggdeploy.common import machine
    from lggdeploy.models.train import autocast_dtype

    monkeypatch.setattr(machine, "cpu_info", lambda: {"model": "test", "cores": 2, "isa": isa, "arch": "x86_64"})
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is auto
    assert autocast_dtype("fp32", cpu) is None
    if bf16_allowed:
        assert autocast_dtype("bf16", cpu) is torch.bfloat16
    else:
        with pytest.raises(LggError, match="no AVX512-BF16 or AMX"):
            autocast_dtype("bf16", cpu)
    with pytest.raises(LggError, match="only on CUDA"):
        autocast_dtype("fp16", cpu)


def test_the_auxiliary_loss_trains_its_head_resumes_it_and_stays_out_of_the_model(phantom_dir, tmp_path, monkeypatch):
    from lggdeploy.models.recipe import AuxiliaryHead

    calls, forward = [], AuxiliaryHead.forward

    def spy(self, size):
        logits = forward(self, size)
        calls.append(tuple(logits.shape))
        return logits

    monkeypatch.setattr(AuxiliaryHead, "forward", spy)
    out = tmp_path / "aux"
    kw = dict(model="pspnet-scratch", data=phantom_dir, out=out, batch_size=8, img_size=64, show_progress=False)
    train(TrainConfig(epochs=1, aux_weight=0.4, **kw))
    last = load_checkpoint(out / "last.pt")
    steps = last["history"][0]["steps"]
    assert len(calls) == steps and {shape[1:] for shape in calls} == {(1, 64, 64)}  # once a step, at the input's size
    head = last["aux_state_dict"]
    assert head["block.0.weight"].shape[1] == 256  # ResNeXt50's layer1, the stage under the pyramid pooling's input
    # The head is not part of the model: best.pt holds none of it and loads into the plain preset.
    best = load_checkpoint(out / "best.pt")
    assert best["train_config"]["aux_weight"] == 0.4 and "aux_state_dict" not in best
    assert not any(key.startswith("block.") for key in best["state_dict"])
    model_from_checkpoint(best)
    # --resume continues the head from where last.pt left it
    loaded = []
    original = AuxiliaryHead.load_state_dict
    monkeypatch.setattr(
        AuxiliaryHead, "load_state_dict", lambda self, s, *a, **k: loaded.append(s) or original(self, s)
    )
    train(TrainConfig(epochs=2, resume=True, explicit=frozenset({"epochs"}), **kw))
    assert loaded and torch.equal(loaded[0]["block.0.weight"], head["block.0.weight"])
    after = load_checkpoint(out / "last.pt")["aux_state_dict"]["block.0.weight"]
    assert not torch.equal(after, head["block.0.weight"])  # and trains it on
    with pytest.raises(LggError, match="--aux-weight must lie between 0"):
        train(TrainConfig(model="pspnet-scratch", data=phantom_dir, out=tmp_path / "x", epochs=2, aux_weight=-1))

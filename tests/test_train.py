import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lggdeploy.cli import app
from lggdeploy.common.errors import LggError
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.transforms import Augmentation, preprocess, resize_masks
from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of, split_of
from lggdeploy.models.recipe import segmentation_loss
from lggdeploy.models.train import TrainConfig, train

HISTORY_COLUMNS = {
    "epoch",
    "train_loss",
    "train_dice",
    "train_iou",
    "train_accuracy",
    "val_loss",
    "val_mean_patient_dice",
    "val_mean_patient_iou",
    "val_pixel_accuracy",
}


def test_training_writes_history_curves_and_checkpoints(trained_run, phantom_dir):
    out = trained_run.best_path.parent
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert HISTORY_COLUMNS <= set(rows[0])
    assert json.loads((out / "history.json").read_text())[1]["epoch"] == 2
    assert json.loads((out / "split.json").read_text())["format"] == "lggdeploy-split"
    # The recorded validation loss is the loss of last.pt's weights on the val slices, recomputed here.
    ckpt = load_checkpoint(trained_run.last_path)
    slices = load_slices(load_dataset(phantom_dir), split_of(ckpt).val)
    model = model_from_checkpoint(ckpt)
    x = torch.from_numpy(preprocess(slices.images, ckpt["img_size"], normalization_of(ckpt)))
    y = torch.from_numpy(resize_masks(slices.masks, ckpt["img_size"])).unsqueeze(1).float()
    with torch.no_grad():
        kind = ckpt["train_config"]["loss"]
        losses = [
            segmentation_loss(model(x[i : i + 16]), y[i : i + 16], kind).item() * len(x[i : i + 16])
            for i in range(0, len(x), 16)
        ]
    assert float(rows[1]["val_loss"]) == pytest.approx(sum(losses) / len(x), rel=1e-4)


def test_curves_show_every_series(trained_run):
    """Each of the four panels holds a train (blue) and a validation (orange) line."""
    pixels = np.asarray(Image.open(trained_run.best_path.parent / "curves.png").convert("RGB")).astype(int)
    blue, orange = np.array([31, 119, 180]), np.array([255, 127, 14])
    width = pixels.shape[1] // 4
    for panel in range(4):
        part = pixels[:, panel * width : (panel + 1) * width]
        for colour in (blue, orange):
            assert (np.abs(part - colour).sum(axis=2) < 30).sum() > 20, (panel, colour)


def small(phantom_dir, out, **kw):
    return TrainConfig(
        model="pspnet-scratch", data=phantom_dir, out=out, batch_size=8, img_size=64, show_progress=False, **kw
    )


def test_resume_continues_where_it_stopped(phantom_dir, tmp_path):
    out = tmp_path / "run"
    train(small(phantom_dir, out, epochs=1))
    with pytest.raises(LggError, match="pass --resume"):
        train(small(phantom_dir, out, epochs=2))
    with pytest.raises(LggError, match="already finished epoch 1 of 1"):
        train(small(phantom_dir, out, resume=True))  # the run's own --epochs
    result = train(small(phantom_dir, out, epochs=2, resume=True))  # more epochs: allowed, recorded
    assert [row["epoch"] for row in result.history] == [1, 2]
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 2 and last["train_config"]["epochs"] == 2 and last["schedule_epochs"] == 1
    assert last["resumes"] == [{"after_epoch": 1, "changed": {"epochs": [1, 2]}}]
    assert result.history[1]["lr"] == pytest.approx(3e-4 * 0.01)  # past the original schedule: its final lr
    with pytest.raises(LggError, match="no .*last.pt to resume"):
        train(small(phantom_dir, tmp_path / "fresh", epochs=1, resume=True))


def test_resume_refuses_flags_that_contradict_the_run(phantom_dir, tmp_path):
    out = tmp_path / "run"
    train(small(phantom_dir, out, epochs=1))
    for change, flag in (
        (dict(img_size=128), "--img-size 128"),
        (dict(lr=0.1), "--lr 0.1"),
        (dict(batch_size=4), "--batch-size 4"),
    ):
        with pytest.raises(LggError, match=f"other settings: {flag} "):
            train(
                TrainConfig(
                    model="pspnet-scratch",
                    data=phantom_dir,
                    out=out,
                    epochs=2,
                    resume=True,
                    show_progress=False,
                    **change,
                )
            )
    assert load_checkpoint(out / "last.pt")["epoch"] == 1  # nothing was trained or written
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            "pspnet-scratch",
            "--data",
            str(phantom_dir),
            "--out",
            str(out),
            "--resume",
            "--img-size",
            "64",
            "--epochs",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output  # the run's own value, given again, is fine
    assert load_checkpoint(out / "best.pt")["img_size"] == load_checkpoint(out / "last.pt")["img_size"] == 64


def interrupt_in_epoch(monkeypatch, out, epoch):
    """Raise KeyboardInterrupt in the second augmentation call of `epoch` (after epoch-1's checkpoint exists)."""
    original = Augmentation.__call__
    calls = {"n": 0}

    def interrupt(self, *args, **kwargs):
        if (out / "last.pt").exists() and load_checkpoint(out / "last.pt")["epoch"] == epoch - 1:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Augmentation, "__call__", interrupt)
    return original


RECIPE = dict(loss="image-dice", tumor_fraction=0.5, warmup_epochs=0.5, ema_decay=0.9, tune_threshold=True)


@pytest.mark.parametrize("recipe", [{}, pytest.param(RECIPE, marks=pytest.mark.slow)], ids=["defaults", "recipe"])
def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(phantom_dir, tmp_path, monkeypatch, recipe):
    straight = train(small(phantom_dir, tmp_path / "straight", epochs=2, **recipe))
    out = tmp_path / "interrupted"
    original = interrupt_in_epoch(monkeypatch, out, 2)
    with pytest.raises(KeyboardInterrupt):
        train(small(phantom_dir, out, epochs=2, **recipe))
    monkeypatch.setattr(Augmentation, "__call__", original)
    resumed = train(small(phantom_dir, out, resume=True))  # the recipe comes back from last.pt
    a, b = load_checkpoint(straight.last_path), load_checkpoint(resumed.last_path)
    for key, tensor in a["state_dict"].items():
        assert torch.allclose(tensor.float(), b["state_dict"][key].float(), rtol=0, atol=1e-6), key
    if recipe:  # the EMA and its best.pt come back too
        for key, tensor in a["ema_state_dict"].items():
            assert torch.allclose(tensor.float(), b["ema_state_dict"][key].float(), rtol=0, atol=1e-6), key
        assert b["train_config"]["loss"] == "image-dice" and b["train_config"]["ema_decay"] == 0.9
        assert load_checkpoint(straight.best_path)["threshold"] == load_checkpoint(resumed.best_path)["threshold"]
    assert [r["train_loss"] for r in straight.history] == pytest.approx(
        [r["train_loss"] for r in resumed.history], rel=1e-6
    )
    assert b["rng_states"][0]["numpy"] and b["rng_states"][0]["python"]


def test_interrupt_leaves_last_good_checkpoint(phantom_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = Augmentation.__call__
    calls = {"after_epoch_1": 0}

    def interrupt_in_epoch_2(self, *args, **kwargs):
        if (out / "last.pt").exists():
            calls["after_epoch_1"] += 1
            if calls["after_epoch_1"] == 2:
                raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Augmentation, "__call__", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(small(phantom_dir, out, epochs=3))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and load_checkpoint(out / "best.pt")["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(Augmentation, "__call__", original)
    assert [r["epoch"] for r in train(small(phantom_dir, out, epochs=2, resume=True)).history] == [1, 2]


def test_bad_training_options_are_clear(phantom_dir, tmp_path):
    with pytest.raises(LggError, match="--img-size must be a multiple of 32"):
        train(
            small(phantom_dir, tmp_path / "a", epochs=1).__class__(
                model="pspnet-scratch", data=phantom_dir, out=tmp_path / "a", img_size=100
            )
        )
    with pytest.raises(LggError, match="does not exist"):
        train(TrainConfig(model="pspnet-scratch", data=tmp_path / "missing", out=tmp_path / "b", img_size=64))
    with pytest.raises(LggError, match="unknown model"):
        train(TrainConfig(model="unet-effb9", data=phantom_dir, out=tmp_path / "c", img_size=64))


@pytest.mark.slow
def test_ddp_through_torchrun_on_cpu(phantom_dir, tmp_path):
    """Two gloo processes on the CPU: the same code path multi-GPU training takes with nccl."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "lggdeploy.cli",
        "train",
        "--model",
        "pspnet-scratch",
        "--data",
        str(phantom_dir),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--img-size",
        "64",
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["state_dict"])


@pytest.mark.slow
def test_pspnet_scratch_learns_on_real_patients(real_data, tmp_path):
    """Accuracy judged on real patients: a few CPU epochs lift validation per-patient Dice far above trivial."""
    result = train(
        TrainConfig(
            model="pspnet-scratch",
            data=real_data,
            out=tmp_path / "real",
            epochs=4,
            batch_size=8,
            img_size=128,
            lr=1e-3,
            show_progress=False,
        )
    )
    # Trivial predictors: all-background scores 0; all-tumor scores 2f/(1+f) with f the tumor pixel fraction (<2%).
    assert result.best["val_mean_patient_dice"] > 0.5, result.history

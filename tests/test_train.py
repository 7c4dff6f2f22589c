import csv
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from lggdeploy.models.checkpoint import load_checkpoint
from lggdeploy.data.transforms import Augmentation
from lggdeploy.common.errors import LggError
from lggdeploy.models.train import TrainConfig, train

HISTORY_COLUMNS = {"epoch", "train_loss", "train_dice", "train_iou", "train_accuracy", "val_loss", "val_mean_patient_dice", "val_mean_patient_iou", "val_pixel_accuracy"}


def test_training_writes_history_curves_and_checkpoints(trained_run):
    out = trained_run.best_path.parent
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert HISTORY_COLUMNS <= set(rows[0])
    assert json.loads((out / "history.json").read_text())[1]["epoch"] == 2
    assert Image.open(out / "curves.png").size[0] > 1000
    assert json.loads((out / "split.json").read_text())["format"] == "lggdeploy-split"
    assert float(rows[0]["train_loss"]) > 0


def small(phantom_dir, out, **kw):
    return TrainConfig(model="pspnet-scratch", data=phantom_dir, out=out, batch_size=8, img_size=64, show_progress=False, **kw)


def test_resume_continues_where_it_stopped(phantom_dir, tmp_path):
    out = tmp_path / "run"
    train(small(phantom_dir, out, epochs=1))
    with pytest.raises(LggError, match="pass --resume"):
        train(small(phantom_dir, out, epochs=2))
    result = train(small(phantom_dir, out, epochs=2, resume=True))
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    with pytest.raises(LggError, match="already finished epoch 2"):
        train(small(phantom_dir, out, epochs=2, resume=True))
    with pytest.raises(LggError, match="no .*last.pt to resume"):
        train(small(phantom_dir, tmp_path / "fresh", epochs=1, resume=True))


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
        train(small(phantom_dir, tmp_path / "a", epochs=1).__class__(model="pspnet-scratch", data=phantom_dir, out=tmp_path / "a", img_size=100))
    with pytest.raises(LggError, match="does not exist"):
        train(TrainConfig(model="pspnet-scratch", data=tmp_path / "missing", out=tmp_path / "b", img_size=64))
    with pytest.raises(LggError, match="unknown model"):
        train(TrainConfig(model="unet-effb9", data=phantom_dir, out=tmp_path / "c", img_size=64))


def test_ddp_through_torchrun_on_cpu(phantom_dir, tmp_path):
    """Two gloo processes on the CPU: the same code path multi-GPU training takes with nccl."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lggdeploy.cli", "train",
           "--model", "pspnet-scratch", "--data", str(phantom_dir), "--out", str(out), "--epochs", "1", "--img-size", "64",
           "--batch-size", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["state_dict"])


@pytest.mark.slow
def test_pspnet_scratch_learns_on_real_patients(real_data, tmp_path):
    """Accuracy judged on real patients: a few CPU epochs lift validation per-patient Dice far above trivial."""
    result = train(TrainConfig(model="pspnet-scratch", data=real_data, out=tmp_path / "real", epochs=4, batch_size=8, img_size=128, lr=1e-3, show_progress=False))
    # Trivial predictors: all-background scores 0; all-tumor scores 2f/(1+f) with f the tumor pixel fraction (<2%).
    assert result.best["val_mean_patient_dice"] > 0.5, result.history

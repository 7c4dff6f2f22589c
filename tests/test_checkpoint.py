import pytest
import torch

from lggdeploy.common.errors import CheckpointError
from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, spec_of, split_of


def test_checkpoint_describes_itself(trained_run):
    ckpt = load_checkpoint(trained_run.best_path)
    assert spec_of(ckpt).name == "pspnet-scratch"
    assert (
        ckpt["img_size"] == 64 and ckpt["threshold"] == 0.5 and "threshold_tuning" not in ckpt
    )  # tuning is off by default
    assert ckpt["normalization"]["mean"] == [0.485, 0.456, 0.406] and ckpt["normalization"]["mode"] == "slice"
    assert ckpt["dropped_modules"] == ["encoder.layer3", "encoder.layer4"]
    assert not any(k.startswith("encoder.layer4") for k in ckpt["state_dict"])
    assert split_of(ckpt).val and ckpt["best"]["epoch"] in (1, 2)
    assert len(ckpt["history"]) >= ckpt["best"]["epoch"]
    assert "optimizer" not in ckpt and "optimizer" in load_checkpoint(trained_run.last_path)
    model = model_from_checkpoint(ckpt)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 64, 64)


def test_bad_checkpoints_are_clear_errors(tmp_path, trained_run):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "corrupt.pt").write_bytes(trained_run.best_path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "corrupt.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an lggdeploy checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, trained_run, monkeypatch):
    target = tmp_path / "best.pt"
    ckpt = load_checkpoint(trained_run.best_path)
    ckpt.pop("path")
    save_checkpoint(target, ckpt)
    before = target.read_bytes()

    def dying_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, ckpt)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temp file left behind


def test_a_whole_pickled_model_is_named_for_what_it_is(tmp_path):
    torch.save(torch.nn.Conv2d(3, 1, 1), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt: holds pickled Python objects .*not an lggdeploy checkpoint"):
        load_checkpoint(tmp_path / "model.pt")

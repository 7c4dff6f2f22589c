"""Structured pruning: shapes, checkpoint round trip, export parity of a pruned model, bad input."""

import sys

import pytest
import torch
from typer.testing import CliRunner

from lggdeploy.cli import app
from lggdeploy.common.errors import LggError
from lggdeploy.engines.export import export_checkpoint
from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint
from lggdeploy.models.networks import build_model
from lggdeploy.models.presets import PRESETS
from lggdeploy.models.prune import prune_checkpoint, prune_model

pytest.importorskip("torch_pruning", reason="torch-pruning is the optional [prune] extra")


@pytest.mark.parametrize("name", ["pspnet-scratch", "unet-effb7"])
def test_pruned_model_keeps_its_output_shape_and_gets_smaller(name):
    model = build_model(PRESETS[name], "random").model
    recipe = prune_model(model, 64, ratio=0.3)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 1, 64, 64)
    assert recipe["params_after"] < recipe["params_before"] and recipe["macs_after"] < recipe["macs_before"]
    assert model.segmentation_head[0].out_channels == 1
    if name == "pspnet-scratch":  # ResNeXt's grouped 3x3 convolutions keep a valid group structure
        grouped = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
        assert grouped and all(m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0 for m in grouped)


@pytest.mark.slow
def test_pruned_checkpoint_round_trip_export_and_accumulating_recipe(segmenting_run, phantom_dir, tmp_path):
    first = prune_checkpoint(
        segmenting_run.best_path, 0.3, tmp_path / "p30", finetune_epochs=1, data=phantom_dir, distill_weight=0.8
    )
    ckpt = load_checkpoint(first)
    assert len(ckpt["pruning"]) == 1 and ckpt["pruning"][0]["ratio"] == 0.3 and ckpt["pruning"][0]["finetune"]
    assert ckpt["pruning"][0]["distillation"]["weight"] == 0.8
    # Fine-tuning trains with the original's missing-sequence share (0 for this model), not today's default (0.2).
    stage = load_checkpoint(tmp_path / "p30" / "stage1" / "last.pt")
    assert stage["train_config"]["distill_weight"] == 0.8 and stage["train_config"]["teacher"] == str(
        segmenting_run.best_path
    )
    assert (
        stage["train_config"]["missing_modality"]
        == load_checkpoint(segmenting_run.best_path)["train_config"]["missing_modality"]
        == 0.0
    )
    model = model_from_checkpoint(ckpt)
    assert sum(p.numel() for p in model.parameters()) == ckpt["pruning"][0]["params_after"]
    path, record = export_checkpoint(
        first, tmp_path / "engines", phantom_dir
    )  # the parity gate holds for the pruned net
    assert record["parity"]["passed"]
    second = prune_checkpoint(first, 0.2, tmp_path / "p30-20")
    again = load_checkpoint(second)
    assert [r["ratio"] for r in again["pruning"]] == [0.3, 0.2]
    assert again["pruning"][1]["params_after"] < again["pruning"][0]["params_after"]
    assert (
        again["history"] == [] and again["best"]["val_mean_patient_dice"] is None
    )  # not fine-tuned: no scores carried over


def test_prune_bad_input_is_clear(segmenting_run, tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(app, ["prune", str(segmenting_run.best_path), "--ratio", "1.5", "-o", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--ratio 1.5: must lie in (0, 1)" in result.output
    result = runner.invoke(
        app,
        [
            "prune",
            str(segmenting_run.best_path),
            "--ratio",
            "0.3",
            "--finetune-epochs",
            "1",
            "--data",
            str(tmp_path / "nodata"),
            "-o",
            str(tmp_path / "b"),
        ],
    )
    assert result.exit_code == 2 and "nodata" in result.output
    result = runner.invoke(
        app,
        ["prune", str(segmenting_run.best_path), "--ratio", "0.3", "--distill-weight", "0", "-o", str(tmp_path / "w")],
    )
    assert (
        result.exit_code == 2
        and "--distill-weight 0.0: must lie in (0, 1]" in result.output
        and not (tmp_path / "w").exists()
    )
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # as if the extra were not installed
    with pytest.raises(LggError, match="pip install 'lggdeploy\\[prune\\]'"):
        prune_checkpoint(segmenting_run.best_path, 0.3, tmp_path / "c")

import json

import pytest

from lggdeploy.demo import run_demo


@pytest.mark.slow  # the default set runs the demo in test_the_demo_rows_tell_the_presets_apart
def test_demo_pipeline_end_to_end_small(tmp_path):
    results = run_demo(
        tmp_path / "demo", patients=4, presets=["pspnet-scratch"], epochs={"pspnet-scratch": 1}, engines=False
    )
    assert [row["model"] for row in results["rows"]] == ["pspnet-scratch"]
    assert (tmp_path / "demo" / "results.md").read_text().count("pspnet-scratch") == 1
    summary = json.loads((tmp_path / "demo" / "runs" / "pspnet-scratch" / "eval_test.json").read_text())
    assert (
        summary["per_patient"] and results["rows"][0]["mean_patient_dice"] == summary["aggregates"]["mean_patient_dice"]
    )
    assert [r["patient"] for r in summary["per_patient"]] == json.loads((tmp_path / "demo" / "split.json").read_text())[
        "test"
    ]
    again = run_demo(
        tmp_path / "demo", patients=4, presets=["pspnet-scratch"], epochs={"pspnet-scratch": 1}, engines=False
    )  # re-runnable
    assert again["rows"][0]["mean_patient_dice"] == results["rows"][0]["mean_patient_dice"]


def test_the_demo_rows_tell_the_presets_apart(tmp_path):
    """pspnet-resnext50 starts from the encoder pspnet-scratch just trained (the transfer path, offline): another model,
    another row, and the table (its note under the *) says where its encoder came from."""
    from lggdeploy.models.checkpoint import load_checkpoint

    presets = ["pspnet-scratch", "pspnet-resnext50"]
    results = run_demo(tmp_path / "demo", patients=4, presets=presets, epochs=dict.fromkeys(presets, 1), engines=False)
    scratch, transfer = results["rows"]
    assert scratch["encoder_weights"] == "random" and transfer["encoder_weights"] == "pspnet-scratch*"
    assert "pspnet-resnext50 starts from pspnet-scratch's encoder" in (tmp_path / "demo" / "results.md").read_text()
    recorded = load_checkpoint(tmp_path / "demo" / "runs" / "pspnet-resnext50" / "best.pt")["encoder_weights"]
    assert recorded == f"file:{tmp_path / 'demo' / 'runs' / 'pspnet-scratch' / 'best.pt'}"
    # Before, both trained from the same random init and seed on the same data: bit-identical weights, identical rows.
    runs = tmp_path / "demo" / "runs"
    a, b = (load_checkpoint(runs / name / "best.pt")["state_dict"] for name in presets)
    assert any(not a[k].equal(b[k]) for k in a if k.startswith("encoder."))

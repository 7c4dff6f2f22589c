import json

from lggdeploy.demo import run_demo


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

import json

from typer.testing import CliRunner

from lggdeploy.cli import app

runner = CliRunner()


def test_eval_writes_per_patient_rows_and_aggregates(trained_run, phantom_dir, tmp_path):
    out = tmp_path / "summary.json"
    result = runner.invoke(app, ["eval", str(trained_run.best_path), "--data", str(phantom_dir), "--split", "val", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    val_patients = json.loads((trained_run.best_path.parent / "split.json").read_text())["val"]
    assert [row["patient"] for row in summary["per_patient"]] == val_patients
    assert summary["aggregates"]["slices"] == sum(row["slices"] for row in summary["per_patient"])
    assert "mean per-patient Dice" in result.output
    result = runner.invoke(app, ["eval", str(trained_run.best_path), "--data", str(phantom_dir), "--split", "all", "--out", str(out)])
    assert len(json.loads(out.read_text())["per_patient"]) == 6


def one_clear_line(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = result.output.strip()
    assert text.startswith("error:"), text
    for needle in needles:
        assert needle in text, text


def test_user_mistakes_get_one_clear_line(tmp_path, phantom_dir, trained_run):
    one_clear_line(runner.invoke(app, ["train", "--model", "nope", "--data", str(phantom_dir), "--out", str(tmp_path / "r")]), "unknown model", "nope")
    one_clear_line(runner.invoke(app, ["eval", str(tmp_path / "missing.pt"), "--data", str(phantom_dir)]), "missing.pt", "does not exist")
    one_clear_line(runner.invoke(app, ["eval", str(trained_run.best_path), "--data", str(tmp_path / "nodata")]), "nodata", "does not exist")
    one_clear_line(runner.invoke(app, ["data", "split", str(phantom_dir), "--ratios", "0.5,0.5"]), "exactly three")
    one_clear_line(runner.invoke(app, ["eval", str(trained_run.best_path), "--data", str(phantom_dir), "--split", "holdout"]), "unknown split")


def test_data_commands(tmp_path, phantom_dir):
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "ph"), "--patients", "3", "--min-slices", "6", "--max-slices", "6"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["data", "check", str(tmp_path / "ph")]).exit_code == 0
    result = runner.invoke(app, ["data", "split", str(phantom_dir), "-o", str(tmp_path / "s.json"), "--seed", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "info", str(phantom_dir), "--split-file", str(tmp_path / "s.json")])
    assert result.exit_code == 0 and "tumor fraction" in result.output

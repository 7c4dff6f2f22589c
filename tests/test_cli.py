import json
from pathlib import Path

from typer.testing import CliRunner

from lggdeploy.cli import app

runner = CliRunner()


def test_eval_writes_per_patient_rows_and_aggregates(trained_run, phantom_dir, tmp_path):
    out = tmp_path / "summary.json"
    result = runner.invoke(
        app, ["eval", str(trained_run.best_path), "--data", str(phantom_dir), "--split", "val", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    val_patients = json.loads((trained_run.best_path.parent / "split.json").read_text())["val"]
    assert [row["patient"] for row in summary["per_patient"]] == val_patients
    assert summary["aggregates"]["slices"] == sum(row["slices"] for row in summary["per_patient"])
    assert "mean per-patient Dice" in result.output
    result = runner.invoke(
        app, ["eval", str(trained_run.best_path), "--data", str(phantom_dir), "--split", "all", "--out", str(out)]
    )
    assert len(json.loads(out.read_text())["per_patient"]) == 6


def one_clear_line(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = result.output.strip()
    assert text.startswith("error:"), text
    for needle in needles:
        assert needle in text, text


def test_user_mistakes_get_one_clear_line(tmp_path, phantom_dir, trained_run):
    one_clear_line(
        runner.invoke(app, ["train", "--model", "nope", "--data", str(phantom_dir), "--out", str(tmp_path / "r")]),
        "unknown model",
        "nope",
    )
    one_clear_line(
        runner.invoke(app, ["eval", str(tmp_path / "missing.pt"), "--data", str(phantom_dir)]),
        "missing.pt",
        "does not exist",
    )
    one_clear_line(
        runner.invoke(app, ["eval", str(trained_run.best_path), "--data", str(tmp_path / "nodata")]),
        "nodata",
        "does not exist",
    )
    one_clear_line(runner.invoke(app, ["data", "split", str(phantom_dir), "--ratios", "0.5,0.5"]), "exactly three")
    one_clear_line(
        runner.invoke(app, ["eval", str(trained_run.best_path), "--data", str(phantom_dir), "--split", "holdout"]),
        "unknown split",
    )


def test_data_commands(tmp_path, phantom_dir):
    result = runner.invoke(
        app, ["data", "synth", str(tmp_path / "ph"), "--patients", "3", "--min-slices", "6", "--max-slices", "6"]
    )
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["data", "check", str(tmp_path / "ph")]).exit_code == 0
    result = runner.invoke(app, ["data", "split", str(phantom_dir), "-o", str(tmp_path / "s.json"), "--seed", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "info", str(phantom_dir), "--split-file", str(tmp_path / "s.json")])
    assert result.exit_code == 0 and "tumor fraction" in result.output


def test_every_command_keeps_the_error_promise(tmp_path, phantom_dir, trained_run):
    """README: a user's mistake prints one line (what, which file, what to do), exits 2, no traceback, nothing
    half-written. Every command, once with an output path under a regular file and once with a bad flag value."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = blocker / "out"
    ckpt = str(trained_run.best_path)
    data = str(phantom_dir)
    cases = {
        "data split (output)": ["data", "split", data, "-o", str(bad / "split.json")],
        "data split (flag)": ["data", "split", data, "--ratios", "0.5,0.6,x", "-o", str(tmp_path / "s.json")],
        "data synth (output)": ["data", "synth", str(blocker)],
        "data synth (flag)": ["data", "synth", str(tmp_path / "ph"), "--patients", "0"],
        "train (output)": [
            "train",
            "--model",
            "pspnet-scratch",
            "--data",
            data,
            "--out",
            str(bad),
            "--epochs",
            "1",
            "--img-size",
            "64",
        ],
        "train (flag)": [
            "train",
            "--model",
            "pspnet-scratch",
            "--data",
            data,
            "--out",
            str(tmp_path / "t"),
            "--batch-size",
            "1",
        ],
        "train (device)": [
            "train",
            "--model",
            "pspnet-scratch",
            "--data",
            data,
            "--out",
            str(tmp_path / "t2"),
            "--device",
            "foo",
        ],
        "eval (output)": ["eval", ckpt, "--data", data, "-o", str(bad / "e.json")],
        "eval (batch size)": ["eval", ckpt, "--data", data, "--batch-size", "0"],
        "eval (device)": ["eval", ckpt, "--data", data, "--device", "foo"],
        "prune (output)": ["prune", ckpt, "--ratio", "0.3", "-o", str(bad)],
        "prune (flag)": ["prune", ckpt, "--ratio", "-0.3", "-o", str(tmp_path / "p")],
        "export (output)": ["export", ckpt, "--data", data, "-o", str(bad)],
        "build (output)": ["build", ckpt, "--data", data, "-o", str(bad)],
        "build (flag)": ["build", ckpt, "--data", data, "-o", str(tmp_path / "b"), "--max-drop", "-1"],
        "bench (output)": ["bench", str(tmp_path), "--data", data, "--out", str(bad)],
        "bench (flag)": ["bench", str(tmp_path), "--data", data, "--iters", "0"],
        "predict (output)": ["predict", str(tmp_path / "none.onnx"), data, "-o", str(bad)],
        "demo (output)": ["demo", "--out", str(bad)],
    }
    import torch

    if not torch.cuda.is_available():
        cases["eval (no GPU)"] = ["eval", ckpt, "--data", data, "--device", "cuda"]
    for name, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (name, result.exit_code, result.output)
        text = result.output.strip()
        assert "Traceback" not in text and text.count("error:") == 1, (name, result.output)
        assert text.startswith("error:") or "\nerror:" in text, (name, result.output)
        assert len(text[text.index("error:") :].splitlines()) <= 3, (
            name,
            result.output,
        )  # one line (the console may wrap it)
    assert blocker.read_text() == "not a folder" and not (tmp_path / "t").exists() and not (tmp_path / "p").exists()


def test_failed_training_start_leaves_no_folder(tmp_path, phantom_dir):
    for args in (
        ["--model", "nope"],
        ["--model", "pspnet-resnext50", "--encoder-weights", str(tmp_path / "absent.pth")],
    ):
        result = runner.invoke(app, ["train", *args, "--data", str(phantom_dir), "--out", str(tmp_path / "run")])
        assert result.exit_code == 2, result.output
        assert not (tmp_path / "run").exists()


def test_sigterm_cleans_up_and_exits_143(tmp_path, monkeypatch, trained_run, phantom_dir):
    import os
    import signal

    import lggdeploy.engines.build as build_module
    from lggdeploy.common.files import temporary_folder

    def terminated_mid_build(ctx, fmt):
        with temporary_folder(ctx.folder) as work:
            (Path(work) / "half.onnx").write_bytes(b"x" * 100)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(build_module, "build_one", terminated_mid_build)
    result = runner.invoke(
        app, ["build", str(trained_run.best_path), "--data", str(phantom_dir), "-o", str(tmp_path / "engines")]
    )
    assert result.exit_code == 143 and "terminated" in result.output
    leftovers = [p for p in (tmp_path / "engines").rglob("*") if p.name.startswith((".build-", "."))]
    assert leftovers == []


def test_doctor_names_the_cpu_by_family_and_model_too():
    """An AMD 'model name' can be just 'AMD EPYC' (Zen 3 AVX2-only and Zen 4 AVX-512 alike): doctor, bench and optimize
    name the CPU with the family / model numbers /proc/cpuinfo gives, as a record kept before them is named without."""
    from lggdeploy.common.machine import cpu_info, cpu_line

    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    cpu = cpu_info()
    assert f"CPU: {cpu_line(cpu)};" in " ".join(result.output.split())
    if "cpu family" in Path("/proc/cpuinfo").read_text():
        assert isinstance(cpu["family"], int) and f"(family {cpu['family']} model {cpu['model_number']})" in cpu_line(
            cpu
        )
    assert cpu_line({"model": "AMD EPYC", "cores": 2, "isa": ["avx2", "fma"]}) == "AMD EPYC, 2 cores (avx2, fma)"
    assert (
        cpu_line({"model": "X", "family": 6, "model_number": 143, "cores": 8, "isa": []}, threads=2)
        == "X (family 6 model 143), 2 threads (no AVX2, AVX-512 or AMX)"
    )

"""bench: statistics on known inputs, and a real run over engines built from a model trained in the tests."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from lggdeploy.backends import availability
from lggdeploy.bench.report import _delta_text, write_all
from lggdeploy.bench.run import BenchOptions, run_bench
from lggdeploy.bench.stats import latency_summary, paired_bootstrap_ci, paired_summary, pareto_front
from lggdeploy.cli import app
from lggdeploy.common.errors import LggError
from lggdeploy.engines.build import BuildOptions, build_engines
from lggdeploy.engines.formats import manifest_path
from lggdeploy.models.checkpoint import load_checkpoint
from tests.conftest import manifest_for


def test_latency_percentiles_on_known_inputs():
    s = latency_summary([0.010, 0.020, 0.030, 0.040, 0.050], batch=2)  # seconds
    assert s["p50_ms"] == pytest.approx(30.0)
    assert s["iqr_ms"] == pytest.approx(20.0)  # 40 - 20
    assert s["p90_ms"] == pytest.approx(46.0)  # linear interpolation: 40 + 0.6 * 10
    assert s["p99_ms"] is None and s["max_ms"] == pytest.approx(50.0)  # 5 runs cannot estimate a p99
    assert s["p50_ms_per_image"] == pytest.approx(15.0)
    assert s["images_per_s"] == pytest.approx(2 / 0.030)
    many = latency_summary(np.linspace(0.001, 0.100, 100), batch=1)
    assert many["p99_ms"] == pytest.approx(99.01)


def test_paired_bootstrap_on_known_inputs():
    assert paired_bootstrap_ci([-0.5] * 7) == (-0.5, -0.5, -0.5)
    mean, lo, hi = paired_bootstrap_ci([0.0, 1.0, 2.0, 3.0, 4.0], reps=5000, seed=1)
    assert mean == 2.0 and lo < 2.0 < hi
    assert 0.6 < lo < 1.4 and 2.6 < hi < 3.4  # the mean of 5 draws from {0..4}: sd ~0.63
    assert paired_bootstrap_ci([0.0, 1.0, 2.0, 3.0, 4.0], seed=1) == paired_bootstrap_ci(
        [0.0, 1.0, 2.0, 3.0, 4.0], seed=1
    )


def test_no_interval_below_five_patients():
    two = paired_summary({"A": -0.52, "B": -0.51})
    assert two["n"] == 2 and two["ci95"] is None and "no interval" in two["note"]
    assert (two["min"], two["max"]) == (-0.52, -0.51) and two["mean"] == pytest.approx(-0.515)
    five = paired_summary({p: d for p, d in zip("ABCDE", (0.0, 1.0, 2.0, 3.0, 4.0))})
    assert five["n"] == 5 and five["ci95"][0] < 2.0 < five["ci95"][1] and "note" not in five
    text = _delta_text(two)
    assert "no interval" in text and "n=2" in text and "[" not in text


def test_pareto_front():
    points = [(10, 0.80), (5, 0.70), (20, 0.85), (12, 0.75), (5, 0.60)]
    assert pareto_front(points) == [1, 0, 2]


@pytest.fixture(scope="module")
def engines(segmenting_run, phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_engines")
    report = build_engines([segmenting_run.best_path], BuildOptions(out_dir=out, data=phantom_dir, precision="fp32"))
    return out, report.engines[0]["engine"]


def _nan_engine(source, folder):
    """A copy of an engine whose logits are all NaN (output multiplied by NaN)."""
    model = onnx.load(source)
    out = model.graph.output[0].name
    model.graph.node[-1].output[0] = out + "_pre"
    model.graph.initializer.append(numpy_helper.from_array(np.array([np.nan], np.float32), "nan_scale"))
    model.graph.node.append(helper.make_node("Mul", [out + "_pre", "nan_scale"], [out]))
    target = folder / "onnxruntime-fp16.onnx"
    onnx.save(model, str(target))
    manifest_for(target, source, precision="fp16")
    return target


def test_bench_rows_reference_nan_and_unavailable(engines, phantom_dir, tmp_path):
    out, fp32_engine = engines
    folder = tmp_path / "engines" / "model"
    folder.mkdir(parents=True)
    shutil.copy(fp32_engine, folder)
    shutil.copy(manifest_path(fp32_engine), folder)
    _nan_engine(fp32_engine, folder)
    plan = folder / "tensorrt-fp16.plan"
    plan.write_bytes(b"not a real plan")
    manifest_for(
        plan, fp32_engine, backend="tensorrt", precision="fp16", tensorrt_version="10.16.0", compute_capability="9.0"
    )

    results = run_bench(
        BenchOptions(
            engines_dir=tmp_path / "engines", data=phantom_dir, split="val", batch_sizes=(1, 2), iters=3, warmup=1
        )
    )
    rows = {(r["backend"], r["precision"]): r for r in results["rows"] if not r["aa"]}
    reference, fp32 = rows[("torch", "fp32")], rows[("onnxruntime", "fp32")]
    twin = next(r for r in results["rows"] if r["aa"])  # the reference timed again as its own entry: the noise floor
    assert twin["backend"] == "torch" and twin["mean_patient_dice"] == reference["mean_patient_dice"]
    assert twin["speedup"]["1"] == pytest.approx(reference["latency"]["1"]["p50_ms"] / twin["latency"]["1"]["p50_ms"])
    assert results["noise_floor"]["worst_deviation"] == pytest.approx(
        max(abs(twin["speedup"][b] - 1) for b in ("1", "2"))
    )
    assert fp32["patients"] == len(load_checkpoint(reference["engine"])["split"]["val"])
    assert (
        fp32["delta_dice_points"]["ci95"] is None and fp32["delta_dice_points"]["n"] == fp32["patients"]
    )  # phantom val: < 5 patients
    assert reference["status"] == "ok" and fp32["status"] == "ok"
    assert fp32["mean_patient_dice"] == pytest.approx(reference["mean_patient_dice"], abs=1e-4)
    assert [p["patient"] for p in fp32["per_patient"]] == [p["patient"] for p in reference["per_patient"]]
    assert fp32["delta_dice_points"]["mean"] == pytest.approx(0.0, abs=0.05)
    assert set(fp32["delta_dice_points"]["per_patient"]) == {p["patient"] for p in reference["per_patient"]}
    assert set(fp32["latency"]) == {"1", "2"} and fp32["latency"]["2"]["runs"] == 3
    for b in ("1", "2"):  # speed-up is the reference's median latency over the engine's, per batch size
        assert fp32["speedup"][b] == pytest.approx(reference["latency"][b]["p50_ms"] / fp32["latency"][b]["p50_ms"])
    nan = rows[("onnxruntime", "fp16")]
    assert nan["status"] == "non-finite" and "NaN" in nan["reason"] and "mean_patient_dice" not in nan
    trt = rows[("tensorrt", "fp16")]
    if availability("tensorrt")[0]:
        assert trt["status"] == "error"  # a garbage plan on a real TensorRT machine
    else:
        assert trt["status"] == "unavailable" and trt["reason"] == availability("tensorrt")[1]

    written = write_all(results, tmp_path / "report")
    saved = json.loads((tmp_path / "report" / "bench.json").read_text())
    assert all("per_patient" in r for r in saved["rows"] if r["status"] == "ok")
    assert "ΔDice" in (tmp_path / "report" / "bench.md").read_text()
    assert {p.name for p in written} >= {"bench.json", "bench.md", "bench.csv", "speed_accuracy.png", "speedup.png"}


def test_bench_cli_formats_and_errors(engines, phantom_dir, tmp_path):
    runner = CliRunner()
    out, _ = engines
    result = runner.invoke(
        app,
        [
            "bench",
            str(out),
            "--data",
            str(phantom_dir),
            "--split",
            "val",
            "--iters",
            "2",
            "--batch-sizes",
            "1",
            "--format",
            "csv",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "mean_patient_dice" in result.output and "onnxruntime fp32" in result.output
    result = runner.invoke(app, ["bench", str(tmp_path / "empty"), "--data", str(phantom_dir)])
    assert result.exit_code == 2 and "no engines" in result.output
    result = runner.invoke(app, ["bench", str(out), "--batch-sizes", "one"])
    assert result.exit_code == 2 and "--batch-sizes" in result.output


def test_machine_formats_are_never_wrapped(engines, phantom_dir):
    import csv
    import io

    runner = CliRunner()
    out, _ = engines
    result = runner.invoke(
        app,
        [
            "bench",
            str(out),
            "--data",
            str(phantom_dir),
            "--split",
            "val",
            "--iters",
            "1",
            "--batch-sizes",
            "1,2",
            "--format",
            "csv",
        ],
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    rows = list(csv.reader(io.StringIO(text)))
    assert len(rows) >= 3 and len({len(r) for r in rows}) == 1 and max(len(line) for line in text.splitlines()) > 160
    result = runner.invoke(
        app,
        [
            "bench",
            str(out),
            "--data",
            str(phantom_dir),
            "--split",
            "val",
            "--iters",
            "1",
            "--batch-sizes",
            "1",
            "--format",
            "md",
        ],
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 3 and len({line.count("|") for line in lines}) == 1


def test_bad_bench_flags_fail_before_the_scoring(engines, phantom_dir, tmp_path, monkeypatch):
    import lggdeploy.bench.run as bench_run

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the flags were checked")

    monkeypatch.setattr(bench_run, "_entries", no_scoring)
    runner = CliRunner()
    out, _ = engines
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for flags, needle in (
        (["--iters", "0"], "--iters"),
        (["--warmup", "-1"], "--warmup"),
        (["--threads", "100000"], "--threads"),
        (["--batch-sizes", "0"], "--batch-sizes"),
        (["--out", str(blocker / "sub")], "file"),
    ):
        result = runner.invoke(app, ["bench", str(out), "--data", str(phantom_dir), *flags])
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, (
            flags,
            result.output,
        )


def test_bench_refuses_a_reference_that_is_not_the_engines_checkpoint(engines, phantom_dir, tmp_path, segmenting_run):
    out, fp32_engine = engines
    folder = tmp_path / "engines" / "model"
    folder.mkdir(parents=True)
    shutil.copy(fp32_engine, folder)
    other = tmp_path / "other.pt"
    other.write_bytes(segmenting_run.best_path.read_bytes() + b"changed")
    manifest_for(folder / Path(fp32_engine).name, fp32_engine, checkpoint=str(other))
    with pytest.raises(
        LggError,
        match=r"other.pt is not the checkpoint onnxruntime-fp32.onnx was built from.*onnxruntime-fp32.onnx.json records",
    ):
        run_bench(
            BenchOptions(
                engines_dir=tmp_path / "engines", data=phantom_dir, split="val", batch_sizes=(1,), iters=1, warmup=0
            )
        )


def test_timing_order_is_shuffled_each_round(engines, phantom_dir, monkeypatch):
    """Engines are timed in a fresh random order every round (seeded), not in a fixed rotation."""
    import lggdeploy.bench.run as bench_run

    calls = []
    real = bench_run._open

    def tracking_open(entry, opts):
        real(entry, opts)
        if entry.runner is not None and entry.twin_of is None:
            infer = entry.runner.infer
            entry.runner.infer = lambda batch, label=entry.label, infer=infer: (calls.append(label), infer(batch))[1]

    monkeypatch.setattr(bench_run, "_open", tracking_open)
    out, _ = engines
    run_bench(
        BenchOptions(engines_dir=out, data=phantom_dir, split="val", batch_sizes=(1,), iters=12, warmup=0, seed=3)
    )
    timed = calls[
        -46:-10
    ]  # 12 rounds of 3 entries (reference, its A/A twin, the engine), before 2 x 5 end-to-end runs (one batch size)
    orders = {tuple(timed[i : i + 3]) for i in range(0, 36, 3)}
    assert len(orders) > 1

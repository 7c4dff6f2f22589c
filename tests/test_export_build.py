"""Export, parity gate, FP16/INT8 builds, accuracy gate and calibration cache, on a small model trained in the tests."""

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from lggdeploy.engines.build import BuildOptions, _Context, build_engines
from lggdeploy.common.files import sha256_file
from lggdeploy.models.checkpoint import load_checkpoint, save_checkpoint
from lggdeploy.cli import app
from lggdeploy.engines.formats import discover, read_manifest
from lggdeploy.common.errors import CheckpointError, EngineError, GateFailed, LggError
from lggdeploy.engines.export import export_checkpoint
from lggdeploy.engines.precision.int8 import zero_points

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(segmenting_run, phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    path, record = export_checkpoint(segmenting_run.best_path, out, phantom_dir)
    return out, path, record


def test_export_is_one_checked_file_with_dynamic_batch(exported):
    out, path, record = exported
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".data"] == []
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.graph.input[0].name == "input" and model.graph.output[0].name == "logits"
    assert record["parity"]["passed"] and record["parity"]["max_abs_logit_diff"] < 1e-3 and record["opset"] == 18
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        assert session.run(None, {"input": np.zeros((batch, 3, 128, 128), np.float32)})[0].shape == (batch, 1, 128, 128)


def test_parity_failure_leaves_no_artifact(segmenting_run, phantom_dir, tmp_path):
    from lggdeploy.models.checkpoint import model_from_checkpoint

    patched = model_from_checkpoint(load_checkpoint(segmenting_run.best_path))
    with torch.no_grad():
        patched.segmentation_head[0].bias += 3.0  # the model changed after export
    with pytest.raises(EngineError, match="parity check failed"):
        export_checkpoint(segmenting_run.best_path, tmp_path / "engines", phantom_dir, model_override=patched)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def build(segmenting_run, phantom_dir, out, **kw):
    report = build_engines([segmenting_run.best_path], BuildOptions(out_dir=out, data=phantom_dir, calib_samples=8, **kw))
    if report.failures:
        raise GateFailed(report.failures[0])
    return report.engines


def test_fp32_fp16_int8_matrix_with_manifests(segmenting_run, phantom_dir, exported):
    out = exported[0]
    results = build(segmenting_run, phantom_dir, out, precision="all")
    assert [r["engine"].split("/")[-1] for r in results] == ["onnxruntime-fp32.onnx", "onnxruntime-fp16.onnx", "onnxruntime-int8-cpu.onnx"]
    for r in results:
        manifest = read_manifest(r["engine"])
        assert manifest["gate"]["passed"] and manifest["gate"]["split"] == "val"
        assert manifest["checkpoint_sha256"] == sha256_file(segmenting_run.best_path)
        assert manifest["normalization"] == load_checkpoint(segmenting_run.best_path)["normalization"]  # what the model was trained with
        assert manifest["sha256"] == sha256_file(r["engine"])
        assert abs(manifest["gate"]["drop_points"]) <= 0.5
    fp16 = onnx.load(results[1]["engine"])
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in fp16.graph.initializer)
    assert read_manifest(results[2]["engine"])["calibration"]["samples"] == 8
    assert len(discover(out)) == 3


def test_tensorrt_profile_int8_has_only_zero_zero_points(segmenting_run, phantom_dir, tmp_path):
    results = build(segmenting_run, phantom_dir, tmp_path, precision="int8", int8_profile="tensorrt", force=True)
    engine = results[0]["engine"]
    points = zero_points(engine)
    assert points and set(points) == {0}
    types = {i.data_type for i in onnx.load(engine).graph.initializer if i.name.endswith("_zero_point")}
    assert types == {onnx.TensorProto.INT8}


def test_calibration_cache_is_reused(segmenting_run, phantom_dir, tmp_path, monkeypatch):
    first = build(segmenting_run, phantom_dir, tmp_path, precision="int8")[0]
    assert first["calibration"]["cache_reused"] is False
    import sys

    quantize_module = sys.modules["onnxruntime.quantization.quantize"]  # the package's `quantize` name is a function

    def no_calibration(*args, **kwargs):
        raise AssertionError("recalibrated although the cache exists")

    monkeypatch.setattr(quantize_module, "create_calibrator", no_calibration)
    second = build(segmenting_run, phantom_dir, tmp_path, precision="int8")[0]
    assert second["calibration"]["cache_reused"] is True
    assert second["calibration"]["slice_list_sha256"] == first["calibration"]["slice_list_sha256"]


def test_gate_failure_exits_nonzero_and_writes_nothing_unless_forced(segmenting_run, phantom_dir, tmp_path, monkeypatch):
    real = _Context.score_engine
    monkeypatch.setattr(_Context, "score_engine", lambda self, path, fmt, facts: real(self, path, fmt, facts) - 0.10)
    with pytest.raises(GateFailed, match="dropped 10.00 points"):
        build(segmenting_run, phantom_dir, tmp_path, precision="fp32")
    assert discover(tmp_path) == [] and not list(tmp_path.rglob("onnxruntime-fp32.onnx*"))
    result = runner.invoke(app, ["build", str(segmenting_run.best_path), "--data", str(phantom_dir), "-o", str(tmp_path)])
    assert result.exit_code == 3 and "Traceback" not in result.output
    forced = build(segmenting_run, phantom_dir, tmp_path, precision="fp32", force=True)[0]
    assert read_manifest(forced["engine"])["forced"] is True and read_manifest(forced["engine"])["gate"]["passed"] is False


def test_bad_inputs_are_clear(segmenting_run, phantom_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_engines([tmp_path / "none.pt"], BuildOptions(out_dir=tmp_path, data=phantom_dir))
    (tmp_path / "corrupt.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        build_engines([tmp_path / "corrupt.pt"], BuildOptions(out_dir=tmp_path, data=phantom_dir))
    ckpt = load_checkpoint(segmenting_run.best_path)
    ckpt.pop("path")
    no_val = dict(ckpt, split=dict(ckpt["split"], val=[]))
    save_checkpoint(tmp_path / "noval.pt", no_val)
    with pytest.raises(LggError, match="no validation patients"):
        build_engines([tmp_path / "noval.pt"], BuildOptions(out_dir=tmp_path, data=phantom_dir))
    unknown = dict(ckpt, model=dict(ckpt["model"], name="pspnet-unknown", arch="NoSuchNet"))
    save_checkpoint(tmp_path / "unknown.pt", unknown)
    with pytest.raises(CheckpointError, match="unknown model"):
        build_engines([tmp_path / "unknown.pt"], BuildOptions(out_dir=tmp_path, data=phantom_dir))
    result = runner.invoke(app, ["build", str(segmenting_run.best_path), "--backend", "tensorrt", "--data", str(phantom_dir), "-o", str(tmp_path)])
    assert result.exit_code == 2 and "tensorrt" in result.output.lower() and "Traceback" not in result.output


def test_engine_without_manifest_is_refused(exported, tmp_path):
    orphan = tmp_path / "orphan.onnx"
    shutil.copyfile(exported[1], orphan)
    with pytest.raises(EngineError, match="no manifest"):
        read_manifest(orphan)


def dead_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_no_kill_leaves_an_engine_beside_another_engines_manifest(segmenting_run, phantom_dir, tmp_path, monkeypatch):
    import lggdeploy.engines.build as build_module

    first = build(segmenting_run, phantom_dir, tmp_path, precision="fp32")[0]
    folder = Path(first["engine"]).parent
    stale_build, stale_tmp = folder / f".build-{dead_pid()}-abc", folder / f".onnxruntime-fp32.onnx.json.{dead_pid()}.xyz.tmp"
    stale_build.mkdir()
    (stale_build / "engine-0.onnx").write_bytes(b"x" * 1000)
    stale_tmp.write_text("{")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the moment between the engine's rename and its manifest's

    monkeypatch.setattr(build_module, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        build(segmenting_run, phantom_dir, tmp_path, precision="fp32")
    assert not stale_build.exists() and not stale_tmp.exists()  # a killed build's leftovers are cleaned on the next run
    assert Path(first["engine"]).is_file() and discover(tmp_path) == []  # the engine has no manifest: never used
    with pytest.raises(EngineError, match="no manifest"):
        read_manifest(first["engine"])
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_int8_leaves_logging_and_warnings_as_they_were(segmenting_run, phantom_dir, tmp_path):
    import logging
    import warnings

    root = logging.getLogger()
    level, filters = root.level, list(warnings.filters)
    root.setLevel(logging.INFO)
    try:
        build(segmenting_run, phantom_dir, tmp_path, precision="all")
        assert root.level == logging.INFO and warnings.filters == filters
    finally:
        root.setLevel(level)


def test_fp16_reports_weights_clamped_to_its_range(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from lggdeploy.engines.precision.fp16 import convert_fp16

    weight = numpy_helper.from_array(np.array([[1e5, 0.5], [1e-9, -2.0]], np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [weight])
    source = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(source))
    path, facts = convert_fp16(source, tmp_path / "h.onnx")
    assert facts["weights_clamped_to_fp16_range"] == 1 and facts["largest_clamped_value"] == pytest.approx(1e5)
    assert facts["tiny_weights_raised_to_fp16_min"] == 1 and path.is_file()


def test_build_flags_are_checked_before_any_work(segmenting_run, phantom_dir, tmp_path):
    for flags, needle in ((["--max-drop", "-1"], "--max-drop"), (["--calib-samples", "0"], "--calib-samples"), (["--calib-method", "median"], "--calib-method"),
                          (["--min-batch", "9", "--opt-batch", "8"], "batch profile"), (["--threads", "0"], "--threads")):
        result = runner.invoke(app, ["build", str(segmenting_run.best_path), "--data", str(phantom_dir), "-o", str(tmp_path / "e"), *flags])
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, (flags, result.output)
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())

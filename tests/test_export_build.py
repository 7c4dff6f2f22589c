"""Export, parity gate, FP16/INT8 builds, accuracy gate and calibration cache, on a small model trained in the tests."""

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from lggdeploy.cli import app
from lggdeploy.common.errors import CheckpointError, EngineError, GateFailed, LggError, SearchStopped
from lggdeploy.common.files import sha256_file
from lggdeploy.engines.build import BuildOptions, _Context, build_engines
from lggdeploy.engines.export import export_checkpoint
from lggdeploy.engines.formats import discover, read_manifest
from lggdeploy.engines.precision.gate import Outputs
from lggdeploy.engines.precision.int8 import zero_points
from lggdeploy.models.checkpoint import load_checkpoint, save_checkpoint

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
    # The pyramid's uneven levels (a 16 x 16 map to 3 and 6 bins at 128 px) are exported as bin means
    # (engines/exportable.py), not as the exporter's gather-every-window decomposition of area interpolation.
    ops = [node.op_type for node in model.graph.node]
    assert not {"GatherND", "Where", "CumSum"} & set(ops) and ops.count("Slice") == 18, sorted(set(ops))
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
    report = build_engines(
        [segmenting_run.best_path], BuildOptions(out_dir=out, data=phantom_dir, calib_samples=8, **kw)
    )
    if report.failures:
        raise GateFailed(report.failures[0])
    return report.engines


def test_fp32_fp16_int8_matrix_with_manifests(segmenting_run, phantom_dir, exported):
    out = exported[0]
    results = build(segmenting_run, phantom_dir, out, precision="all")
    assert [r["engine"].split("/")[-1] for r in results] == [
        "onnxruntime-fp32.onnx",
        "onnxruntime-fp16.onnx",
        "onnxruntime-int8-cpu.onnx",
    ]
    for r in results:
        manifest = read_manifest(r["engine"])
        assert manifest["gate"]["passed"] and manifest["gate"]["split"] == "val"
        assert manifest["checkpoint_sha256"] == sha256_file(segmenting_run.best_path)
        assert (
            manifest["normalization"] == load_checkpoint(segmenting_run.best_path)["normalization"]
        )  # what the model was trained with
        assert manifest["sha256"] == sha256_file(r["engine"])
        assert abs(manifest["gate"]["drop_points"]) <= 0.5
    fp16 = onnx.load(results[1]["engine"])
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in fp16.graph.initializer)
    assert read_manifest(results[2]["engine"])["calibration"]["samples"] == 8
    assert len(discover(out)) == 3


@pytest.mark.slow
def test_tensorrt_profile_int8_has_only_zero_zero_points(segmenting_run, phantom_dir, tmp_path):
    results = build(segmenting_run, phantom_dir, tmp_path, precision="int8", int8_profile="tensorrt", force=True)
    engine = results[0]["engine"]
    points = zero_points(engine)
    assert points and set(points) == {0}
    types = {i.data_type for i in onnx.load(engine).graph.initializer if i.name.endswith("_zero_point")}
    assert types == {onnx.TensorProto.INT8}


@pytest.mark.slow
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


def without_tumor_on(outputs: Outputs, patients: np.ndarray, patient: str) -> Outputs:
    """The engine's outputs with every prediction of one patient erased: that patient loses all its Dice."""
    masks, logits = outputs.masks.copy(), outputs.logits.copy()
    masks[patients == patient] = False
    logits[patients == patient] = -20.0
    return Outputs(logits, masks)


def test_gate_failure_exits_nonzero_and_writes_nothing_unless_forced(
    segmenting_run, phantom_dir, tmp_path, monkeypatch
):
    real = _Context.run_engine

    def one_patient_lost(self, path, fmt, facts):
        return without_tumor_on(real(self, path, fmt, facts), self.val.patients, self.val.patient_ids[0])

    monkeypatch.setattr(_Context, "run_engine", one_patient_lost)
    with pytest.raises(GateFailed, match="failed the accuracy gate on .* val patients .*dropped .* points > 2.0"):
        build(segmenting_run, phantom_dir, tmp_path, precision="fp32")
    assert discover(tmp_path) == [] and not list(tmp_path.rglob("onnxruntime-fp32.onnx*"))
    result = runner.invoke(
        app, ["build", str(segmenting_run.best_path), "--data", str(phantom_dir), "-o", str(tmp_path)]
    )
    assert result.exit_code == 3 and "Traceback" not in result.output
    forced = build(segmenting_run, phantom_dir, tmp_path, precision="fp32", force=True)[0]
    gate = read_manifest(forced["engine"])["gate"]
    assert read_manifest(forced["engine"])["forced"] is True and gate["passed"] is False
    lost = [r for r in gate["per_patient"] if r["engine_dice"] == 0]
    assert (
        len(lost) == 1
        and gate["worst_patient"] == lost[0]["patient"]
        and gate["worst_patient_drop_points"] == pytest.approx(100 * lost[0]["fp32_dice"])
    )
    assert gate["min_agreement"] == 0.0
    assert any("dropped" in f and "> 2.0" in f for f in gate["failures"]) and any(
        "agree with the FP32 model's at Dice 0.0000" in f for f in gate["failures"]
    )


# cpu: int32 bias Q/DQ, whose outputs take the float biases' names; tensorrt (the same search on a simpler graph) in test-slow, for the suite's time
@pytest.mark.slow
@pytest.mark.parametrize("profile", ["tensorrt", "cpu"])
def test_a_failing_int8_engine_falls_back_and_records_why(segmenting_run, phantom_dir, tmp_path, monkeypatch, profile):
    """The first INT8 graph fails (forced here: it loses a patient); the gate ranks the quantized nodes by their
    effect on the output over every val patient and rebuilds with the worst kept in float, which passes."""
    real = _Context.run_engine

    def first_graph_fails(self, path, fmt, facts):
        outputs = real(self, path, fmt, facts)
        return (
            without_tumor_on(outputs, self.val.patients, self.val.patient_ids[0])
            if path.name.startswith("engine-0.")
            else outputs
        )

    monkeypatch.setattr(_Context, "run_engine", first_graph_fails)
    engine = build(segmenting_run, phantom_dir, tmp_path, precision="int8", int8_profile=profile, qat="off")[0]
    gate = read_manifest(engine["engine"])["gate"]
    kept = gate["nodes_kept_in_float"]
    # Attempt 0 is forced to fail; the fallback then keeps the 1, 2, 4 ... worst-ranked nodes in float until one passes
    # (how many this model needs is its own business: each failed attempt is recorded).
    attempts = [(a["passed"], a["nodes_kept_in_float"]) for a in gate["attempts"]]
    assert gate["passed"] and kept and attempts[-1] == (True, len(kept))
    assert [p for p, _ in attempts] == [False] * (len(attempts) - 1) + [True] and [n for _, n in attempts] == sorted(
        n for _, n in attempts
    )
    ranking = gate["ranking"]
    assert ranking["method"].startswith("output effect") and set(kept) == {
        r["node"] for r in ranking["top"][: len(kept)]
    }
    val = load_checkpoint(segmenting_run.best_path)["split"]["val"]
    assert ranking["patients"] == sorted(
        val
    )  # the ranking slices come from every val patient, not the first two sorted slices
    assert ranking["top"][0]["score"] >= ranking["top"][-1]["score"]


@pytest.mark.parametrize(
    "qat", [pytest.param("off", marks=pytest.mark.slow), "auto"]
)  # auto covers more (no QAT past the deadline)
def test_a_failing_int8_search_stops_at_the_deadline_without_writing(
    segmenting_run, phantom_dir, tmp_path, monkeypatch, qat
):
    """optimize --budget-minutes: past the deadline a failing INT8 engine is not rebuilt (nor ranked, nor QAT-tuned)."""
    import time

    real = _Context.run_engine
    runs = []

    def first_graph_fails(self, path, fmt, facts):
        runs.append(path.name)
        return without_tumor_on(real(self, path, fmt, facts), self.val.patients, self.val.patient_ids[0])

    def no_qat(self):
        raise AssertionError("quantization-aware fine-tuning started after the deadline")

    monkeypatch.setattr(_Context, "run_engine", first_graph_fails)
    monkeypatch.setattr(_Context, "qat_model", no_qat)
    with pytest.raises(
        SearchStopped, match=r"--budget-minutes ran out .*no engine written: rerun with a larger --budget-minutes"
    ):
        build(
            segmenting_run,
            phantom_dir,
            tmp_path,
            precision="int8",
            int8_profile="cpu",
            qat=qat,
            deadline=time.monotonic(),
        )
    assert runs == ["engine-0.onnx"]
    assert discover(tmp_path) == [] and not list(tmp_path.rglob("onnxruntime-int8*"))


def no_tumor_checkpoint(run, path):
    """A copy of the run's model whose head bias is pushed down by 1000: it predicts no tumor anywhere. Returns the
    original checkpoint (without its path)."""
    ckpt = load_checkpoint(run.best_path)
    ckpt.pop("path")
    state = dict(ckpt["state_dict"])
    bias = next(k for k in state if k.startswith("segmentation_head") and k.endswith("bias"))
    state[bias] = state[bias] - 1000.0
    save_checkpoint(path, dict(ckpt, state_dict=state))
    return ckpt


@pytest.mark.slow  # 7 s; test_retrained_gate covers --reference in the default set
def test_build_judges_against_another_model_with_reference(segmenting_run, phantom_dir, tmp_path):
    """--reference: the gate's FP32 model is another checkpoint (as optimize judges a pruned model against the unpruned
    one). A model that predicts no tumor passes against itself (the slow test below) and fails against the real one."""
    ckpt = no_tumor_checkpoint(segmenting_run, tmp_path / "empty.pt")
    args = [
        "build",
        str(tmp_path / "empty.pt"),
        "--data",
        str(phantom_dir),
        "--reference",
        str(segmenting_run.best_path),
        "-o",
        str(tmp_path / "e"),
    ]
    result = runner.invoke(app, args)
    assert (
        result.exit_code == 3
        and "failed the accuracy gate" in result.output
        and not list((tmp_path / "e").rglob("onnxruntime-fp32.onnx*"))
    )
    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    gate = read_manifest(next((tmp_path / "e").rglob("onnxruntime-fp32.onnx")))["gate"]
    assert (
        gate["reference"] == str(segmenting_run.best_path)
        and gate["fp32_dice"] > 0.5
        and gate["engine_dice"] == 0.0
        and not gate["passed"]
    )
    save_checkpoint(tmp_path / "other-split.pt", dict(ckpt, split={**ckpt["split"], "val": ckpt["split"]["train"][:1]}))
    result = runner.invoke(
        app,
        [
            "build",
            str(segmenting_run.best_path),
            "--data",
            str(phantom_dir),
            "--reference",
            str(tmp_path / "other-split.pt"),
            "-o",
            str(tmp_path / "f"),
        ],
    )
    assert (
        result.exit_code == 2
        and "differs from" in result.output
        and "in its split" in result.output
        and "Traceback" not in result.output
    )
    assert not [f for f in (tmp_path / "f").rglob("*") if f.is_file()]  # said before the export: nothing written


@pytest.mark.slow
def test_an_all_background_model_is_judged_by_agreement(segmenting_run, phantom_dir, tmp_path, monkeypatch):
    no_tumor_checkpoint(segmenting_run, tmp_path / "empty.pt")
    engine = build_engines(
        [tmp_path / "empty.pt"], BuildOptions(out_dir=tmp_path / "e", data=phantom_dir, precision="fp32")
    ).engines[0]
    gate = read_manifest(engine["engine"])["gate"]
    assert (
        gate["passed"]
        and gate["reference_predicts_no_tumor"]
        and "only the agreement" in gate["note"]
        and gate["fp32_dice"] == 0.0
    )
    real = _Context.run_engine

    def predicts_something(self, path, fmt, facts):
        outputs = real(self, path, fmt, facts)
        masks = outputs.masks.copy()
        masks[:, 100:110, 100:110] = True
        return Outputs(outputs.logits, masks)

    monkeypatch.setattr(_Context, "run_engine", predicts_something)
    report = build_engines(
        [tmp_path / "empty.pt"], BuildOptions(out_dir=tmp_path / "f", data=phantom_dir, precision="fp32")
    )
    assert (
        report.engines == [] and "agree with the FP32 model's at Dice 0.0000" in report.failures[0]
    )  # no "drop 0.00, passed"


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
    result = runner.invoke(
        app,
        [
            "build",
            str(segmenting_run.best_path),
            "--backend",
            "tensorrt",
            "--data",
            str(phantom_dir),
            "-o",
            str(tmp_path),
        ],
    )
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


@pytest.mark.slow  # 7.4 s; the atomic-write tests stay in the default set
def test_no_kill_leaves_an_engine_beside_another_engines_manifest(segmenting_run, phantom_dir, tmp_path, monkeypatch):
    import lggdeploy.engines.formats as formats_module  # install_engine: the rename, then the manifest

    first = build(segmenting_run, phantom_dir, tmp_path, precision="fp32")[0]
    folder = Path(first["engine"]).parent
    stale_build, stale_tmp = (
        folder / f".build-{dead_pid()}-abc",
        folder / f".onnxruntime-fp32.onnx.json.{dead_pid()}.xyz.tmp",
    )
    stale_build.mkdir()
    (stale_build / "engine-0.onnx").write_bytes(b"x" * 1000)
    stale_tmp.write_text("{")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the moment between the engine's rename and its manifest's

    monkeypatch.setattr(formats_module, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        build(segmenting_run, phantom_dir, tmp_path, precision="fp32")
    assert not stale_build.exists() and not stale_tmp.exists()  # a killed build's leftovers are cleaned on the next run
    assert Path(first["engine"]).is_file() and discover(tmp_path) == []  # the engine has no manifest: never used
    with pytest.raises(EngineError, match="no manifest"):
        read_manifest(first["engine"])
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
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
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [weight],
    )
    source = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(source))
    path, facts = convert_fp16(source, tmp_path / "h.onnx")
    assert facts["weights_clamped_to_fp16_range"] == 1 and facts["largest_clamped_value"] == pytest.approx(1e5)
    assert facts["tiny_weights_raised_to_fp16_min"] == 1 and path.is_file()


def test_build_flags_are_checked_before_any_work(segmenting_run, phantom_dir, tmp_path):
    for flags, needle in (
        (["--max-drop", "-1"], "--max-drop"),
        (["--calib-samples", "0"], "--calib-samples"),
        (["--calib-method", "median"], "--calib-method"),
        (["--min-batch", "9", "--opt-batch", "8"], "batch profile"),
        (["--threads", "0"], "--threads"),
    ):
        result = runner.invoke(
            app, ["build", str(segmenting_run.best_path), "--data", str(phantom_dir), "-o", str(tmp_path / "e"), *flags]
        )
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, (
            flags,
            result.output,
        )
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())


@pytest.mark.slow
def test_an_export_of_an_older_graph_form_is_redone_and_a_current_one_reused(segmenting_run, phantom_dir, tmp_path):
    import json

    from lggdeploy.engines.export import EXPORT_GRAPH

    build(segmenting_run, phantom_dir, tmp_path, precision="fp32")
    (record_path,) = tmp_path.glob("*/model.onnx.json")
    record = json.loads(record_path.read_text())
    assert record["export_graph"] == EXPORT_GRAPH
    onnx_path = record_path.with_suffix("")
    stamp = onnx_path.stat().st_mtime_ns
    build(segmenting_run, phantom_dir, tmp_path, precision="fp32")
    assert onnx_path.stat().st_mtime_ns == stamp  # today's form: reused
    del record["export_graph"]  # as written before the form was recorded
    record_path.write_text(json.dumps(record))
    build(segmenting_run, phantom_dir, tmp_path, precision="fp32")
    assert json.loads(record_path.read_text())["export_graph"] == EXPORT_GRAPH and onnx_path.stat().st_mtime_ns != stamp


@pytest.mark.slow  # 12 s; a cache's bookkeeping, not the gate itself
def test_the_fp32_reference_runs_once_per_model_and_inputs(segmenting_run, phantom_dir, tmp_path, monkeypatch):
    """`optimize` builds each rung with its own build_engines call: the PyTorch reference on the val slices is computed
    once per model and inputs in a process, and again when they change."""
    from lggdeploy.engines import build as build_module
    from lggdeploy.models.torch_runner import TorchRunner

    build_module._REFERENCE_OUTPUTS.clear()
    slices_seen = []
    infer = TorchRunner.infer
    monkeypatch.setattr(TorchRunner, "infer", lambda self, batch: slices_seen.append(len(batch)) or infer(self, batch))
    ckpt = segmenting_run.best_path
    first = build_engines([ckpt], BuildOptions(out_dir=tmp_path / "a", data=phantom_dir, precision="fp32"))
    after_first = len(slices_seen)
    second = build_engines([ckpt], BuildOptions(out_dir=tmp_path / "a", data=phantom_dir, precision="fp32"))
    assert after_first > 0 and len(slices_seen) == after_first  # same model, same val slices: no second run
    gates = [read_manifest(r.engines[0]["engine"])["gate"] for r in (first, second)]
    assert gates[0]["fp32_dice"] == gates[1]["fp32_dice"]
    moved = load_checkpoint(ckpt)  # the same weights at another threshold: other reference masks, another run
    save_checkpoint(tmp_path / "moved.pt", dict(moved, threshold=0.7))
    build_engines([tmp_path / "moved.pt"], BuildOptions(out_dir=tmp_path / "b", data=phantom_dir, precision="fp32"))
    keys = list(build_module._REFERENCE_OUTPUTS)
    assert len(keys) == 2 and [k[-1] for k in keys] == [moved["threshold"], 0.7]

"""OpenVINO as a CPU backend (fp32, bf16, int8 from the plain Q/DQ graph) and the portable Q/DQ twin of INT8 engines."""

import numpy as np
import onnx
import pytest

from lggdeploy.backends.base import RunOptions
from lggdeploy.common.errors import BackendUnavailable
from lggdeploy.common.files import sha256_file
from lggdeploy.engines.build import BuildOptions, build_engines
from lggdeploy.engines.formats import discover, open_engine, read_manifest

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'lggdeploy[openvino]')")


def build(run, data, out, **kw):
    report = build_engines([run.best_path], BuildOptions(out_dir=out, data=data, calib_samples=8, qat="off", **kw))
    assert not report.failures, report.failures
    return report.engines


def activations_dequantized_for_no_convolution(model) -> list[str]:
    readers: dict[str, set] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    weights = {i.name for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] not in weights and "Conv" not in readers.get(n.output[0], ())
    ]


def test_openvino_engines_pass_the_gate_and_match_onnxruntime(segmenting_run, phantom_dir, tmp_path):
    from lggdeploy.data.arrays import load_slices
    from lggdeploy.data.kaggle import load_dataset
    from lggdeploy.data.transforms import Normalization, preprocess

    engines = build(segmenting_run, phantom_dir, tmp_path, backend="openvino", precision="fp32")
    engines += build(segmenting_run, phantom_dir, tmp_path, backend="openvino", precision="int8")
    engines += build(segmenting_run, phantom_dir, tmp_path, backend="onnxruntime", precision="fp32")
    names = [e["engine"].split("/")[-1] for e in engines]
    assert names == ["openvino-fp32.onnx", "openvino-int8-openvino.onnx", "onnxruntime-fp32.onnx"]
    assert all(read_manifest(e["engine"])["gate"]["passed"] for e in engines)
    assert len(discover(tmp_path)) == 3  # (the cpu-profile engine below makes a fourth)
    # the OpenVINO INT8 engine is the plain Q/DQ graph (no ONNX Runtime-only operators) and is its own portable twin
    int8 = onnx.load(engines[1]["engine"])
    ops = {n.op_type for n in int8.graph.node}
    assert (
        "QuantizeLinear" in ops
        and "QLinearConv" not in ops
        and not any(n.domain == "com.microsoft" for n in int8.graph.node)
    )
    assert engines[1]["portable_qdq"]["file"] == "openvino-int8-openvino.onnx"
    # the openvino profile quantizes activations only where a convolution reads them (OpenVINO fuses those); the cpu
    # profile (ONNX Runtime's placement, still built on request) also rounds convolution outputs on their way to an
    # activation function
    assert not activations_dequantized_for_no_convolution(int8)
    cpu = build(segmenting_run, phantom_dir, tmp_path, backend="openvino", precision="int8", int8_profile="cpu")[0]
    assert cpu["engine"].endswith("openvino-int8-cpu.onnx") and activations_dequantized_for_no_convolution(
        onnx.load(cpu["engine"])
    )
    from lggdeploy.common.machine import cpu_has_bf16

    assert engines[1]["inference_precision_hint"] == ("bf16" if cpu_has_bf16() else "f32")  # the float remainder
    from lggdeploy.backends import openvino as ov_backend
    from lggdeploy.common.errors import EngineError

    older = {k: v for k, v in read_manifest(engines[1]["engine"]).items() if k != "inference_precision_hint"}
    assert (
        ov_backend.load(engines[1]["engine"], older).config["INFERENCE_PRECISION_HINT"] == "f32"
    )  # built before the hint was recorded
    with pytest.raises(EngineError, match="inference precision 'bf16' on a fp32 engine"):
        ov_backend.load(
            engines[0]["engine"], {**read_manifest(engines[0]["engine"]), "inference_precision_hint": "bf16"}
        )

    val = load_slices(load_dataset(phantom_dir), read_manifest(engines[0]["engine"])["split"]["val"])
    x = preprocess(val.images[:5], 128, Normalization())  # batch 5, then 2: each shape compiled once and reused
    ov_fp32 = open_engine(engines[0]["engine"], options=RunOptions(threads=1))
    ort_fp32 = open_engine(engines[2]["engine"], options=RunOptions(threads=1))
    for batch in (x, x[:2], x):
        a, b = ov_fp32.infer(batch), ort_fp32.infer(batch)
        assert a.shape == b.shape == (len(batch), 1, 128, 128)
        assert np.max(np.abs(a - b)) < 1e-2 * max(1.0, float(np.max(np.abs(b))))
    assert len(ov_fp32.requests) == 2


@pytest.mark.slow
def test_bf16_only_where_the_cpu_has_it(segmenting_run, phantom_dir, tmp_path, monkeypatch):
    from lggdeploy.common import machine

    monkeypatch.setattr(machine, "cpu_has_bf16", lambda isa=None: False)
    with pytest.raises(BackendUnavailable, match="neither AVX512-BF16 nor AMX"):
        build(segmenting_run, phantom_dir, tmp_path, backend="openvino", precision="bf16")
    assert discover(tmp_path) == []
    engines = build(
        segmenting_run, phantom_dir, tmp_path, backend="openvino", precision="all"
    )  # "all" skips bf16 and says so
    assert [e["precision"] for e in engines] == ["fp32", "int8"]
    assert (
        engines[1]["inference_precision_hint"] == "f32"
    )  # no BF16 here: the INT8 engine's float remainder runs in f32
    monkeypatch.undo()
    if not machine.cpu_has_bf16():
        pytest.skip("this CPU has no AVX512-BF16/AMX: the BF16 engine itself cannot be built here")
    bf16 = build(segmenting_run, phantom_dir, tmp_path, backend="openvino", precision="bf16")[0]
    manifest = read_manifest(bf16["engine"])
    assert manifest["inference_precision_hint"] == "bf16" and manifest["gate"]["passed"]
    # an INT8 engine built here runs its float remainder in BF16, as gated; carried to a CPU without BF16, in f32
    int8 = build(segmenting_run, phantom_dir, tmp_path / "bf16-cpu", backend="openvino", precision="int8")[0]
    assert int8["inference_precision_hint"] == "bf16"
    assert open_engine(int8["engine"]).config["INFERENCE_PRECISION_HINT"] == "bf16"
    monkeypatch.setattr(machine, "cpu_has_bf16", lambda isa=None: False)
    assert open_engine(int8["engine"]).config["INFERENCE_PRECISION_HINT"] == "f32"


@pytest.mark.slow
def test_every_int8_engine_has_a_portable_qdq_twin(segmenting_run, phantom_dir, tmp_path):
    engine = build(segmenting_run, phantom_dir, tmp_path, precision="int8")[
        0
    ]  # onnxruntime cpu profile: QLinear ops after optimization
    manifest = read_manifest(engine["engine"])
    twin = tmp_path.joinpath(*engine["engine"].split("/")[-2:]).parent / manifest["portable_qdq"]["file"]
    assert twin.name == "onnxruntime-int8-cpu.qdq.onnx" and twin.is_file()
    assert sha256_file(twin) == manifest["portable_qdq"]["sha256"] != manifest["sha256"]
    optimized = {n.op_type for n in onnx.load(engine["engine"]).graph.node}
    plain = {n.op_type for n in onnx.load(twin).graph.node}
    assert "QLinearConv" in optimized or any(op.startswith("QLinear") or op.startswith("Fused") for op in optimized)
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= plain and not any(op.startswith("QLinear") for op in plain)
    ov.Core().read_model(str(twin))  # what the twin is for: another runtime reads it
    assert discover(tmp_path) == [next(iter(discover(tmp_path)))]  # the twin is not mistaken for an engine

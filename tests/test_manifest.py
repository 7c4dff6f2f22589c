"""The engine manifest: one typed, versioned record, read and written in one place; older manifests still load."""

from __future__ import annotations

import json

import pytest

from lggdeploy.common.errors import EngineError
from lggdeploy.engines.formats import read_manifest, write_manifest
from lggdeploy.engines.manifest import MANIFEST_VERSION, EngineManifest

VERSION_1 = {  # the keys a version-1 build wrote (trimmed), backend facts and precision records among them
    "format": "lggdeploy-engine",
    "version": 1,
    "engine": "onnxruntime-int8-cpu.onnx",
    "backend": "onnxruntime",
    "precision": "int8",
    "int8_profile": "cpu",
    "img_size": 128,
    "normalization": {"mode": "fixed"},
    "threshold": 0.5,
    "postprocess": {"rule": "none"},
    "calibration": {"method": "minmax", "samples": 32},
    "portable_qdq": {"file": "onnxruntime-int8-cpu.qdq.onnx"},
    "onnxruntime_version": "1.22.0",
    "sha256": "a" * 64,
}


def _engine(tmp_path, manifest: dict):
    engine = tmp_path / "onnxruntime-int8-cpu.onnx"
    engine.write_bytes(b"not read here")
    (tmp_path / (engine.name + ".json")).write_text(json.dumps(manifest))
    return engine


def test_a_version_1_manifest_loads_into_the_record_and_writes_back_the_same_keys(tmp_path):
    engine = _engine(tmp_path, VERSION_1)
    manifest = read_manifest(engine)
    assert isinstance(manifest, EngineManifest)
    assert (manifest.backend, manifest.precision, manifest.threshold, manifest.img_size) == (
        "onnxruntime",
        "int8",
        0.5,
        128,
    )
    assert manifest.details["calibration"]["samples"] == 32 and manifest["onnxruntime_version"] == "1.22.0"
    assert manifest.get("portable_qdq") == {"file": "onnxruntime-int8-cpu.qdq.onnx"} and "gate" not in manifest
    write_manifest(engine, manifest.with_details(optimize={"batch": 8}))
    written = json.loads((tmp_path / (engine.name + ".json")).read_text())
    assert written["version"] == MANIFEST_VERSION and written["optimize"] == {"batch": 8}
    kept = {k: v for k, v in written.items() if k not in ("version", "optimize", "pruned", "pruning", "forced")}
    assert kept == {k: v for k, v in VERSION_1.items() if k != "version"}
    assert (written["pruned"], written["pruning"], written["forced"]) == (False, [], False)  # the record's defaults


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"threshold": 7}, "threshold 7 is not a probability strictly between 0 and 1"),
        ({"threshold": "0.5"}, "threshold '0.5' is not a probability"),
        ({"img_size": -1}, "img_size -1 is not a size"),
        ({"precision": "int4"}, "precision 'int4' is not one of"),
        ({"normalization": "slice"}, "normalization 'slice' is not a record"),
        ({"sha256": "abc"}, "sha256 'abc' is not a sha256"),
        ({"version": 99}, "manifest version 99 was written by a newer lggdeploy"),
        ({"threshold": None, "img_size": None}, "manifest lacks 'img_size', 'threshold'"),
    ],
)
def test_a_bad_manifest_is_one_line_naming_its_file(tmp_path, change, message):
    bad = {**VERSION_1, **change}
    bad = {k: v for k, v in bad.items() if v is not None}
    engine = _engine(tmp_path, bad)
    with pytest.raises(EngineError, match=message) as caught:
        read_manifest(engine)
    assert str(engine) + ".json" in str(caught.value) and "\n" not in str(caught.value)


def test_a_build_writes_what_it_assembled_only_if_it_is_a_valid_record(tmp_path):
    engine = tmp_path / "e.onnx"
    with pytest.raises(EngineError, match="threshold 1.5"):
        write_manifest(engine, {**VERSION_1, "threshold": 1.5})
    assert not (tmp_path / "e.onnx.json").exists()

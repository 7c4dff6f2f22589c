"""pack -> verify round trips (phantom and a real shared patient), tampered bundles, and a device engine that disagrees."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from lggdeploy.cli import app
from lggdeploy.engines.build import BuildOptions, build_engines
from lggdeploy.engines.pack import pack
from lggdeploy.models.checkpoint import load_checkpoint, save_checkpoint
from lggdeploy.runtime import Segmenter
from lggdeploy.runtime.verify import BundleError, verify_bundle
from tests.conftest import SMALL_REAL_PATIENT, manifest_for

runner = CliRunner()


@pytest.fixture(scope="module")
def phantom_engines(segmenting_run, phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle_engines")
    report = build_engines([segmenting_run.best_path], BuildOptions(out_dir=out, data=phantom_dir, precision="fp32"))
    return [Path(e["engine"]) for e in report.engines]


@pytest.fixture(scope="module")
def bundle(phantom_engines, phantom_dir, tmp_path_factory):
    return pack(
        phantom_engines, tmp_path_factory.mktemp("bundle") / "scanner-bundle.tar.gz", samples=8, data=phantom_dir
    )


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def repack(files: dict[str, bytes], path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_pack_then_verify_on_the_phantom_set(bundle):
    files = members(bundle)
    assert {
        "bundle.json",
        "SHA256SUMS",
        "README.md",
        "verification.npz",
        "onnx/model.onnx",
        "engines/onnxruntime-fp32.onnx",
        "engines/onnxruntime-fp32.onnx.json",
    } <= set(files)
    description = json.loads(files["bundle.json"])
    assert description["verification"]["slices"] == 8 and description["verification"]["tumor_slices"] >= 1
    assert len(files["SHA256SUMS"].decode().splitlines()) == len(files) - 1
    assert "trtexec --onnx=onnx/model.onnx --stronglyTyped --minShapes=input:1x3x" in files["README.md"].decode()
    report = verify_bundle(bundle)
    assert report.passed and report.overall_agreement == 1.0 and len(report.per_slice_agreement) == 8
    result = runner.invoke(app, ["verify", str(bundle)])
    assert result.exit_code == 0 and "verified" in result.output


def test_verify_imports_no_torch(bundle):
    code = f"import sys; from lggdeploy.runtime.verify import verify_bundle; r = verify_bundle({str(bundle)!r}); print(r.passed, 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[
        -2:
    ] == ["True", "False"]


def test_segmenter_verify_in_a_scanners_start_up(bundle, phantom_engines):
    with Segmenter.load(phantom_engines[0]) as segmenter:
        assert segmenter.verify(bundle).passed


def test_tampered_bundles_are_refused(bundle, tmp_path):
    files = members(bundle)
    engine = "engines/onnxruntime-fp32.onnx"
    changed = dict(files)
    blob = bytearray(files[engine])
    blob[len(blob) // 2] ^= 0x01  # one byte of the engine
    changed[engine] = bytes(blob)
    with pytest.raises(BundleError, match="onnxruntime-fp32.onnx does not match its checksum"):
        verify_bundle(repack(changed, tmp_path / "byte.tar.gz"))
    missing = {k: v for k, v in files.items() if k != "verification.npz"}
    with pytest.raises(BundleError, match="verification.npz is listed in SHA256SUMS but missing"):
        verify_bundle(repack(missing, tmp_path / "missing.tar.gz"))
    extra = dict(files, **{"engines/extra.onnx": b"x"})
    with pytest.raises(BundleError, match="extra.onnx is not listed"):
        verify_bundle(repack(extra, tmp_path / "extra.tar.gz"))
    (tmp_path / "garbage.tar.gz").write_bytes(b"not a tar")
    result = runner.invoke(app, ["verify", str(tmp_path / "garbage.tar.gz")])
    assert result.exit_code == 2 and "not a readable bundle" in result.output and "Traceback" not in result.output


def test_a_verification_set_from_another_model_is_refused(bundle, segmenting_run, phantom_dir, tmp_path):
    import hashlib

    ckpt = load_checkpoint(segmenting_run.best_path)
    ckpt.pop("path")
    save_checkpoint(
        tmp_path / "other.pt", dict(ckpt, created="another training")
    )  # another checkpoint (another sha256)
    other_engines = build_engines(
        [tmp_path / "other.pt"], BuildOptions(out_dir=tmp_path / "e", data=phantom_dir, precision="fp32")
    ).engines
    other = members(pack([other_engines[0]["engine"]], tmp_path / "other.tar.gz", samples=8, data=phantom_dir))
    files = members(bundle)
    files["verification.npz"] = other[
        "verification.npz"
    ]  # the set of another model, checksums and description made to fit
    description = json.loads(files["bundle.json"])
    description["verification"] = json.loads(other["bundle.json"])["verification"]
    files["bundle.json"] = json.dumps(description).encode()
    files["SHA256SUMS"] = "".join(
        f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in files.items() if n != "SHA256SUMS"
    ).encode()
    with pytest.raises(BundleError, match="they are different models"):
        verify_bundle(repack(files, tmp_path / "swapped.tar.gz"))


def test_an_engine_that_disagrees_on_this_device_fails_with_exit_3(bundle, phantom_engines, tmp_path):
    """An engine of the same model that computes something else (a broken device build): verification fails."""
    model = onnx.load(str(phantom_engines[0]))
    out = model.graph.output[0].name
    model.graph.node[-1].output[0] = out + "_pre"
    model.graph.initializer.append(numpy_helper.from_array(np.array([8.0], np.float32), "shift"))
    model.graph.node.append(helper.make_node("Add", [out + "_pre", "shift"], [out]))
    broken = tmp_path / "onnxruntime-fp32.onnx"
    onnx.save(model, str(broken))
    manifest_for(broken, phantom_engines[0])
    result = runner.invoke(app, ["verify", str(bundle), "--engine", str(broken)])
    assert result.exit_code == 3 and "FAILED" in result.output and "agreement" in result.output
    with Segmenter.load(broken) as segmenter, pytest.raises(Exception, match="failed verification"):
        segmenter.verify(bundle)


def test_pack_then_verify_on_a_real_shared_patient(segmenting_run, real_data, tmp_path):
    """The verification set comes from a real patient: a checkpoint whose val split is one real patient."""
    ckpt = load_checkpoint(segmenting_run.best_path)
    ckpt.pop("path")
    split = dict(ckpt["split"], val=[SMALL_REAL_PATIENT], train=[], test=[])
    save_checkpoint(tmp_path / "real.pt", dict(ckpt, split=split, data_root=str(real_data)))
    engines = build_engines([tmp_path / "real.pt"], BuildOptions(out_dir=tmp_path / "e", precision="fp32")).engines
    path = pack([engines[0]["engine"]], tmp_path / "real.tar.gz", samples=6)
    description = json.loads(members(path)["bundle.json"])
    assert description["verification"]["patients"] == [SMALL_REAL_PATIENT]
    assert verify_bundle(path).passed


def test_build_on_the_device_from_a_bundle_is_verified_there(bundle, tmp_path):
    """`lggdeploy build BUNDLE`: an engine built from the bundle's graph, run on its verification set before it is
    written, with a manifest that names the bundle, the graph and the result; `verify --engine` accepts it."""
    from lggdeploy.engines.formats import read_manifest

    description = json.loads(members(bundle)["bundle.json"])
    result = runner.invoke(
        app, ["build", str(bundle), "--backend", "onnxruntime", "--precision", "fp32", "-o", str(tmp_path / "device")]
    )
    assert result.exit_code == 0, result.output
    assert "built on this device from the bundle" in result.output and "passed" in result.output
    (engine,) = list((tmp_path / "device").rglob("onnxruntime-fp32.onnx"))
    manifest = read_manifest(engine)
    assert (
        manifest["built_on_device"]["source"] == "onnx/model.onnx"
        and manifest["built_on_device"]["verification"]["passed"]
    )
    assert (
        manifest["checkpoint_sha256"] == description["checkpoint_sha256"]
        and manifest["threshold"] == description["threshold"]
    )
    assert manifest["gate"]["passed"]  # the build machine's gate travels with the model
    assert verify_bundle(bundle, engine=engine).passed
    # The README a device reads names this very command.
    assert (
        "lggdeploy build scanner-bundle.tar.gz --backend tensorrt --precision fp32 --min-batch 1"
        in members(bundle)["README.md"].decode()
    )
    # A precision the bundle holds no graph for: one line that says what to pack.
    result = runner.invoke(
        app, ["build", str(bundle), "--backend", "onnxruntime", "--precision", "int8", "-o", str(tmp_path / "device")]
    )
    assert (
        result.exit_code != 0
        and "holds no int8-cpu graph to build from" in result.output
        and "Traceback" not in result.output
    )
    result = runner.invoke(app, ["build", str(bundle), str(bundle), "-o", str(tmp_path / "device")])
    assert result.exit_code != 0 and "give one bundle on its own" in result.output


def test_a_device_build_that_disagrees_is_not_written(bundle, tmp_path, monkeypatch):
    """The backend on the device produces a different model (here: logits shifted by +8): the device's gate refuses it."""
    import lggdeploy.backends.onnxruntime as ort_backend

    def shifted_build(onnx_path, fmt, target, options):
        model = onnx.load(str(onnx_path))
        out = model.graph.output[0].name
        model.graph.node[-1].output[0] = out + "_pre"
        model.graph.initializer.append(numpy_helper.from_array(np.array([8.0], np.float32), "shift"))
        model.graph.node.append(helper.make_node("Add", [out + "_pre", "shift"], [out]))
        onnx.save(model, str(target))
        return {"note": "shifted"}

    monkeypatch.setattr(ort_backend, "build", shifted_build)
    result = runner.invoke(
        app, ["build", str(bundle), "--backend", "onnxruntime", "--precision", "fp32", "-o", str(tmp_path / "device")]
    )
    assert result.exit_code == 3, result.output
    assert "disagrees with the validated model" in result.output and "no engine written" in result.output
    assert not [p for p in (tmp_path / "device").rglob("*") if p.is_file()]
    result = runner.invoke(
        app,
        [
            "build",
            str(bundle),
            "--backend",
            "onnxruntime",
            "--precision",
            "fp32",
            "--force",
            "-o",
            str(tmp_path / "forced"),
        ],
    )
    assert result.exit_code == 0 and "FAILED" in result.output

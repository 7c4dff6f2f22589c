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
    (report,) = verify_bundle(bundle)
    assert report.passed and report.overall_agreement == 1.0 and len(report.per_slice_agreement) == 8
    assert report.authenticity.startswith("NOT CHECKED")  # unsigned, no trusted key: integrity only
    result = runner.invoke(app, ["verify", str(bundle)])
    assert result.exit_code == 0 and "verified" in result.output


def test_verify_imports_no_torch(bundle):
    code = f"import sys; from lggdeploy.runtime.verify import verify_bundle; (r,) = verify_bundle({str(bundle)!r}); print(r.passed, 'torch' in sys.modules)"
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


@pytest.mark.slow
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


@pytest.mark.slow  # 7 s; the phantom pack + verify stays in the default set
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
    assert all(r.passed for r in verify_bundle(path))


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
    assert verify_bundle(bundle, engine=engine)[0].passed
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


# --- trust: signatures, paths confined to the bundle, bundle.json's schema ------------------------------------------


def resum(files: dict[str, bytes]) -> dict[str, bytes]:
    """What whoever can change a bundle can do: recompute SHA256SUMS over the changed files."""
    import hashlib

    body = {n: b for n, b in files.items() if n not in ("SHA256SUMS", "signature.json")}
    sums = "".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in sorted(body.items()))
    return {**files, "SHA256SUMS": sums.encode()}


def edited(files: dict[str, bytes], change) -> dict[str, bytes]:
    description = json.loads(files["bundle.json"])
    change(description)
    return resum({**files, "bundle.json": json.dumps(description).encode()})


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from lggdeploy.common.signing import keygen

    folder = tmp_path_factory.mktemp("keys")
    return keygen(folder), keygen(folder, "someone-else")


@pytest.fixture(scope="module")
def signed_bundle(phantom_engines, phantom_dir, keys, tmp_path_factory):
    (private, _), _ = keys
    out = tmp_path_factory.mktemp("signed") / "signed.tar.gz"
    return pack(phantom_engines, out, samples=8, data=phantom_dir, sign=private)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(keys, tmp_path):
    import os
    import stat

    from lggdeploy.common.signing import SignatureError, keygen

    (private, public), _ = keys
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600 and b"PRIVATE KEY" in private.read_bytes()
    assert b"PUBLIC KEY" in public.read_bytes()
    with pytest.raises(SignatureError, match="already exists"):
        keygen(private.parent)
    result = runner.invoke(app, ["keygen", "-o", str(tmp_path / "k")])
    assert result.exit_code == 0 and (tmp_path / "k" / "lggdeploy-signing.key").is_file(), result.output


def test_a_signed_bundle_verifies_with_its_key_and_is_refused_with_another_or_unsigned(signed_bundle, bundle, keys):
    (_, public), (_, other) = keys
    (report,) = verify_bundle(signed_bundle, trusted_key=public)
    assert report.passed and report.authenticity.startswith("signed by the trusted key")
    result = runner.invoke(app, ["verify", str(signed_bundle), "--trusted-key", str(other)])
    assert result.exit_code == 2 and "not by the trusted key" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["verify", str(bundle), "--trusted-key", str(public)])
    assert result.exit_code == 2 and "is not signed" in result.output
    result = runner.invoke(app, ["verify", str(bundle)])  # no key: integrity checked, authenticity said not to be
    assert result.exit_code == 0 and "authenticity: NOT CHECKED" in result.output


def test_a_signed_bundle_changed_and_resummed_is_refused(signed_bundle, keys, tmp_path):
    (_, public), _ = keys
    files = edited(members(signed_bundle), lambda d: d["verification"].update(min_agreement=0.5))
    from lggdeploy.common.signing import SignatureError

    with pytest.raises(SignatureError, match="signature does not match"):
        verify_bundle(repack(files, tmp_path / "lowered.tar.gz"), trusted_key=public)
    result = runner.invoke(
        app, ["build", str(tmp_path / "lowered.tar.gz"), "--backend", "onnxruntime", "--trusted-key", str(public)]
    )
    assert result.exit_code == 2 and "signature does not match" in result.output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["verification"].update(min_agreement=0.0), r"min_agreement 0.0 is not in \(0, 1\]"),
        (lambda d: d["engines"][0].update(file="../../outside.onnx"), "points outside the bundle"),
        (lambda d: d["engines"][0].update(file="/etc/passwd"), "is not a path inside the bundle"),
        (lambda d: d["verification"].update(file="/etc/passwd"), "is not a path inside the bundle"),
        (lambda d: d.pop("verification"), "lacks 'verification'"),
        (lambda d: d["verification"].update(file="nowhere.npz"), "verification file 'nowhere.npz' is missing"),
        (lambda d: d.update(engines="all"), "'engines' is 'all', not a list"),
        (lambda d: d.update(img_size="128"), "'img_size' is '128', not a int"),
    ],
)
def test_a_resummed_bundle_json_that_breaks_its_schema_is_one_line(bundle, tmp_path, change, message):
    path = repack(edited(members(bundle), change), tmp_path / "edited.tar.gz")
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and __import__("re").search(message, result.output)


def test_a_verification_file_that_is_not_the_arrays_pack_writes_is_refused(bundle, tmp_path):
    files = members(bundle)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"pickled": True}], dtype=object), allow_pickle=True)
    files = resum({**files, "verification.npz": buffer.getvalue()})
    result = runner.invoke(app, ["verify", str(repack(files, tmp_path / "pickle.tar.gz"))])
    assert result.exit_code == 2 and "is not a verification set lggdeploy wrote" in result.output


def test_a_device_may_only_be_stricter_than_the_bundle(bundle):
    with pytest.raises(BundleError, match="looser than the 0.9"):
        verify_bundle(bundle, min_agreement=0.5)
    assert verify_bundle(bundle, min_agreement=0.95)[0].min_agreement == 0.95


def test_a_model_name_from_a_bundle_never_writes_outside_out(bundle, tmp_path):
    files = edited(members(bundle), lambda d: d["model"].update(name="../../escaped"))
    path = repack(files, tmp_path / "named.tar.gz")
    out = tmp_path / "devout" / "a" / "b"
    result = runner.invoke(app, ["build", str(path), "--backend", "onnxruntime", "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = [p for p in tmp_path.rglob("*.onnx") if "devout" in p.parts]
    assert written and all(p.resolve().is_relative_to(out.resolve()) for p in written)


def test_a_member_declaring_more_than_a_bundle_may_hold_is_refused_before_extraction(bundle, tmp_path, monkeypatch):
    from lggdeploy.runtime import bundle as bundle_module

    monkeypatch.setattr(bundle_module, "MAX_MEMBER_BYTES", 1000)
    with pytest.raises(BundleError, match="refused before extraction"):
        verify_bundle(bundle)


@pytest.mark.slow
def test_verify_checks_every_engine_a_bundle_holds(phantom_engines, segmenting_run, phantom_dir, tmp_path):
    int8 = build_engines(
        [segmenting_run.best_path],
        BuildOptions(
            out_dir=phantom_engines[0].parent.parent, data=phantom_dir, precision="int8", qat="off", force=True
        ),
    ).engines
    both = pack([*phantom_engines, Path(int8[0]["engine"])], tmp_path / "two.tar.gz", samples=8, data=phantom_dir)
    reports = verify_bundle(both)
    assert sorted(Path(r.engine).name for r in reports) == ["onnxruntime-fp32.onnx", "onnxruntime-int8-cpu.onnx"]
    result = runner.invoke(
        app, ["pack", *map(str, phantom_engines * 2), "-o", str(tmp_path / "twice.tar.gz"), "--samples", "1000"]
    )
    assert result.exit_code == 0 and "1 engine(s)" in result.output and "1000 verification" not in result.output, (
        result.output
    )

"""The torch-free edge runtime and `lggdeploy predict`."""

import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from lggdeploy.cli import app
from lggdeploy.common.errors import EngineError, LggError
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.transforms import Normalization
from lggdeploy.engines.build import BuildOptions, build_engines
from lggdeploy.engines.formats import read_manifest
from lggdeploy.runtime import Segmenter, largest_connected_component
from lggdeploy.scoring import score_runner
from tests.conftest import manifest_for


@pytest.fixture(scope="module")
def int8_engine(segmenting_run, phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime_engines")
    report = build_engines(
        [segmenting_run.best_path],
        BuildOptions(out_dir=out, data=phantom_dir, precision="int8", calib_samples=8, max_drop=100),
    )
    return report.engines[0]["engine"]


def test_importing_the_runtime_imports_no_torch():
    code = "import sys, lggdeploy.runtime, lggdeploy.runtime.predict, lggdeploy.cli; print(sorted(m for m in ('torch', 'segmentation_models_pytorch', 'tensorrt') if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )


def test_predict_masks_equal_what_bench_scores(int8_engine, segmenting_run, phantom_dir):
    manifest = read_manifest(int8_engine)
    dataset = load_dataset(phantom_dir)
    slices = load_slices(dataset, manifest["split"]["val"])
    with Segmenter.load(int8_engine) as segmenter:
        prediction = segmenter.predict(slices.images)
        scored = score_runner(
            segmenter.runner,
            slices,
            manifest["img_size"],
            Normalization.from_json(manifest["normalization"]),
            threshold=manifest["threshold"],
            show_progress=False,
        )
    assert prediction.masks.shape == slices.masks.shape and prediction.probabilities.dtype == np.float32
    assert np.array_equal(prediction.masks, prediction.probabilities > manifest["threshold"])
    tp = (prediction.masks & slices.masks).sum()
    dice = 2 * tp / (prediction.masks.sum() + slices.masks.sum())
    assert dice == pytest.approx(scored["aggregates"]["global_dice"], abs=1e-9)
    one = Segmenter.load(int8_engine).predict(slices.images[3])
    assert np.array_equal(one.masks[0], prediction.masks[3])


def test_segmenter_is_safe_to_share_between_threads(int8_engine, phantom_dir):
    images = load_slices(load_dataset(phantom_dir), [load_dataset(phantom_dir).patient_ids[0]]).images
    segmenter = Segmenter.load(int8_engine)
    expected = segmenter.predict(images).masks
    results, errors = {}, []

    def work(k):
        try:
            results[k] = segmenter.predict(images).masks
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and all(np.array_equal(r, expected) for r in results.values())


def test_bad_inputs_and_manifests_are_clear(int8_engine, tmp_path):
    segmenter = Segmenter.load(int8_engine)
    with pytest.raises(LggError, match=r"shape \(256, 256, 3\).*got \(128, 128, 3\)"):
        segmenter.predict(np.zeros((2, 128, 128, 3), np.uint8))
    with pytest.raises(LggError, match="got \\(256, 256\\)"):
        segmenter.predict(np.zeros((256, 256), np.uint8))
    with pytest.raises(LggError, match="uint8"):
        segmenter.predict(np.zeros((256, 256, 3), np.float32))
    orphan = tmp_path / "orphan.onnx"
    shutil.copy(int8_engine, orphan)
    with pytest.raises(EngineError, match="no manifest"):
        Segmenter.load(orphan)
    manifest_for(orphan, int8_engine, providers=["CUDAExecutionProvider"])
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(EngineError, match="providers"):
            Segmenter.load(orphan)
    broken = tmp_path / "broken-postprocess.onnx"
    shutil.copy(int8_engine, broken)
    manifest_for(broken, int8_engine, postprocess={"min_component_voxels": -7})
    with pytest.raises(EngineError, match="postprocess"):
        Segmenter.load(broken)
    plan = tmp_path / "tensorrt-int8.plan"
    plan.write_bytes(b"x")
    manifest_for(plan, int8_engine, backend="tensorrt", tensorrt_version="10.16.0", compute_capability="9.0")
    with pytest.raises(LggError, match="(?i)tensorrt|gpu"):
        Segmenter.load(plan)


def test_largest_connected_component_on_a_constructed_volume():
    volume = np.zeros((5, 20, 20), bool)
    volume[1:4, 2:8, 2:8] = True  # 3 x 6 x 6 = 108 voxels, spanning slices
    volume[0, 15:18, 15:18] = True  # 9 voxels
    volume[4, 0, 19] = True  # 1 voxel
    volume[2, 10, 10] = volume[3, 10, 11] = True  # diagonal only: not 6-connected to each other
    kept = largest_connected_component(volume)
    assert kept.sum() == 108 and kept[1:4, 2:8, 2:8].all()
    assert not largest_connected_component(np.zeros((2, 4, 4), bool)).any()


def test_predict_cli_on_a_folder_with_one_corrupt_file(int8_engine, phantom_dir, tmp_path):
    patient = load_dataset(phantom_dir).patient_ids[0]
    source = tmp_path / "in" / patient
    shutil.copytree(phantom_dir / patient, source)
    corrupt = sorted(source.glob(f"{patient}_2.tif"))[0]
    corrupt.write_bytes(b"broken")
    result = CliRunner().invoke(
        app, ["predict", str(int8_engine), str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--spacing", "0.5"]
    )
    assert result.exit_code == 2, result.output
    assert f"{patient}_2.tif" in result.output and "Traceback" not in result.output
    n = len(list(source.glob("*_mask.tif")))
    masks = sorted((tmp_path / "out" / patient).glob("*_pred_mask.tif"))
    assert len(masks) == n - 1 and len(list((tmp_path / "out" / patient).glob("*_overlay.png"))) == n - 1
    mask = tifffile.imread(masks[0])
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert Image.open(next((tmp_path / "out" / patient).glob("*_overlay.png"))).size == (256, 256)
    row = (tmp_path / "out" / "patients.csv").read_text().splitlines()
    assert row[0].startswith("patient,slices,tumor_slices,tumor_pixels") and patient in row[1]


def test_predict_keeps_every_mask_with_its_own_slice(int8_engine, phantom_dir, tmp_path):
    """A garbage mask and a {0, 1} mask in a patient folder: every slice whose image is fine is still predicted, and
    each written mask is the prediction of that slice alone (not of its neighbour)."""
    patient = load_dataset(phantom_dir).patient_ids[0]
    source = tmp_path / "in" / patient
    shutil.copytree(phantom_dir / patient, source)
    (source / f"{patient}_5_mask.tif").write_bytes(b"garbage")
    tifffile.imwrite(
        source / f"{patient}_7_mask.tif", (tifffile.imread(source / f"{patient}_7_mask.tif") > 0).astype(np.uint8)
    )
    result = CliRunner().invoke(app, ["predict", str(int8_engine), str(tmp_path / "in"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{patient}_5_mask.tif" in result.output and f"{patient}_7_mask.tif" in result.output
    images = sorted(source.glob(f"{patient}_*[0-9].tif"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    written = {p.name: p for p in (tmp_path / "out" / patient).glob("*_pred_mask.tif")}
    assert len(written) == len(images)
    with Segmenter.load(int8_engine) as segmenter:
        for image in images:
            alone = segmenter.predict(tifffile.imread(image)).masks[0]
            assert np.array_equal(tifffile.imread(written[f"{image.stem}_pred_mask.tif"]) > 0, alone), image.name
    rows = (tmp_path / "out" / "patients.csv").read_text().splitlines()
    assert rows[1].split(",")[1] == str(len(images)) and rows[1].endswith(
        ","
    )  # every slice; no Dice without every mask


def test_an_engine_that_is_not_its_manifests_is_refused(int8_engine, tmp_path):
    folder = tmp_path / "engines"
    folder.mkdir()
    fp32 = folder / "onnxruntime-fp32.onnx"
    shutil.copy(int8_engine, fp32)
    from lggdeploy.engines.formats import manifest_path, write_manifest

    manifest = read_manifest(int8_engine)
    write_manifest(
        fp32, dict(manifest, precision="fp32", int8_profile=None, sha256="0" * 64)
    )  # an fp32 manifest; the int8 file
    with pytest.raises(
        EngineError,
        match=r"onnxruntime-fp32.onnx \(sha256 .*is not the engine its manifest onnxruntime-fp32.onnx.json describes",
    ):
        Segmenter.load(fp32)
    manifest_path(fp32).write_text(manifest_path(fp32).read_text().replace('"sha256"', '"sha256_was"'))
    with pytest.raises(EngineError, match="records no sha256"):
        Segmenter.load(fp32)


def test_a_manifest_with_another_input_size_is_refused(int8_engine, tmp_path):
    engine = tmp_path / "onnxruntime-int8-cpu.onnx"
    shutil.copy(int8_engine, engine)
    manifest_for(engine, int8_engine, img_size=64)
    with pytest.raises(EngineError, match="img_size 64"):
        Segmenter.load(engine)


def test_threads_are_bounded_by_the_cores(int8_engine, tmp_path):
    import os

    result = CliRunner().invoke(
        app, ["predict", str(int8_engine), str(tmp_path), "--threads", "100000", "-o", str(tmp_path / "o")]
    )
    assert (
        result.exit_code == 2
        and f"must lie in [1, {os.cpu_count()}]" in result.output
        and "Traceback" not in result.output
    )


def test_predict_on_a_wrong_shape_slice_writes_and_claims_nothing(int8_engine, tmp_path):
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "X_1.tif", np.zeros((128, 128, 3), np.uint8))
    result = CliRunner().invoke(
        app, ["predict", str(int8_engine), str(tmp_path / "in" / "X_1.tif"), "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "patients.csv" not in result.output and "shape" in result.output
    assert not (tmp_path / "out" / "patients.csv").exists()


def test_an_outline_step_keeps_masks_and_probabilities_in_agreement(int8_engine, phantom_dir):
    """The runtime hands the outline step its slices and every pixel's probability; the pixels it adds or removes
    get probabilities on the right side of the threshold."""
    from lggdeploy.outline import dilate
    from lggdeploy.postprocess import PostProcess

    manifest = read_manifest(int8_engine)
    slices = load_slices(load_dataset(phantom_dir), manifest["split"]["val"])
    with Segmenter.load(int8_engine, postprocess=PostProcess()) as plain:
        raw = plain.predict(slices.images)
    with Segmenter.load(int8_engine, postprocess=PostProcess.parse("none+crf")) as outlined:
        redrawn = outlined.predict(slices.images)
    assert raw.masks.any() and not np.array_equal(redrawn.masks, raw.masks)
    assert np.array_equal(redrawn.masks, redrawn.probabilities > manifest["threshold"])
    assert all((r <= dilate(m, 8)).all() for r, m in zip(redrawn.masks, raw.masks, strict=True))


def test_an_engine_that_redraws_outlines_is_refused_without_pydensecrf2(int8_engine, tmp_path, monkeypatch):
    from lggdeploy.postprocess import PostProcess

    engine = tmp_path / "outlined.onnx"
    shutil.copy(int8_engine, engine)
    manifest_for(engine, int8_engine, postprocess=PostProcess.parse("1034,0,0.9+crf").to_json())
    assert Segmenter.load(engine).postprocess.outline is not None
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(LggError, match=r"outlined\.onnx: .*pip install 'lggdeploy\[outline\]'"):
        Segmenter.load(engine)
    result = CliRunner().invoke(app, ["predict", str(engine), str(tmp_path / "none.tif")])
    assert result.exit_code != 0 and "lggdeploy[outline]" in result.output and "Traceback" not in result.output


def test_probabilities_set_around_any_threshold_fall_on_the_right_side():
    from lggdeploy.runtime.segmenter import float32_around

    for threshold in (0.3, 0.45, 0.5, 0.7, 0.1234567):
        below, above = float32_around(threshold)
        assert below.dtype == above.dtype == np.float32
        assert (np.array([below, above], np.float32) > threshold).tolist() == [False, True]
        assert np.nextafter(below, np.float32(1)) == above  # adjacent: nothing else moved further than needed

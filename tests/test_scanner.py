"""Scanner-native input and output on DICOM series and NIfTI volumes written from the real shared patients' slices
(tests/scanner_fixtures.py): the same masks whatever the container, the SEG read back, the geometry, bad input."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("highdicom")

from scanner_fixtures import Geometry, patient_slices, write_dicom_study, write_nifti  # noqa: E402

from lggdeploy.cli import app  # noqa: E402
from lggdeploy.common.errors import DataError, LggError  # noqa: E402
from lggdeploy.engines.build import BuildOptions, build_engines  # noqa: E402
from lggdeploy.runtime import PostProcess, Segmenter  # noqa: E402
from lggdeploy.runtime.predict import predict_paths  # noqa: E402
from lggdeploy.scanner.case import RoleChoice, model_input, plan, plan_rows, segment_case  # noqa: E402
from lggdeploy.scanner.intensity import DisplayRange, to_model_scale, window_range  # noqa: E402
from lggdeploy.scanner.predict import predict_cases  # noqa: E402

PATIENTS = ("TCGA_CS_4943_20000902", "TCGA_HT_7692_19960724")  # 20 slices each, every sequence present
runner = CliRunner()


@pytest.fixture(scope="module")
def engine(segmenting_run, phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("scanner_engine")
    built = build_engines([segmenting_run.best_path], BuildOptions(out_dir=out, data=phantom_dir, precision="fp32"))
    return built.engines[0]["engine"]


@pytest.fixture(scope="module")
def segmenter(engine):
    # The phantom-trained model on real patients: a low threshold and no post-processing so that its masks are not
    # empty (an equality of empty masks would prove nothing).
    with Segmenter.load(engine, threshold=0.02, postprocess=PostProcess()) as seg:
        yield seg


@pytest.fixture(scope="module")
def slices(real_data):
    return {p: patient_slices(real_data, p) for p in PATIENTS}


@pytest.fixture(scope="module")
def studies(slices, tmp_path_factory):
    """Both patients' studies in one folder (mixed files, nested, shuffled names; FLAIR numbered in reverse order;
    0.9375 mm pixels, 5.5 mm between slice positions, SliceThickness 5.0)."""
    root = tmp_path_factory.mktemp("dicom") / "export"
    uids = {p: write_dicom_study(root, slices[p], seed=i, reverse=(1,)) for i, p in enumerate(PATIENTS)}
    return root, uids


def tiff_masks(segmenter, real_data, patient, tmp_path) -> np.ndarray:
    """What predict writes for the patient's TIFFs, read back from its mask files."""
    import tifffile

    source = tmp_path / "kaggle" / patient
    shutil.copytree(real_data / patient, source)
    predict_paths(segmenter, source, tmp_path / "tiff-out")
    files = sorted((tmp_path / "tiff-out" / patient).glob("*_pred_mask.tif"), key=lambda p: int(p.stem.split("_")[-3]))
    return np.stack([tifffile.imread(f) > 0 for f in files])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def test_the_intensity_mapping_is_the_identity_on_the_data_sets_scale():
    values = np.arange(256, dtype=np.float32)
    assert window_range(128, 256) == (0.0, 255.0)
    assert np.array_equal(to_model_scale(values, DisplayRange(*window_range(128, 256), "window")), values)
    for low_bits in (0, 7, 15):  # 12-bit values made from 8-bit ones map back to them exactly
        twelve_bit = (values * 16 + low_bits) * 0.5 + 10  # rescale slope 0.5, intercept 10
        assert np.array_equal(to_model_scale(twelve_bit, DisplayRange(10, 10 + 0.5 * 4095, "window", 0.5)), values)
    continuous = to_model_scale(np.linspace(-1, 1, 1000), DisplayRange(-1, 1, "minmax", 0.0))
    assert continuous.min() == 0 and continuous.max() == 255 and np.all(np.diff(continuous.astype(int)) >= 0)


def test_dicom_series_give_exactly_the_masks_of_the_tiffs(segmenter, studies, slices, real_data, tmp_path):
    root, uids = studies
    cases = plan(root)
    assert len(cases) == 2  # two studies mixed in one folder: two cases
    roles = {c.roles["flair"].key: c for c in cases}
    for patient in PATIENTS:
        case = roles[uids[patient][1]]
        assert {r: s.key for r, s in case.roles.items()} == {
            "pre": uids[patient][0],
            "flair": uids[patient][1],
            "post": uids[patient][2],
        }
        x, ranges, _ = model_input(case, resample=False, intensity="auto")
        assert np.array_equal(x, slices[patient])  # the TIFFs' own values, in the data set's layout and order
        assert {r.source for r in ranges.values()} == {"window"}
        result = segment_case(segmenter, case)
        expected = tiff_masks(segmenter, real_data, patient, tmp_path / patient)
        assert expected.any() and not expected.all()
        assert np.array_equal(result.model_masks, expected)
        # the volume from the real geometry: 0.9375² mm pixels, 5.5 mm between positions (not SliceThickness 5.0)
        assert result.voxel_mm3 == pytest.approx(0.9375 * 0.9375 * 5.5)
        assert result.volume_ml == pytest.approx(expected.sum() * 0.9375**2 * 5.5 / 1000)


def test_the_seg_reads_back_as_the_masks_and_references_the_flair_instances(segmenter, studies, slices, tmp_path):
    import highdicom as hd
    import pydicom

    root, uids = studies
    case = next(c for c in plan(root) if c.roles["flair"].key == uids[PATIENTS[0]][1])
    records = predict_cases(segmenter, [case], tmp_path / "out")
    folder = tmp_path / "out" / case.name
    seg_path = folder / records[0]["outputs"]["seg"]
    seg = hd.seg.segread(seg_path)
    flair = case.roles["flair"]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in flair.datasets}
    result = segment_case(segmenter, case)
    plain = pydicom.dcmread(seg_path)
    assert plain.Modality == "SEG" and plain.SegmentSequence[0].SegmentLabel == "tumor"
    assert plain.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    algorithm = plain.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "lggdeploy" and segmenter.manifest["sha256"] in algorithm.AlgorithmParameters
    referenced = {str(r.ReferencedSOPInstanceUID) for r in plain.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(by_uid)  # every reference resolves to an input instance, and every instance is referenced
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(by_uid), segment_numbers=[1], ignore_spatial_locations=True
    )[..., 0].astype(bool)
    z = {uid: float(ds.ImagePositionPatient[2]) for uid, ds in by_uid.items()}
    order = np.argsort([z[uid] for uid in by_uid])  # feet to head: the data set's slice order here
    assert np.array_equal(frames[order], result.model_masks)
    raw = plain.pixel_array.astype(bool).reshape(-1, *frames.shape[1:])  # pydicom alone: frames in the SEG's order
    sources = [
        str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for f in plain.PerFrameFunctionalGroupsSequence
    ]
    assert set(sources) <= set(by_uid)
    by_height = sorted(range(len(raw)), key=lambda i: z[sources[i]])
    assert np.array_equal(raw[by_height], result.model_masks)
    record = json.loads((folder / "case.json").read_text())
    assert (
        record["tumor"]["voxels"] == int(result.masks.sum())
        and record["algorithm"]["engine_sha256"] == segmenter.manifest["sha256"]
    )


def test_nifti_volumes_give_exactly_the_masks_and_keep_the_flair_affine(segmenter, slices, tmp_path):
    import nibabel as nib

    patient = PATIENTS[0]
    folder = tmp_path / "nifti"
    folder.mkdir()
    names = {0: "t1.nii.gz", 1: "flair.nii.gz", 2: "t1ce.nii.gz"}
    affines = {
        c: write_nifti(folder / names[c], slices[patient][..., c], Geometry(pixel_mm=(0.8, 0.8), slice_mm=3.3))
        for c in names
    }
    (case,) = plan(folder)
    assert {r: Path(s.key).name for r, s in case.roles.items()} == {
        "pre": "t1.nii.gz",
        "flair": "flair.nii.gz",
        "post": "t1ce.nii.gz",
    }
    x, ranges, _ = model_input(case, False, "auto")
    assert np.array_equal(x, slices[patient]) and {r.source for r in ranges.values()} == {"calibration"}
    records = predict_cases(segmenter, [case], tmp_path / "out")
    mask = nib.load(tmp_path / "out" / case.name / records[0]["outputs"]["nifti_mask"])
    assert np.allclose(mask.affine, affines[1]) and mask.shape == nib.load(folder / "flair.nii.gz").shape
    expected = segmenter.predict(slices[patient]).masks
    on_file = np.asarray(mask.dataobj).astype(bool)[:, ::-1, :]  # written as dcm2niix lays it out: rows flipped
    assert np.array_equal(np.transpose(on_file, (2, 1, 0)), expected)
    assert records[0]["tumor"]["volume_ml"] == pytest.approx(expected.sum() * 0.8 * 0.8 * 3.3 / 1000, abs=1e-3)


def test_twelve_bit_scanner_values_map_back_to_the_same_masks(segmenter, slices, tmp_path):
    """×16 plus noise in the low bits, rescale slope 0.5 and intercept 10, the window showing that range: the
    documented mapping brings the values back within one grey level, and the masks agree at 0.99 or more."""
    for patient in PATIENTS:
        uids = write_dicom_study(tmp_path / patient, slices[patient], scanner_bits=True, seed=7)
        (case,) = plan(tmp_path / patient)
        x, _, _ = model_input(case, False, "auto")
        assert np.array_equal(x, slices[patient])  # the documented mapping inverts the 12-bit expansion exactly
        masks = segment_case(segmenter, case).model_masks
        expected = segmenter.predict(slices[patient]).masks
        assert expected.any() and dice(masks, expected) >= 0.99, (patient, dice(masks, expected))
        assert case.roles["flair"].key == uids[1]


def test_missing_t1_series_are_filled_with_flair_and_said(segmenter, slices, tmp_path):
    write_dicom_study(tmp_path / "flair-only", slices[PATIENTS[0]], channels=(1,))
    (case,) = plan(tmp_path / "flair-only")
    assert set(case.roles) == {"flair"} and len(case.notes) == 2
    x, _, _ = model_input(case, False, "auto")
    flair = slices[PATIENTS[0]][..., 1]
    assert all(np.array_equal(x[..., c], flair) for c in range(3))
    record = predict_cases(segmenter, [case], tmp_path / "out")[0]
    assert record["filled_with_flair"] == ["T1 pre-contrast", "T1 post-contrast"]


def test_roles_are_chosen_in_one_line_when_ambiguous(slices, tmp_path):
    study = tmp_path / "two-flairs"
    uids = write_dicom_study(study, slices[PATIENTS[0]], channels=(1,))
    write_dicom_study(study / "again", slices[PATIENTS[0]], channels=(1,), seed=3)  # another study: its own case
    assert len(plan(study)) == 2
    with pytest.raises(DataError, match="matches none of the series found"):
        plan(study, RoleChoice(flair="1.2.3"))
    (chosen,) = plan(study, RoleChoice(flair=uids[1]))
    assert chosen.roles["flair"].key == uids[1] and chosen.roles["flair"].role_reason == "--flair"
    write_dicom_study(tmp_path / "no-flair", slices[PATIENTS[0]], channels=(0, 2))
    with pytest.raises(DataError, match="no FLAIR series found among: series 2 'AX T1 PRE'.*--flair UID"):
        plan(tmp_path / "no-flair")


def test_a_sequence_on_another_grid_is_refused_or_resampled(segmenter, slices, tmp_path):
    x = slices[PATIENTS[0]]
    write_dicom_study(tmp_path / "study", x, channels=(1,))
    write_dicom_study(tmp_path / "t1", x, channels=(0,), geometry=Geometry(pixel_mm=(0.9, 0.9)))
    t1 = tmp_path / "t1"
    with pytest.raises(DataError, match=r"not on FLAIR's grid: voxel spacing .* add --resample"):
        model_input(plan(tmp_path / "study", RoleChoice(pre=str(t1)))[0], False, "auto")
    (case,) = plan(tmp_path / "study", RoleChoice(pre=str(t1)))
    resampled, _, _ = model_input(case, True, "auto")
    assert any("resampled onto FLAIR's grid" in n for n in case.notes)
    assert np.array_equal(resampled[..., 1], x[..., 1])  # FLAIR untouched
    from scipy import ndimage

    # FLAIR's pixel (r, c) lies where the T1 (0.9 mm pixels, same origin) has its pixel (r, c) × 0.9375 / 0.9
    rows, cols = np.meshgrid(np.arange(200), np.arange(200), indexing="ij")
    for k in (0, 10):
        expected = ndimage.map_coordinates(
            x[k, ..., 0].astype(float), [rows * 0.9375 / 0.9, cols * 0.9375 / 0.9], order=1
        )
        assert np.abs(resampled[k, :200, :200, 0].astype(int) - np.rint(expected)).max() <= 1


def test_pydicoms_own_test_files_are_read_or_refused_in_one_line():
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) > 50
    refused = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            try:
                for case in plan(path):
                    model_input(case, False, "auto")
            except LggError as exc:
                assert "\n" not in str(exc) and str(exc), path
                refused += 1
    assert refused > 0


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_predict_prints_the_plan_and_writes_no_patient_identity(engine, studies, tmp_path):
    root, uids = studies
    result = cli("predict", engine, root, "--flair", uids[PATIENTS[0]][1], "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "series found" in result.output and "FLAIR" in result.output and "ml" in result.output
    for value in ("DOE", "JANE", "MRN-0042", "ACC-77", "19700101", "REF^DOC"):
        assert value not in result.output
        for text in [p.read_text() for p in (tmp_path / "out").rglob("*.json")] + [
            (tmp_path / "out" / "cases.csv").read_text()
        ]:
            assert value not in text
    seg = next((tmp_path / "out").rglob("tumor-seg.dcm"))
    import pydicom

    assert str(pydicom.dcmread(seg).PatientName) == "DOE^JANE"  # the SEG carries what the standard requires


def test_bad_scanner_input_is_one_line_and_writes_nothing(engine, slices, tmp_path):
    x = slices[PATIENTS[0]]
    cases = {}
    good = tmp_path / "good"
    write_dicom_study(good, x, channels=(1,))
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    victim = sorted(p for p in truncated.rglob("*") if p.is_file())[0]
    victim.write_bytes(victim.read_bytes()[:-3000])
    cases["truncated"] = truncated
    stray = tmp_path / "stray"
    shutil.copytree(good, stray)
    (stray / "notes.txt").write_text("not an image")
    cases["non-DICOM"] = stray
    one = tmp_path / "one-slice"
    write_dicom_study(one, x[:1], channels=(1,))
    cases["one slice"] = one
    gap = tmp_path / "gap"
    write_dicom_study(gap, x, channels=(1,))
    sorted_files = sorted(p for p in gap.rglob("*") if p.is_file())
    import pydicom

    middle = next(
        p for p in sorted_files if abs(float(pydicom.dcmread(p).ImagePositionPatient[2]) - (-40 + 5.5 * 10)) < 1e-3
    )
    middle.unlink()
    cases["gap"] = gap
    expected = {
        "truncated": "cannot be read",
        "non-DICOM": "is not a DICOM file",
        "one slice": "has one slice",
        "gap": "not regularly spaced",
    }
    for name, folder in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        result = cli("predict", engine, folder, "-o", out)
        assert result.exit_code == 2 and expected[name] in result.output, (name, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2, result.output
        assert not out.exists(), name
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    result = cli("predict", engine, good, "-o", not_a_folder / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2


def test_a_read_only_output_folder_is_one_line(engine, slices, tmp_path):
    good = tmp_path / "good"
    write_dicom_study(good, slices[PATIENTS[0]], channels=(1,))
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions (the test above covers an output under a file)
            pytest.skip("running as root: a read-only folder is writable")
        result = cli("predict", engine, good, "-o", locked / "out")
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert not list(locked.iterdir())
    finally:
        os.chmod(locked, 0o700)


def test_scanner_flags_on_tiff_input_are_refused(engine, real_patient_copy, tmp_path):
    result = cli("predict", engine, real_patient_copy, "--flair", "3", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "--flair: for DICOM or NIfTI input" in result.output


def test_plan_rows_name_every_series(studies):
    root, _ = studies
    rows = plan_rows(plan(root))
    assert len(rows) == 6 and {r["role"] for r in rows} == {"FLAIR", "T1 pre-contrast", "T1 post-contrast"}


def test_pack_takes_its_verification_set_from_scanner_patients_and_verify_reads_it(engine, studies, tmp_path):
    import tarfile

    root, _ = studies
    bundle = tmp_path / "scanner-bundle.tar.gz"
    result = cli("pack", engine, "--samples-from", root, "--samples", 12, "-o", bundle)
    assert result.exit_code == 0, result.output
    with tarfile.open(bundle) as tar:
        description = json.load(tar.extractfile("bundle.json"))
        with np.load(tar.extractfile("verification.npz")) as data:
            images, truth = data["images"], data["truth"]
    verification = description["verification"]
    assert verification["slices"] == 12 and len(verification["patients"]) == 2 and not truth.any()
    assert verification["source"].startswith("scanner series (DICOM)") and "no labels" in verification["truth"]
    assert set(verification["intensity"]) == set(verification["patients"])
    assert images.shape == (12, 256, 256, 3)
    checked = cli("verify", bundle)
    assert checked.exit_code == 0, checked.output
    both = cli("pack", engine, "--samples-from", root, "--data", root, "-o", tmp_path / "x.tar.gz")
    assert both.exit_code == 2 and "give one" in both.output


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless", "JPEGLSLossless"])
def test_compressed_series_are_decoded_by_the_extras_plugins(syntax, slices, tmp_path):
    """RLE (pydicom / pylibjpeg-rle), JPEG 2000 (pylibjpeg-openjpeg), JPEG-LS (pyjpegls): the same model input."""
    import pydicom
    import pydicom.uid

    x = slices[PATIENTS[1]]
    write_dicom_study(tmp_path / "study", x, channels=(1,), scanner_bits=True)  # 12 bits stored, as scanners write
    for path in [p for p in (tmp_path / "study").rglob("*") if p.is_file()]:
        ds = pydicom.dcmread(path)
        ds.compress(getattr(pydicom.uid, syntax))
        ds.save_as(path)
    (case,) = plan(tmp_path / "study")
    assert case.flair.datasets[0].file_meta.TransferSyntaxUID == getattr(pydicom.uid, syntax)
    model, _, _ = model_input(case, False, "auto")
    assert np.array_equal(model[..., 1], x[..., 1])


def test_an_enhanced_multi_frame_series_is_read_by_its_frames_geometry(slices, tmp_path):
    """A (legacy converted) enhanced MR object — one file, all frames, per-frame positions — made by highdicom from the
    single-frame FLAIR series: the same model input."""
    import highdicom as hd
    import pydicom

    x = slices[PATIENTS[0]]
    write_dicom_study(tmp_path / "single", x, channels=(1,), scanner_bits=True)
    datasets = [pydicom.dcmread(p) for p in (tmp_path / "single").rglob("*") if p.is_file()]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets,
        series_instance_uid=hd.UID(),
        series_number=9,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    enhanced.SeriesDescription = "AX FLAIR enhanced"
    (tmp_path / "enhanced").mkdir()
    enhanced.save_as(tmp_path / "enhanced" / "one-file")
    (case,) = plan(tmp_path / "enhanced")
    assert case.flair.datasets[0].NumberOfFrames == len(x)
    model, _, _ = model_input(case, False, "auto")
    assert np.array_equal(model[..., 1], x[..., 1])


def test_slices_stored_head_to_feet_come_out_in_position_order(segmenter, slices, tmp_path):
    """Positions that decrease with the slice number (a series acquired head to feet): the slices are ordered by
    position, so the model sees them feet to head, and every mask lands on its own slice."""
    x = slices[PATIENTS[0]]
    write_dicom_study(tmp_path / "down", x, geometry=Geometry(slice_mm=-5.5))
    (case,) = plan(tmp_path / "down")
    model, _, _ = model_input(case, False, "auto")
    assert np.array_equal(model, x[::-1])
    result = segment_case(segmenter, case)
    assert np.array_equal(result.model_masks[::-1], segmenter.predict(x).masks)
    assert result.voxel_mm3 == pytest.approx(0.9375 * 0.9375 * 5.5)

"""What a careful new user tried and found wrong, each made right: files and names a command could be given."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import tifffile
from typer.testing import CliRunner

from lggdeploy.cli import app
from lggdeploy.runtime.predict import predict_paths
from lggdeploy.runtime.segmenter import Prediction
from tests.conftest import SMALL_REAL_PATIENT

runner = CliRunner()


def test_a_tiff_with_two_pages_is_not_a_slice(real_patient_copy):
    image = real_patient_copy / SMALL_REAL_PATIENT / f"{SMALL_REAL_PATIENT}_3.tif"
    page = tifffile.imread(image)
    tifffile.imwrite(image, np.stack([page, page]))  # two pages: which one is the slice?
    result = runner.invoke(app, ["data", "check", str(real_patient_copy)])
    assert result.exit_code == 1 and f"{image.name}: holds 2 pages" in result.output


def test_split_ids_that_are_not_strings_are_one_line(real_patient_copy, tmp_path):
    split = {"format": "lggdeploy-split", "train": [1, 2], "val": [3], "test": [4]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    result = runner.invoke(app, ["data", "info", str(real_patient_copy), "--split-file", str(tmp_path / "split.json")])
    assert result.exit_code == 2 and "'train' must be a list of patient ids" in result.output
    split["train"] = "TCGA_CS_4943_20000902"  # a string where a list belongs was read letter by letter
    (tmp_path / "split.json").write_text(json.dumps(split))
    result = runner.invoke(app, ["data", "info", str(real_patient_copy), "--split-file", str(tmp_path / "split.json")])
    assert result.exit_code == 2 and "'train' must be a list" in result.output and "Traceback" not in result.output


def test_demo_never_writes_into_a_data_set(real_patient_copy):
    before = sorted(p.name for p in real_patient_copy.rglob("*"))
    result = runner.invoke(app, ["demo", "--out", str(real_patient_copy)])
    assert result.exit_code == 2 and "which the demo did not write" in result.output
    assert sorted(p.name for p in real_patient_copy.rglob("*")) == before


def test_verify_on_a_folder_says_it_is_a_folder(tmp_path):
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder, not a bundle" in result.output


class _Blank:
    """Predicts no tumor: the file handling of predict_paths is what is under test here."""

    def predict(self, slices, largest_component=False):
        return Prediction(np.zeros(slices.shape[:3], bool), np.zeros(slices.shape[:3], np.float32))


def test_predict_names_what_it_skips_and_creates_nothing_for_bad_input(real_patient_copy, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", "missing.onnx", str(tmp_path / "nowhere"), "-o", str(out)])
    assert result.exit_code == 2 and not out.exists()
    folder = real_patient_copy / SMALL_REAL_PATIENT
    shutil.copy(folder / f"{SMALL_REAL_PATIENT}_1.tif", folder / "scan copy.tif")  # not <PATIENT>_<N>.tif
    odd = os.fsencode(folder) + b"/\xff\xfe_1.tif"  # a file name that is not UTF-8
    shutil.copy(folder / f"{SMALL_REAL_PATIENT}_2.tif", odd)
    report = predict_paths(_Blank(), folder, out)
    assert any("scan copy.tif: not named <PATIENT>_<N>.tif" in p for p in report.problems)
    assert report.written == len(list(out.rglob("*_pred_mask.tif"))) > 0


def test_a_killed_predict_leaves_nothing_behind_its_rerun(real_patient_copy, tmp_path):
    out = tmp_path / "out" / SMALL_REAL_PATIENT
    out.mkdir(parents=True)
    stale = out / f".{SMALL_REAL_PATIENT}_1_pred_mask.tif.999999999.abc.tmp"  # a process that no longer runs
    stale.write_bytes(b"half")
    predict_paths(_Blank(), real_patient_copy / SMALL_REAL_PATIENT, tmp_path / "out")
    assert not stale.exists() and not list(Path(tmp_path / "out").rglob("*.tmp"))

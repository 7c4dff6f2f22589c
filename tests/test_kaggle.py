import re

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from lggdeploy.cli import app
from lggdeploy.common.errors import DataError
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import check_dataset, load_dataset, read_image
from tests.conftest import SMALL_REAL_PATIENT

P = SMALL_REAL_PATIENT
runner = CliRunner()


def problems_of(root):
    return check_dataset(root)[1]


def shared_facts(root):
    """Patients and slices counted straight from the folder (not through the reader), and the README's stated facts."""
    folders = [p for p in root.iterdir() if p.is_dir()]
    slices = sum(1 for folder in folders for f in folder.glob("*.tif") if not f.name.endswith("_mask.tif"))
    stated = None
    readme = root.parent / "README.md"
    if readme.is_file():  # shared/data/README.md: "Facts, checked over these N patients: M slices"
        match = re.search(r"over these (\d+) patients: ([\d,]+) slices", readme.read_text())
        if match:
            stated = (int(match.group(1)), int(match.group(2).replace(",", "")))
    return len(folders), slices, stated


def test_real_patients_are_clean_and_sorted_numerically(real_data):
    dataset, problems = check_dataset(real_data)
    assert problems == []
    patients, slices, stated = shared_facts(real_data)
    assert patients >= 3 and len(dataset.patients) == patients and dataset.num_slices == slices
    if stated is not None:
        assert (len(dataset.patients), dataset.num_slices) == stated
    for patient in dataset.patients.values():
        numbers = [s.number for s in patient.slices]
        assert numbers == list(range(1, len(numbers) + 1))  # 1, 2, ..., 10, 11 (not 1, 10, 11, 2)
    image = read_image(dataset.patients[P].slices[0].image)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8


def test_clean_folder_check_exits_zero(real_patient_copy):
    result = runner.invoke(app, ["data", "check", str(real_patient_copy)])
    assert result.exit_code == 0, result.output
    assert "every file valid" in result.output


def only(problems):
    assert len(problems) == 1, problems
    return problems[0]


def test_missing_mask_names_the_image(real_patient_copy):
    (real_patient_copy / P / f"{P}_5_mask.tif").unlink()
    problem = only(problems_of(real_patient_copy))
    assert problem.path.name == f"{P}_5.tif" and "missing mask" in problem.message


def test_missing_image_names_the_mask(real_patient_copy):
    (real_patient_copy / P / f"{P}_7.tif").unlink()
    problem = only(problems_of(real_patient_copy))
    assert problem.path.name == f"{P}_7_mask.tif" and "missing image" in problem.message


def test_wrong_shape(real_patient_copy):
    tifffile.imwrite(real_patient_copy / P / f"{P}_3.tif", np.zeros((128, 128, 3), np.uint8))
    problem = only(problems_of(real_patient_copy))
    assert problem.path.name == f"{P}_3.tif" and "shape" in problem.message and "(128, 128, 3)" in problem.message


def test_one_channel_image(real_patient_copy):
    tifffile.imwrite(real_patient_copy / P / f"{P}_3.tif", np.zeros((256, 256), np.uint8))
    assert "shape" in only(problems_of(real_patient_copy)).message


def test_wrong_dtype(real_patient_copy):
    tifffile.imwrite(real_patient_copy / P / f"{P}_4.tif", np.zeros((256, 256, 3), np.uint16))
    problem = only(problems_of(real_patient_copy))
    assert problem.path.name == f"{P}_4.tif" and "uint16" in problem.message


def test_mask_values_outside_0_255(real_patient_copy):
    mask = np.zeros((256, 256), np.uint8)
    mask[10:20, 10:20] = 1
    tifffile.imwrite(real_patient_copy / P / f"{P}_6_mask.tif", mask)
    problem = only(problems_of(real_patient_copy))
    assert problem.path.name == f"{P}_6_mask.tif" and "outside {0, 255}" in problem.message


def test_unreadable_tiff(real_patient_copy):
    (real_patient_copy / P / f"{P}_2.tif").write_bytes(b"this is not a tiff file at all")
    problem = only(problems_of(real_patient_copy))
    assert problem.path.name == f"{P}_2.tif" and "unreadable TIFF" in problem.message


def test_stray_files_in_patient_and_root(real_patient_copy):
    (real_patient_copy / P / "notes.txt").write_text("x")
    (real_patient_copy / "stray.bin").write_bytes(b"x")
    names = sorted(p.path.name for p in problems_of(real_patient_copy))
    assert names == ["notes.txt", "stray.bin"]
    assert all("stray" in p.message for p in problems_of(real_patient_copy))


def test_empty_folder(tmp_path):
    problem = only(problems_of(tmp_path))
    assert problem.path == tmp_path and "empty data folder" in problem.message


def test_patient_folder_without_slices(real_patient_copy):
    (real_patient_copy / "TCGA_XX_0000_20000101").mkdir()
    problem = only(problems_of(real_patient_copy))
    assert problem.path.name == "TCGA_XX_0000_20000101" and "no slices" in problem.message


def test_missing_data_folder_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_dataset(tmp_path / "nope")


def test_every_problem_is_reported_at_once_and_cli_exits_nonzero(real_patient_copy):
    (real_patient_copy / P / f"{P}_5_mask.tif").unlink()
    (real_patient_copy / P / f"{P}_2.tif").write_bytes(b"garbage")
    (real_patient_copy / P / "notes.txt").write_text("x")
    assert len(problems_of(real_patient_copy)) == 3
    result = runner.invoke(app, ["data", "check", str(real_patient_copy)])
    assert result.exit_code == 1
    for name in (f"{P}_5.tif", f"{P}_2.tif", "notes.txt"):
        assert name in result.output


def test_loading_for_training_skips_nothing(real_patient_copy):
    (real_patient_copy / P / f"{P}_9.tif").write_bytes(b"garbage")
    dataset = load_dataset(real_patient_copy)  # the structure is fine ...
    with pytest.raises(DataError, match=f"{P}_9.tif: unreadable TIFF"):  # ... the pixels are not
        load_slices(dataset, [P])
    (real_patient_copy / P / f"{P}_5_mask.tif").unlink()
    with pytest.raises(DataError, match="missing mask"):
        load_dataset(real_patient_copy)


def test_truncated_kaggle_tiff_is_called_truncated(real_patient_copy):
    path = real_patient_copy / P / f"{P}_3.tif"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the Kaggle files keep their directory at the end
    problem = only(problems_of(real_patient_copy))
    assert problem.path.name == f"{P}_3.tif" and "truncated" in problem.message and "dtype" not in problem.message


def test_a_patient_folder_given_as_the_root_says_so(real_patient_copy):
    result = runner.invoke(app, ["data", "check", str(real_patient_copy / P)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is a patient folder" in result.output and "give its parent" in result.output
    assert "move it away" not in result.output

import json

import pytest

from lggdeploy.common.errors import DataError
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.split import Split, load_split, make_split, save_split


@pytest.fixture(scope="module")
def real_dataset(real_data):
    return load_dataset(real_data)


def test_split_is_patient_level_deterministic_and_70_15_15(real_dataset):
    a, b = make_split(real_dataset, seed=0), make_split(real_dataset, seed=0)
    assert a.to_json() == b.to_json()
    n = len(real_dataset.patient_ids)
    n_val = n_test = max(1, round(0.15 * n))  # 14 patients -> 10/2/2, 34 -> 24/5/5
    assert (len(a.train), len(a.val), len(a.test)) == (n - n_val - n_test, n_val, n_test)
    everyone = a.train + a.val + a.test
    assert sorted(everyone) == real_dataset.patient_ids and len(set(everyone)) == n
    for name in ("train", "val", "test"):
        assert sum(a.tumor_slices[p] for p in a.patients(name)) > 0
    assert make_split(real_dataset, seed=1).to_json() != a.to_json()


def test_split_round_trip_and_reuse(real_dataset, tmp_path):
    split = make_split(real_dataset, seed=4)
    path = save_split(split, tmp_path / "split.json")
    again = load_split(path)
    assert (again.train, again.val, again.test) == (split.train, split.val, split.test)
    again.check_against(real_dataset)


def test_split_errors_are_clear(real_dataset, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json: split file is not valid JSON"):
        load_split(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(DataError, match="not an lggdeploy split file"):
        load_split(tmp_path / "other.json")
    overlapping = make_split(real_dataset).to_json()
    overlapping["test"].append(overlapping["train"][0])
    with pytest.raises(DataError, match="in both train and test"):
        Split.from_json(overlapping)
    foreign = Split(train=["TCGA_ZZ_0000_19990101"], val=[], test=[])
    with pytest.raises(DataError, match="not in"):
        foreign.check_against(real_dataset)


def test_a_split_with_an_empty_part_is_refused(real_dataset, tmp_path):
    from typer.testing import CliRunner

    from lggdeploy.cli import app

    with pytest.raises(DataError, match="must be positive"):
        make_split(real_dataset, ratios=(1.0, 0.0, 0.0))
    result = CliRunner().invoke(
        app, ["data", "split", str(real_dataset.root), "--ratios", "1,0,0", "-o", str(tmp_path / "s.json")]
    )
    assert result.exit_code == 2 and not (tmp_path / "s.json").exists()


def test_a_split_without_tumor_in_every_part_is_not_kept_silently(real_dataset, monkeypatch):
    """Only 3 patients with tumor, and no shuffle left to try: the split is refused, not kept without saying so."""
    import lggdeploy.data.split as split_module

    ids = real_dataset.patient_ids
    monkeypatch.setattr(
        split_module, "count_tumor_slices", lambda dataset, patients: {p: (5 if p in ids[:3] else 0) for p in patients}
    )
    with pytest.raises(DataError, match="with tumor slices in train, val and test was found in 0 shuffles .*3 of"):
        make_split(real_dataset, seed=0, max_tries=0)
    split = make_split(real_dataset, seed=0)  # with retries, one tumor patient lands in each part
    assert all(set(ids[:3]) & set(split.patients(name)) for name in ("train", "val", "test"))


@pytest.mark.slow  # reads the real patients for five folds
def test_folds_test_every_patient_once_and_are_usable_splits(real_data, real_dataset, tmp_path):
    from typer.testing import CliRunner

    from lggdeploy.cli import app
    from lggdeploy.data.split import SPLITS, make_folds

    folds = make_folds(real_dataset, folds=5, seed=0)
    ids = real_dataset.patient_ids
    n_val = max(1, round(0.15 * len(ids)))
    assert sorted(p for fold in folds for p in fold.test) == ids  # every patient tested exactly once
    sizes = [len(fold.test) for fold in folds]
    assert max(sizes) - min(sizes) <= 1
    for k, fold in enumerate(folds, 1):
        assert fold.fold == (k, 5) and len(fold.val) == n_val and len(fold.train) == len(ids) - n_val - len(fold.test)
        fold.validate()  # no patient in two parts
        for name in SPLITS:
            assert sum(fold.tumor_slices[p] for p in fold.patients(name)) > 0
    assert [f.to_json() for f in make_folds(real_dataset, folds=5, seed=0)] == [f.to_json() for f in folds]
    assert [f.test for f in make_folds(real_dataset, folds=5, seed=1)] != [f.test for f in folds]
    for bad in (1, len(ids) + 1):  # leave-one-out (K = n) is the most there can be
        with pytest.raises(DataError, match=f"choose 2 to {len(ids)} folds"):
            make_folds(real_dataset, folds=bad)

    result = CliRunner().invoke(app, ["data", "split", str(real_data), "--folds", "5", "-o", str(tmp_path / "cv")])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "cv").glob("fold-*-of-5.json"))
    assert len(files) == 5
    again = load_split(files[0])
    assert again.fold == (1, 5) and again.test == folds[0].test and again.val == folds[0].val
    again.check_against(real_dataset)
    a_file = tmp_path / "split.json"
    a_file.write_text("{}")
    refused = CliRunner().invoke(app, ["data", "split", str(real_data), "--folds", "5", "-o", str(a_file)])
    assert refused.exit_code != 0 and "is a file" in refused.output and "Traceback" not in refused.output
    assert a_file.read_text() == "{}"

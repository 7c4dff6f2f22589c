import json

import pytest

from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.split import Split, load_split, make_split, save_split
from lggdeploy.common.errors import DataError


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
    result = CliRunner().invoke(app, ["data", "split", str(real_dataset.root), "--ratios", "1,0,0", "-o", str(tmp_path / "s.json")])
    assert result.exit_code == 2 and not (tmp_path / "s.json").exists()


def test_a_split_without_tumor_in_every_part_is_not_kept_silently(real_dataset, monkeypatch):
    """Only 3 patients with tumor, and no shuffle left to try: the split is refused, not kept without saying so."""
    import lggdeploy.data.split as split_module

    ids = real_dataset.patient_ids
    monkeypatch.setattr(split_module, "count_tumor_slices", lambda dataset, patients: {p: (5 if p in ids[:3] else 0) for p in patients})
    with pytest.raises(DataError, match="with tumor slices in train, val and test was found in 0 shuffles .*3 of"):
        make_split(real_dataset, seed=0, max_tries=0)
    split = make_split(real_dataset, seed=0)  # with retries, one tumor patient lands in each part
    assert all(set(ids[:3]) & set(split.patients(name)) for name in ("train", "val", "test"))

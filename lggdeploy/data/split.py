"""Patient-level train/val/test split, deterministic from a seed, saved as JSON and reused by every command.

No patient is in two splits (slices of one patient are strongly correlated; a slice-level split leaks).
Calibration (INT8) uses `val`, benchmarks use `test`: the same patients every time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lggdeploy.common.errors import DataError
from lggdeploy.common.files import write_json_atomic
from lggdeploy.data.kaggle import Dataset, read_mask

SPLITS = ("train", "val", "test")
FORMAT = "lggdeploy-split"
DEFAULT_RATIOS = (0.70, 0.15, 0.15)


@dataclass
class Split:
    train: list[str]
    val: list[str]
    test: list[str]
    seed: int = 0
    ratios: tuple[float, float, float] = DEFAULT_RATIOS
    source: str = ""
    tumor_slices: dict[str, int] = field(default_factory=dict)  # per patient, for `data info`
    slices: dict[str, int] = field(default_factory=dict)
    fold: tuple[int, int] | None = None  # (k, K): fold k of a K-fold cross-validation (make_folds), else None

    def patients(self, name: str) -> list[str]:
        if name == "all":
            return sorted(self.train + self.val + self.test)
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}: use one of train, val, test, all")
        return list(getattr(self, name))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": 1,
            "seed": self.seed,
            "ratios": list(self.ratios),
            "source": self.source,
            "train": self.train,
            "val": self.val,
            "test": self.test,
            **({"fold": list(self.fold)} if self.fold else {}),
            "slices": self.slices,
            "tumor_slices": self.tumor_slices,
        }

    @classmethod
    def from_json(cls, obj: dict, origin: str = "split") -> Split:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise DataError(f"{origin}: not an lggdeploy split file (make one with `lggdeploy data split DIR`)")
        for name in SPLITS:  # lists of patient ids (a string would be read letter by letter)
            ids = obj.get(name)
            if not isinstance(ids, list) or not all(isinstance(pid, str) and pid for pid in ids):
                raise DataError(
                    f"{origin}: {name!r} must be a list of patient ids (strings), got {str(ids)[:60]!r}; "
                    "regenerate it with `lggdeploy data split`"
                )
        try:
            split = cls(
                train=list(obj["train"]),
                val=list(obj["val"]),
                test=list(obj["test"]),
                seed=int(obj.get("seed", 0)),
                ratios=tuple(obj.get("ratios", DEFAULT_RATIOS)),
                source=str(obj.get("source", "")),
                slices=dict(obj.get("slices", {})),
                tumor_slices=dict(obj.get("tumor_slices", {})),
                fold=(int(obj["fold"][0]), int(obj["fold"][1])) if obj.get("fold") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{origin}: malformed split file ({exc}); regenerate it with `lggdeploy data split`"
            ) from None
        split.validate(origin)
        return split

    def validate(self, origin: str = "split") -> None:
        seen: dict[str, str] = {}
        for name in SPLITS:
            for pid in getattr(self, name):
                if pid in seen:
                    raise DataError(
                        f"{origin}: patient {pid} is in both {seen[pid]} and {name}; a patient must be in one split only"
                    )
                seen[pid] = name

    def summary_rows(self) -> list[dict]:
        """Patients, slices, tumor slices and tumor fraction per split (for `data info` / `data split`)."""
        rows = []
        for name in SPLITS:
            ids = self.patients(name)
            slices = sum(self.slices.get(p, 0) for p in ids)
            tumor = sum(self.tumor_slices.get(p, 0) for p in ids)
            rows.append(
                {
                    "split": name,
                    "patients": len(ids),
                    "slices": slices,
                    "tumor_slices": tumor,
                    "tumor_fraction": f"{tumor / slices:.1%}" if slices else None,
                }
            )
        return rows

    def with_counts(self, dataset: Dataset) -> Split:
        """Fill in slice and tumor-slice counts per patient from `dataset` (for `data info`)."""
        self.slices = count_slices(dataset, self.patients("all"))
        self.tumor_slices = count_tumor_slices(dataset, self.patients("all"))
        return self

    def check_against(self, dataset: Dataset, origin: str = "split") -> None:
        missing = [pid for pid in self.patients("all") if pid not in dataset.patients]
        if missing:
            raise DataError(
                f"{origin}: {len(missing)} patient(s) of the split are not in {dataset.root} (e.g. {missing[0]}); "
                "use the data folder the split was made for, or make a new split with `lggdeploy data split`"
            )


def count_slices(dataset: Dataset, patient_ids: list[str]) -> dict[str, int]:
    return {pid: len(dataset.patients[pid].slices) for pid in patient_ids}


def count_tumor_slices(dataset: Dataset, patient_ids: list[str]) -> dict[str, int]:
    return {pid: sum(bool(read_mask(s.mask).any()) for s in dataset.patients[pid].slices) for pid in patient_ids}


def make_split(
    dataset: Dataset, seed: int = 0, ratios: tuple[float, float, float] = DEFAULT_RATIOS, max_tries: int = 1000
) -> Split:
    """Shuffle patients with `seed`; retry (deterministically) until every split has tumor slices where the data allows."""
    if abs(sum(ratios) - 1.0) > 1e-6 or any(r <= 0 for r in ratios):
        raise DataError(
            f"split ratios {tuple(ratios)} must be positive and sum to 1: train fits the model, val picks the best epoch "
            "and calibrates INT8 (and gates engines), test is what bench reports"
        )
    ids = dataset.patient_ids
    n = len(ids)
    if n < 3:
        raise DataError(f"{dataset.root} has {n} patient(s): a train/val/test split needs at least 3")
    n_val = max(1, round(n * ratios[1])) if ratios[1] > 0 else 0
    n_test = max(1, round(n * ratios[2])) if ratios[2] > 0 else 0
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"{n} patients are too few for ratios {ratios}: no patient left for training")
    tumor = count_tumor_slices(dataset, ids)
    with_tumor = {pid for pid, count in tumor.items() if count}
    # Each non-empty split can hold a tumor patient only if there are enough of them.
    needed = sum(1 for k in (n_train, n_val, n_test) if k) <= len(with_tumor)
    rng = np.random.default_rng(seed)
    order = list(ids)
    for _ in range(max_tries):
        order = [ids[i] for i in rng.permutation(n)]
        parts = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
        if not needed or all(not part or with_tumor.intersection(part) for part in parts):
            break
    else:
        raise DataError(
            f"no split of {dataset.root} with tumor slices in train, val and test was found in {max_tries} shuffles "
            f"(seed {seed}): {len(with_tumor)} of {n} patients have tumor; try another --seed or other --ratios"
        )
    train, val, test = (
        sorted(p) for p in (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    )
    return Split(
        train=train,
        val=val,
        test=test,
        seed=seed,
        ratios=tuple(ratios),
        source=str(dataset.root),
        slices=count_slices(dataset, ids),
        tumor_slices=tumor,
    )


def _check_fold_count(dataset: Dataset, folds: int, n: int, n_val: int) -> None:
    """Every fold keeps at least one train patient beside its test set and its `n_val` val patients."""
    usable = [k for k in range(2, n + 1) if n - -(-n // k) - n_val >= 1]
    if folds in usable:
        return
    raise DataError(
        f"{folds} folds of {dataset.root}'s {n} patients: "
        + (
            f"choose {usable[0]} to {usable[-1]} folds (each fold tests about {n}/K patients and validates on {n_val})"
            if usable
            else f"too few patients to cross-validate (each fold needs test, {n_val} val and at least one train patient)"
        )
    )


def make_folds(
    dataset: Dataset, folds: int = 5, seed: int = 0, val_ratio: float = DEFAULT_RATIOS[1], max_tries: int = 1000
) -> list[Split]:
    """K-fold cross-validation at patient level: the patients, shuffled with `seed`, are cut into `folds` test sets
    of equal size (±1), so every patient is a test patient exactly once; each fold's val patients (`val_ratio` of
    all) are the ones that follow its test set in the shuffled order, the rest train. Shuffles are retried
    (deterministically) until every part of every fold has tumor slices, where the data allow it."""
    ids = dataset.patient_ids
    n = len(ids)
    if not 0 < val_ratio < 1:
        raise DataError(
            f"val share {val_ratio} (the middle of --ratios): give a fraction between 0 and 1, the share of patients each fold validates on"
        )
    n_val = max(1, round(n * val_ratio))
    _check_fold_count(dataset, folds, n, n_val)
    tumor = count_tumor_slices(dataset, ids)
    with_tumor = {pid for pid, count in tumor.items() if count}
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        order = [ids[i] for i in rng.permutation(n)]
        bounds = np.linspace(0, n, folds + 1).round().astype(int)
        parts = []
        for k in range(folds):
            test = order[bounds[k] : bounds[k + 1]]
            rest = order[bounds[k + 1] :] + order[: bounds[k]]
            parts.append((rest[n_val:], rest[:n_val], test))
        if len(with_tumor) < 3 or all(with_tumor.intersection(part) for fold in parts for part in fold):
            break
    else:
        raise DataError(
            f"no {folds}-fold split of {dataset.root} with tumor slices in every train, val and test part was found in {max_tries} shuffles (seed {seed}); try another --seed"
        )
    slices = count_slices(dataset, ids)
    return [
        Split(
            train=sorted(train),
            val=sorted(val),
            test=sorted(test),
            seed=seed,
            ratios=(len(train) / n, len(val) / n, len(test) / n),
            source=str(dataset.root),
            slices=slices,
            tumor_slices=tumor,
            fold=(k + 1, folds),
        )
        for k, (train, val, test) in enumerate(parts)
    ]


def fold_file_name(k: int, folds: int) -> str:
    """`fold-k-of-K.json`: the name `data split --folds` gives fold k (benchmarks/crossval.sh spells the same)."""
    return f"fold-{k}-of-{folds}.json"


def save_folds(splits: list[Split], folder: str | os.PathLike) -> list[Path]:
    """Write each fold of `make_folds` to `folder`/fold-k-of-K.json (atomically, one file at a time)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file: with --folds, --out names a folder for the fold files")
    return [save_split(split, folder / fold_file_name(*split.fold)) for split in splits]


def save_split(split: Split, path: str | os.PathLike) -> Path:
    return write_json_atomic(path, split.to_json())


def load_split(path: str | os.PathLike) -> Split:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist: make one with `lggdeploy data split DIR -o {path}`")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: split file is not valid JSON ({exc}); regenerate it with `lggdeploy data split`"
        ) from None
    return Split.from_json(obj, origin=str(path))

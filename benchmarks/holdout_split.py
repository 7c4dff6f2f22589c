"""A split whose test patients no recipe choice ever looked at: the patients that joined the data folder after the
recipe was fixed.

    .venv/bin/python benchmarks/holdout_split.py OLD_SPLIT DATA -o holdout.json
    .venv/bin/python benchmarks/holdout_split.py OLD_SPLIT DATA --folds 2 --fold 0 -o fold0.json   # and --fold 1

The training recipe (loss, sampling, warm-up, normalization, threshold and post-processing rules, budget) was chosen
on the patients of OLD_SPLIT (the 34 shared patients of the time). The patients of DATA that OLD_SPLIT does not hold
were never used for a choice: they become the test split. OLD_SPLIT's validation patients stay validation (the
epoch, threshold and post-processing are chosen on them as the recipe does), its train and test patients train.

With --folds K the new patients are dealt into K folds (sorted, then shuffled with the old split's seed): fold I is
the test split and the other folds' new patients train beside the old ones — every new patient is tested once, by a
model that trained on more patients than the plain hold-out's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lggdeploy.data.kaggle import Dataset, load_dataset
from lggdeploy.data.split import Split, load_split, save_split


def holdout(old: Split, dataset: Dataset, folds: int = 1, fold: int = 0) -> Split:
    known = set(old.train) | set(old.val) | set(old.test)
    missing = sorted(known - set(dataset.patient_ids))
    if missing:
        raise SystemExit(f"{len(missing)} patients of the old split are not in the data folder, e.g. {missing[0]}")
    new = sorted(set(dataset.patient_ids) - known)
    if not 0 <= fold < folds <= len(new):
        raise SystemExit(f"--fold {fold} of --folds {folds}: need 0 <= fold < folds <= {len(new)} new patients")
    order = [new[i] for i in np.random.default_rng(old.seed).permutation(len(new))]
    test = sorted(order[fold::folds])
    others = sorted(set(new) - set(test))
    split = Split(
        train=sorted(old.train + old.test + others),
        val=list(old.val),
        test=test,
        seed=old.seed,
        source=str(dataset.root),
    )
    return split.with_counts(dataset)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old_split", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=1, help="deal the new patients into this many test folds")
    parser.add_argument("--fold", type=int, default=0, help="which fold is the test split (0-based)")
    args = parser.parse_args()
    split = holdout(load_split(args.old_split), load_dataset(args.data), args.folds, args.fold)
    save_split(split, args.out)
    print(f"{args.out}: {len(split.train)} train / {len(split.val)} val / {len(split.test)} test (new patients)")


if __name__ == "__main__":
    main()

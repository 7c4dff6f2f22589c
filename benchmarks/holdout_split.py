"""A split whose test patients no recipe choice ever looked at: the patients that joined the data folder after the
recipe was fixed.

    .venv/bin/python benchmarks/holdout_split.py OLD_SPLIT DATA -o holdout.json

The training recipe (loss, sampling, warm-up, normalization, threshold and post-processing rules, budget) was chosen
on the patients of OLD_SPLIT (the 34 shared patients of the time). The patients of DATA that OLD_SPLIT does not hold
were never used for a choice: they become the test split. OLD_SPLIT's validation patients stay validation (the
epoch, threshold and post-processing are chosen on them as the recipe does), its train and test patients train.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lggdeploy.data.kaggle import Dataset, load_dataset
from lggdeploy.data.split import Split, load_split, save_split


def holdout(old: Split, dataset: Dataset) -> Split:
    known = set(old.train) | set(old.val) | set(old.test)
    missing = sorted(known - set(dataset.patient_ids))
    if missing:
        raise SystemExit(f"{len(missing)} patients of the old split are not in the data folder, e.g. {missing[0]}")
    new = sorted(set(dataset.patient_ids) - known)
    split = Split(
        train=sorted(old.train + old.test), val=list(old.val), test=new, seed=old.seed, source=str(dataset.root)
    )
    return split.with_counts(dataset)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old_split", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    split = holdout(load_split(args.old_split), load_dataset(args.data))
    save_split(split, args.out)
    print(f"{args.out}: {len(split.train)} train / {len(split.val)} val / {len(split.test)} test (the new patients)")


if __name__ == "__main__":
    main()

"""Are a checkpoint's batch-norm statistics behind its weights? Score the val patients with the stored statistics,
then with statistics recomputed from train slices (train mode, momentum None: a plain average, no gradient step) —
the "precise BN" check of Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021). The weights are never changed.

usage: .venv/bin/python benchmarks/recompute_bn.py CKPT [CKPT ...] --data ../shared/data/kaggle_3m [--slices 160] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lggdeploy.common.files import write_json_atomic
from lggdeploy.common.machine import cpu_info
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.transforms import resize_images
from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of, split_of
from lggdeploy.models.evaluate import score_model

KEYS = ("mean_patient_dice", "median_patient_dice", "patients_missed", "global_dice")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=160, help="train slices the statistics are recomputed from")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    rows = []
    for path in args.checkpoints:
        ckpt = load_checkpoint(path)
        model, norm, split, size = (
            model_from_checkpoint(ckpt).eval(),
            normalization_of(ckpt),
            split_of(ckpt),
            ckpt["img_size"],
        )
        val = load_slices(dataset, split.val)

        def score() -> dict:
            result = score_model(model, val, size, norm, 8, "cpu", show_progress=False, threshold=ckpt["threshold"])
            return {k: result["aggregates"][k] for k in KEYS}

        stored = score()
        train = load_slices(dataset, split.train)
        chosen = np.random.default_rng(0).choice(len(train), min(args.slices, len(train)), replace=False)
        x = norm.apply_torch(
            torch.from_numpy(resize_images(train.images[chosen], size)).permute(0, 3, 1, 2).float().div_(255)
        )
        layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = sorted({round(m.momentum, 6) for m in layers if m.momentum is not None})
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes below
        started = time.perf_counter()
        model.train()
        with torch.no_grad():
            for i in range(0, len(x), 8):
                model(x[i : i + 8])
        model.eval()
        recompute_s = time.perf_counter() - started
        rows.append(
            {
                "checkpoint": str(path),
                "model": ckpt["model"]["name"],
                "img_size": size,
                "epochs": ckpt.get("epoch"),
                "bn_momentum_trained": ckpt.get("train_config", {}).get("bn_momentum", "layers' own"),
                "momenta_in_network": momenta,
                "val_patients": len(split.val),
                "stored": stored,
                "recomputed": score(),
                "recomputed_from_train_slices": len(x),
                "recompute_seconds": round(recompute_s, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| checkpoint | model | BN momentum in training | val patients | val Dice/patient, stored stats | recomputed | missed, stored | recomputed |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['checkpoint']} | {r['model']} {r['img_size']} px | {r['bn_momentum_trained']} | {r['val_patients']} | "
            f"{r['stored']['mean_patient_dice']:.3f} | {r['recomputed']['mean_patient_dice']:.3f} | "
            f"{r['stored']['patients_missed']} | {r['recomputed']['patients_missed']} |"
        )
    if args.out:
        write_json_atomic(args.out, {"machine": cpu_info(), "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()

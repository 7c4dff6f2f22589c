"""Are a checkpoint's batch-norm statistics behind its weights, or noisy? Score patients with the stored statistics,
then with statistics recomputed from train slices (batch-norm layers in train mode with momentum None: a plain
average of batch means and unbiased batch variances, PyTorch's `swa_utils.update_bn` semantics; every other module in
eval mode; no gradient step) — "precise BN", Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021). The weights are
never changed.

usage: .venv/bin/python benchmarks/recompute_bn.py CKPT [CKPT ...] --data ../shared/data/kaggle_3m
           [--slices N] [--splits val[,test]] [--exclude SPLIT_JSON] [--out FILE.json]

--slices N: train slices the statistics come from, drawn at random (seed 0); 0: every slice of the checkpoint's
train patients, shuffled once (seed 0). Batches of the run's own training batch size (8 before it was recorded).
--splits: the checkpoint's split(s) scored before and after (val by default), with its threshold and its stored
post-processing (as `lggdeploy eval`; until 2026-12-07 the harness scored raw masks, as in
benchmarks/results/recipe/bn-momentum/); --exclude leaves out the test patients of that split file (hold-out patients).
With more than one checkpoint, the per-patient differences are pooled: each distinct patient's differences are
averaged first (models share patients), then bootstrapped over patients.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lggdeploy.bench.stats import paired_summary
from lggdeploy.common.files import write_json_atomic
from lggdeploy.common.machine import cpu_info
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.split import load_split
from lggdeploy.data.transforms import resize_images
from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of, split_of
from lggdeploy.models.evaluate import score_model
from lggdeploy.postprocess import PostProcess

KEYS = ("mean_patient_dice", "median_patient_dice", "patients_missed", "global_dice")


def batch_norm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def recompute(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    """Replace every batch-norm layer's running statistics with their plain average over `x` in batches; seconds."""
    layers = batch_norm_layers(model)
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes below
    started = time.perf_counter()
    model.eval()
    for m in layers:
        m.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i : i + batch])
    model.eval()
    return time.perf_counter() - started


def per_patient(result: dict) -> dict[str, float]:
    return {row["patient"]: float(row["dice"]) for row in result["per_patient"] if row.get("dice") is not None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=160, help="train slices the statistics come from; 0: all")
    parser.add_argument("--splits", default="val")
    parser.add_argument("--exclude", type=Path, help="a split file whose test patients are never scored")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    excluded = set(load_split(args.exclude).test) if args.exclude else set()
    rows = []
    for path in args.checkpoints:
        ckpt = load_checkpoint(path)
        model, norm, split, size = (
            model_from_checkpoint(ckpt).eval(),
            normalization_of(ckpt),
            split_of(ckpt),
            ckpt["img_size"],
        )
        postprocess = PostProcess.from_json(ckpt.get("postprocess"))
        scored = {s: [p for p in split.patients(s) if p not in excluded] for s in args.splits.split(",")}
        slices = {s: load_slices(dataset, ps) for s, ps in scored.items() if ps}

        def score() -> dict:
            out = {}
            for s, sl in slices.items():
                result = score_model(
                    model, sl, size, norm, 8, "cpu", show_progress=False, threshold=ckpt["threshold"],
                    postprocess=postprocess,
                )  # fmt: skip
                out[s] = {**{k: result["aggregates"][k] for k in KEYS}, "per_patient": per_patient(result)}
            return out

        stored = score()
        train = load_slices(dataset, split.train)
        rng = np.random.default_rng(0)
        chosen = (
            rng.permutation(len(train))
            if args.slices == 0
            else rng.choice(len(train), min(args.slices, len(train)), replace=False)
        )
        x = norm.apply_torch(
            torch.from_numpy(resize_images(train.images[chosen], size)).permute(0, 3, 1, 2).float().div_(255)
        )
        momenta = sorted({round(m.momentum, 6) for m in batch_norm_layers(model) if m.momentum is not None})
        batch = int(ckpt.get("train_config", {}).get("batch_size", 8))
        seconds = recompute(model, x, batch)
        rows.append(
            {
                "checkpoint": str(path),
                "model": ckpt["model"]["name"],
                "img_size": size,
                "epochs": ckpt.get("epoch"),
                "bn_momentum_trained": ckpt.get("train_config", {}).get("bn_momentum", "layers' own"),
                "momenta_in_network": momenta,
                "patients_scored": {s: len(ps) for s, ps in scored.items()},
                "stored": stored,
                "recomputed": score(),
                "recomputed_from_train_slices": len(x),
                "batch_size": batch,
                "recompute_seconds": round(seconds, 1),
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("stored", "recomputed")}), flush=True)
    print(
        "\n| checkpoint | model | split | patients | Dice/patient, stored stats | recomputed | missed, stored | recomputed |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for s, before in r["stored"].items():
            after = r["recomputed"][s]
            print(
                f"| {r['checkpoint']} | {r['model']} {r['img_size']} px | {s} | {len(before['per_patient'])} | "
                f"{before['mean_patient_dice']:.3f} | {after['mean_patient_dice']:.3f} | "
                f"{before['patients_missed']} | {after['patients_missed']} |"
            )
    pooled = pool(rows)
    if pooled:
        d = pooled["difference"]
        ci = f"{100 * d['ci95'][0]:+.2f} to {100 * d['ci95'][1]:+.2f}" if d["ci95"] else "no interval"
        print(
            f"\npooled over {pooled['patient_runs']} patient-runs, {d['n']} distinct patients: "
            f"{100 * d['mean']:+.2f} points ({ci}); found before and missed after: {pooled['lost']}"
        )
    if args.out:
        write_json_atomic(args.out, {"machine": cpu_info(), "torch": torch.__version__, "rows": rows, "pooled": pooled})


def pool(rows: list[dict]) -> dict | None:
    """Recomputed minus stored, per patient-run; averaged per distinct patient, then paired_summary over patients."""
    by_patient: dict[str, list[float]] = {}
    lost, runs = [], 0
    for r in rows:
        for s, before in r["stored"].items():
            after = r["recomputed"][s]["per_patient"]
            for p, b in before["per_patient"].items():
                by_patient.setdefault(p, []).append(after[p] - b)
                runs += 1
                if b > 0 and after[p] == 0:  # lggdeploy's "missed": no overlap with the tumor
                    lost.append(f"{p} ({r['checkpoint']})")
    if not by_patient:
        return None
    return {
        "patient_runs": runs,
        "lost": lost,
        "difference": paired_summary({p: float(np.mean(v)) for p, v in sorted(by_patient.items())}),
    }


if __name__ == "__main__":
    main()

"""Test-time augmentation (horizontal flip) on trained checkpoints: per-patient Dice and latency, paired.

usage: .venv/bin/python benchmarks/tta_ablation.py CKPT [CKPT ...] --data DATA --out OUT [--rounds 10]

Training augments with horizontal flips (p = 0.5), so a flipped slice is in the model's distribution: the flip TTA
averages the logits of the slice and of its mirror image (mirrored back). Each checkpoint is scored on its own val
and test patients the way `lggdeploy eval` scores it — the checkpoint's threshold and stored post-processing,
per-patient Dice — without and with the flip, and the per-patient differences are paired (mean, range, a 95 %
bootstrap interval over patients from five patients on). The cost is timed on the same machine in the same run:
PyTorch eager FP32 at batch 8, both variants interleaved, median of `--rounds` rounds. Writes OUT/tta.json and .md.
Nothing here changes lggdeploy: a row for the quality ablations, adopted only if it earns its latency.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
from pathlib import Path

import numpy as np

from lggdeploy.bench.run import interleaved_times
from lggdeploy.bench.stats import paired_summary
from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_line, machine_info
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.transforms import preprocess
from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of, split_of
from lggdeploy.models.torch_runner import TorchRunner
from lggdeploy.postprocess import PostProcess
from lggdeploy.scoring import score_runner


class FlipTTA:
    """A runner whose logits are the mean of the slice's and its mirror image's (mirrored back)."""

    def __init__(self, runner):
        self.runner = runner

    def infer(self, batch: np.ndarray) -> np.ndarray:
        mirrored = self.runner.infer(np.ascontiguousarray(batch[..., ::-1]))[..., ::-1]
        return (self.runner.infer(batch) + mirrored) / 2


def one_checkpoint(path: Path, dataset, rounds: int) -> dict:
    ckpt = load_checkpoint(path)
    split, norm, size = split_of(ckpt), normalization_of(ckpt), ckpt["img_size"]
    rule = PostProcess.from_json(ckpt.get("postprocess"))
    plain = TorchRunner(model_from_checkpoint(ckpt))
    runners = {"none": plain, "hflip": FlipTTA(plain)}
    result: dict = {"checkpoint": str(path), "model": ckpt["model"]["name"], "postprocess": rule.to_json()}
    for name in ("val", "test"):
        slices = load_slices(dataset, getattr(split, name))
        scored = {
            variant: score_runner(
                runner, slices, size, norm, threshold=ckpt["threshold"], postprocess=rule, show_progress=False
            )
            for variant, runner in runners.items()
        }
        dice = {v: {p["patient"]: p["dice"] for p in s["per_patient"]} for v, s in scored.items()}
        result[name] = {
            "patients": len(dice["none"]),
            "mean_patient_dice": {v: s["aggregates"]["mean_patient_dice"] for v, s in scored.items()},
            "patients_missed": {v: s["aggregates"]["patients_missed"] for v, s in scored.items()},
            "hflip_minus_none": paired_summary({p: dice["hflip"][p] - dice["none"][p] for p in dice["none"]}),
        }
    x = preprocess(load_slices(dataset, split.val[:1]).images[:8], size, norm)
    seconds = interleaved_times(
        [functools.partial(r.infer, x) for r in runners.values()], rounds, np.random.default_rng(0)
    )
    result["ms_per_image_b8"] = {v: float(np.median(t)) * 1000 / 8 for v, t in zip(runners, seconds)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    results = [one_checkpoint(path, dataset, args.rounds) for path in args.checkpoints]
    info = machine_info()
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "tta.json", {"date": when, "machine": info, "results": results})
    lines = [
        f"Horizontal-flip TTA; {cpu_line(info['cpu'])}; {when}. Per-patient Dice with the checkpoint's threshold and "
        "post-processing; differences paired by patient (95 % bootstrap interval over patients).",
        "",
        "| model | split (n) | Dice/patient, no TTA → flip TTA | paired difference, points (95 % CI) | range | missed (none / flip) | ms/img b8 PyTorch FP32, none / flip |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name in ("val", "test"):
            s = r[name]
            d = s["hflip_minus_none"]
            ci = f"({d['ci95'][0] * 100:+.2f} to {d['ci95'][1] * 100:+.2f})" if d["ci95"] else "(no interval)"
            ms = r["ms_per_image_b8"]
            lines.append(
                f"| {r['model']} | {name} ({s['patients']}) | {s['mean_patient_dice']['none']:.4f} → "
                f"{s['mean_patient_dice']['hflip']:.4f} | {d['mean'] * 100:+.2f} {ci} | {d['min'] * 100:+.2f} to "
                f"{d['max'] * 100:+.2f} | {s['patients_missed']['none']} / {s['patients_missed']['hflip']} | "
                f"{ms['none']:.1f} / {ms['hflip']:.1f} |"
            )
    write_text_atomic(args.out / "tta.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""How much Dice can an output stride cost at best? The representational ceiling of a coarse logit map.

    .venv/bin/python benchmarks/stride_ceiling.py --data ../shared/data/kaggle_3m --out benchmarks/results/stride-ceiling

smp's PSPNet (encoder depth 3) predicts 32 x 32 logits for a 256 x 256 slice and upsamples them bilinearly 8x; a finer
output stride costs training time (dilating ResNeXt50's layer2 for stride 4: timed here, interleaved with the stride-8
step). Before paying that, this measures what stride s can represent at all: for every tumor slice of every patient,
a (256/s) x (256/s) logit map is fitted to the true mask (Adam, BCE + soft Dice on the bilinearly upsampled map,
started from the average-pooled mask), thresholded at 0 after upsampling, and scored against the true mask: the
Dice a perfect model of that stride would reach. Per patient over its tumor slices (tumor-free slices are left out:
a coarse map can be all-negative there). No model is trained: the masks alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lggdeploy.data.kaggle import load_dataset, read_mask

STRIDES = (4, 8, 16)


def fitted_masks(masks: torch.Tensor, stride: int, steps: int) -> torch.Tensor:
    """(N, 1, H, W) {0, 1} masks -> the {0, 1} masks that the best-fitting stride-`stride` logit maps give."""
    logits = (F.avg_pool2d(masks, stride) * 2 - 1).mul(4).clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(steps):
        up = F.interpolate(logits, scale_factor=stride, mode="bilinear", align_corners=False) * 3
        prob = torch.sigmoid(up)
        soft_dice = (2 * (prob * masks).sum() + 1) / (prob.sum() + masks.sum() + 1)
        loss = F.binary_cross_entropy_with_logits(up, masks) + 1 - soft_dice
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (F.interpolate(logits, scale_factor=stride, mode="bilinear", align_corners=False) > 0).float()


def dilated_step_ratio(rounds: int = 8, batch: int = 8) -> dict:
    """pspnet-scratch's training step (forward + backward, batch 8, 256 px) at its stride 8 and with ResNeXt50's
    layer2 dilated instead of strided (stride 4), interleaved in one process; medians after two warm-up rounds."""
    import time

    from segmentation_models_pytorch.encoders._utils import replace_strides_with_dilation

    from lggdeploy.models.networks import build_model
    from lggdeploy.models.presets import resolve_model

    torch.manual_seed(0)
    models = {"stride 8": build_model(resolve_model("pspnet-scratch")).model}
    models["stride 4"] = build_model(resolve_model("pspnet-scratch")).model
    replace_strides_with_dilation(models["stride 4"].encoder.layer2, 2)
    models["stride 4"].segmentation_head[1].scale_factor = 4
    x = torch.randn(batch, 3, 256, 256)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            out = model(x)
            assert out.shape[-2:] == x.shape[-2:]
            out.mean().backward()
            times[name].append(time.perf_counter() - start)
    median = {k: float(np.median(v[2:])) for k, v in times.items()}
    return {"seconds_per_step": median, "ratio": median["stride 4"] / median["stride 8"], "batch": batch}


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a * b).sum() / (a.sum() + b.sum()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per patient and stride")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-timing", action="store_true", help="leave out the dilated-layer2 step timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data)
    rows = []
    for patient in dataset.patient_ids:
        masks = np.stack([read_mask(sl.mask) > 0 for sl in dataset.slices_of([patient])]).astype(np.float32)
        masks = masks[masks.reshape(len(masks), -1).sum(1) > 0]
        if not len(masks):
            continue
        y = torch.from_numpy(masks)[:, None]
        row = {"patient": patient, "tumor_slices": len(masks), "tumor_pixels": int(y.sum())}
        row.update({f"stride_{s}": dice(fitted_masks(y, s, args.steps), y) for s in STRIDES})
        rows.append(row)
    summary = {
        f"stride_{s}": {
            "mean": float(np.mean([r[f"stride_{s}"] for r in rows])),
            "min": float(np.min([r[f"stride_{s}"] for r in rows])),
            "patients_below_0.95": int(sum(r[f"stride_{s}"] < 0.95 for r in rows)),
        }
        for s in STRIDES
    }
    timing = None if args.no_timing else dilated_step_ratio()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stride_ceiling.json").write_text(
        json.dumps(
            {
                "patients": len(rows),
                "steps": args.steps,
                "summary": summary,
                "step_timing": timing,
                "per_patient": rows,
            },
            indent=1,
        )
    )
    lines = [
        f"{len(rows)} patients with tumor (their tumor slices only)",
        "",
        "| stride | logit map | mean per-patient Dice | lowest patient | patients below 0.95 |",
        "|---|---|---|---|---|",
    ]
    for s in STRIDES:
        m = summary[f"stride_{s}"]
        lines.append(
            f"| {s} | {256 // s} x {256 // s} | {m['mean']:.4f} | {m['min']:.4f} | {m['patients_below_0.95']} |"
        )
    if timing:
        lines += [
            "",
            f"training step, batch {timing['batch']}: stride 8 {timing['seconds_per_step']['stride 8']:.2f} s, "
            f"stride 4 (layer2 dilated) {timing['seconds_per_step']['stride 4']:.2f} s: {timing['ratio']:.2f}x",
        ]
    (args.out / "stride_ceiling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

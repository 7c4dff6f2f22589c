"""CPU training step time: FP32 vs bfloat16 autocast, NCHW vs channels-last, eager vs torch.compile.

usage: .venv/bin/python benchmarks/train_speed.py --data DATA --out OUT [--model pspnet-scratch] [--steps 12] [--rounds 3] [--no-compile]
       [--only-crops --crop-sizes 192,160,128] [--only-aux]

The same seeded batches of real slices (256 px, batch 8, augmentation off) through forward + Dice/BCE loss +
backward + AdamW step. Configurations run in interleaved rounds (each round times every configuration on the same
batches, in a shuffled order); a configuration's figure is the median step time over all its timed steps, after 3
warm-up steps per round (torch.compile's compilation happens in the first round's warm-up and is reported apart).
--crop-sizes adds FP32 channels-last configurations that train on crops of the same batches (`--crop-size`'s
`random_crops`, seeded); --only-crops keeps the whole-slice FP32 channels-last one beside them and drops the rest.
--only-aux times FP32 channels-last with and without `--aux-weight`'s training-only head (recipe.AuxiliaryHead).
Writes OUT/train_speed.json and OUT/train_speed.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import time
from pathlib import Path

import numpy as np
import torch

from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_has_bf16, cpu_line, machine_info
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.split import make_split
from lggdeploy.data.transforms import Normalization, preprocess, random_crops, resize_masks
from lggdeploy.models.networks import build_model
from lggdeploy.models.presets import resolve_model
from lggdeploy.models.recipe import AuxiliaryHead, segmentation_loss

CONFIGS = [
    ("fp32, NCHW (before)", "fp32", False, False),
    ("fp32, channels-last (auto without AMX)", "fp32", True, False),
    ("bf16, NCHW", "bf16", False, False),
    ("bf16, channels-last (auto with AMX)", "bf16", True, False),
    ("bf16, channels-last, torch.compile", "bf16", True, True),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="pspnet-scratch")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile configuration")
    parser.add_argument("--crop-sizes", default="", help="comma-separated crop sizes to time beside whole slices")
    parser.add_argument("--only-crops", action="store_true", help="time only FP32 channels-last, whole and cropped")
    parser.add_argument("--only-aux", action="store_true", help="time FP32 channels-last with and without the aux head")
    args = parser.parse_args()
    crops = [int(v) for v in args.crop_sizes.split(",") if v.strip()]
    torch.manual_seed(0)
    dataset = load_dataset(args.data)
    split = make_split(dataset, seed=0)
    slices = load_slices(dataset, split.train[:6])
    x_all = torch.from_numpy(preprocess(slices.images, 256, Normalization()))
    y_all = torch.from_numpy(resize_masks(slices.masks, 256)).unsqueeze(1).float()
    batches = [
        (x_all[i : i + args.batch], y_all[i : i + args.batch])
        for i in range(0, args.batch * (args.steps + 3), args.batch)
    ]
    batches = [b for b in batches if len(b[0]) == args.batch]
    configs = [c for c in CONFIGS if (c[1] != "bf16" or cpu_has_bf16()) and not (c[3] and args.no_compile)]
    if args.only_crops or args.only_aux:
        configs = [c for c in configs if c[1] == "fp32" and c[2]]
    aux_config = "fp32, channels-last, auxiliary head (--aux-weight)"
    if args.only_aux:
        configs.append((aux_config, "fp32", True, False))
    crop_of = {f"fp32, channels-last, {size} px crops": size for size in crops}
    configs += [(name, "fp32", True, False) for name in crop_of]

    state = build_model(resolve_model(args.model), "random").model.state_dict()
    setups, compile_seconds, times, heads = {}, {}, {c[0]: [] for c in configs}, {}
    for name, precision, channels_last, compiled in configs:
        model = build_model(resolve_model(args.model), "random").model
        model.load_state_dict(state)
        model.train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        net = torch.compile(model) if compiled else model
        parameters = list(model.parameters())
        if name == aux_config:
            heads[name] = AuxiliaryHead.attach(model, 256).to(memory_format=torch.channels_last)
            parameters += list(heads[name].parameters())
        setups[name] = (model, net, torch.optim.AdamW(parameters, lr=1e-4), precision, channels_last)

    def step(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        model, net, optimizer, precision, channels_last = setups[name]
        if name in crop_of:
            x, y = random_crops(x, y, crop_of[name], torch.Generator().manual_seed(len(times[name])))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = net(x)
        loss = segmentation_loss(logits.float(), y)
        if name in heads:
            loss = loss + 0.4 * segmentation_loss(heads[name](tuple(y.shape[-2:])), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    order = [c[0] for c in configs]
    for round_ in range(args.rounds):
        random.Random(round_).shuffle(order)
        for name in order:
            started = time.perf_counter()
            for x, y in batches[:3]:
                step(name, x, y)
            if round_ == 0 and name.endswith("torch.compile"):
                compile_seconds[name] = round(time.perf_counter() - started, 1)
            for x, y in batches[3 : 3 + args.steps]:
                t = time.perf_counter()
                step(name, x, y)
                times[name].append(time.perf_counter() - t)
        print(f"round {round_ + 1}/{args.rounds} done")

    # Speed-ups are against the first configuration: fp32 NCHW, or whole slices with --only-crops.
    base = float(np.median(times[configs[0][0]]))
    rows = [
        {
            "config": n,
            "median_step_s": float(np.median(times[n])),
            "speedup_vs_first_config": base / float(np.median(times[n])),
            "steps_timed": len(times[n]),
            "warmup_and_compile_s": compile_seconds.get(n),
        }
        for n in times
    ]
    machine = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out / "train_speed.json",
        {
            "date": dt.date.today().isoformat(),
            "model": args.model,
            "batch": args.batch,
            "machine": machine,
            "rows": rows,
        },
    )
    lines = [
        f"Training step, {args.model}, batch {args.batch}, 256 px, {cpu_line(machine['cpu'])}, "
        f"torch {torch.__version__}, {dt.date.today().isoformat()}; median of {args.rounds} interleaved rounds x {args.steps} steps.",
        "",
        f"| configuration | median s / step | speed-up vs {configs[0][0]} | first-round warm-up incl. compilation (s) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['median_step_s']:.3f} | {r['speedup_vs_first_config']:.2f}x | {r['warmup_and_compile_s'] or ''} |"
        )
    write_text_atomic(args.out / "train_speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

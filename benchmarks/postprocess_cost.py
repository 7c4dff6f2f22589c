"""What post-processing adds to a patient's end-to-end time: the size rule alone, the size rule plus the
mean-probability floor (which also needs the probabilities), and those plus the outline step (every pixel's
probability and a dense CRF on each slice with a mask), on one real patient's logits, interleaved rounds.

usage: .venv/bin/python benchmarks/postprocess_cost.py CKPT --data DATA [--patient ID] [--rounds 30]

The logits come from the checkpoint once (the network's time is not measured here: `lggdeploy bench` times the
whole pipeline per engine); each round then times, from those logits to the final masks, (a) threshold + size rule,
(b) threshold + probabilities + size rule + floor and (c) threshold + every pixel's probability + size rule + floor +
outline. Prints medians in ms per volume and per slice (and the slices with a mask, where the CRF runs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from report_recipe import logits_of

from lggdeploy.common.machine import cpu_line, machine_info
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.transforms import logits_to_masks, masks_and_probabilities
from lggdeploy.models.checkpoint import load_checkpoint, split_of
from lggdeploy.outline import OutlineCRF
from lggdeploy.postprocess import CONFIDENCE_FLOOR, PostProcess


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--patient", help="default: the checkpoint's test patient with the most slices")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    dataset = load_dataset(args.data)
    patients = [args.patient] if args.patient else split_of(ckpt).test
    slices = max((load_slices(dataset, [p]) for p in patients), key=len)
    logits = logits_of(ckpt, slices)
    size = PostProcess.from_json(ckpt.get("postprocess")).min_component_voxels or 1034
    plain, floored = PostProcess(size), PostProcess(size, 0.0, CONFIDENCE_FLOOR)
    outlined = PostProcess(size, 0.0, CONFIDENCE_FLOOR, OutlineCRF())
    threshold = float(ckpt["threshold"])

    def size_rule() -> None:
        plain.apply(logits_to_masks(logits, threshold=threshold))

    def with_floor() -> None:
        floored.apply(*masks_and_probabilities(logits, threshold=threshold))

    def with_outline() -> None:
        outlined.apply(*masks_and_probabilities(logits, threshold=threshold, every_pixel=True), slices.images)

    steps = {"size rule": size_rule, "size rule + floor": with_floor, "size rule + floor + outline": with_outline}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    n = len(slices)
    drawn = int(floored.apply(*masks_and_probabilities(logits, threshold=threshold)).any(axis=(1, 2)).sum())
    print(
        f"patient {slices.patients[0]}, {n} slices ({drawn} with a mask after the floor); "
        f"{cpu_line(machine_info()['cpu'])}; median of {args.rounds} rounds"
    )
    for name, values in times.items():
        ms = 1000 * statistics.median(values)
        print(f"| {name} | {ms:.1f} ms per volume | {ms / n:.2f} ms per slice |")


if __name__ == "__main__":
    main()

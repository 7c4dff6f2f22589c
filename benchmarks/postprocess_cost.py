"""What post-processing adds to a patient's end-to-end time: the size rule alone against the size rule plus the
mean-probability floor (which also needs the probabilities), on one real patient's logits, interleaved rounds.

usage: .venv/bin/python benchmarks/postprocess_cost.py CKPT --data DATA [--patient ID] [--rounds 30]

The logits come from the checkpoint once (the network's time is not measured here: `lggdeploy bench` times the
whole pipeline per engine); each round then times, from those logits to the final masks, (a) threshold + size rule
and (b) threshold + probabilities + size rule + floor. Prints medians in ms per volume and per slice.
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
    threshold = float(ckpt["threshold"])

    def size_rule() -> None:
        plain.apply(logits_to_masks(logits, threshold=threshold))

    def with_floor() -> None:
        floored.apply(*masks_and_probabilities(logits, threshold=threshold))

    times: dict[str, list[float]] = {"size rule": [], "size rule + floor": []}
    for _ in range(args.rounds):
        for name, step in (("size rule", size_rule), ("size rule + floor", with_floor)):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    n = len(slices)
    print(
        f"patient {slices.patients[0]}, {n} slices; {cpu_line(machine_info()['cpu'])}; median of {args.rounds} rounds"
    )
    for name, values in times.items():
        ms = 1000 * statistics.median(values)
        print(f"| {name} | {ms:.1f} ms per volume | {ms / n:.2f} ms per slice |")


if __name__ == "__main__":
    main()

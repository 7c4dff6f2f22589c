"""INT8 on a CPU without VNNI: 7-bit weights everywhere, on the first convolution only, or nowhere.

usage: .venv/bin/python benchmarks/int8_weight_range.py CKPT --data DATA --out OUT [--profile openvino|cpu] [--rounds 10] [--threads 2]

--profile openvino (default): the openvino profile's graphs run by OpenVINO; --profile cpu: the cpu profile's graphs
run by ONNX Runtime (the runtime each profile is for).

Without VNNI an x86 int8 convolution multiplies uint8 activations by int8 weights in pairs summed into int16
(vpmaddubsw), which can saturate: 2 x 255 x 127 > 32767. ONNX Runtime's guidance is `reduce_range` (7-bit weights,
every layer) on such CPUs, which lggdeploy's `cpu` INT8 profile follows and its `openvino` profile inherited. NNCF,
OpenVINO's own quantizer, applies the same fix to the first layer only by default (`OverflowFix.FIRST_LAYER`).

The three variants are quantized from one export and ONE calibration cache (identical activation ranges: only the
weights differ), compiled by lggdeploy's OpenVINO runner, run on the checkpoint's val and test patients and judged
against the PyTorch FP32 model as the accuracy gate judges (per-patient Dice, drop, agreement with the FP32 masks,
logit SQNR), then timed interleaved at batch 8 on the same val slices. Writes OUT/int8_weight_range.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from lggdeploy.backends import onnxruntime as ort_backend
from lggdeploy.backends.base import RunOptions
from lggdeploy.backends.openvino import OpenVinoRunner
from lggdeploy.bench.run import interleaved_times
from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_line, machine_info
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.split import Split
from lggdeploy.data.transforms import Normalization, preprocess
from lggdeploy.engines.export import export_onnx
from lggdeploy.engines.precision import calibration, int8
from lggdeploy.engines.precision.gate import GateCriteria, Reference, run_on_slices
from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of, split_of
from lggdeploy.models.torch_runner import TorchRunner

VARIANTS = (
    ("7-bit weights, every convolution (ONNX Runtime's reduce_range)", "all"),
    ("7-bit weights, first convolution only (NNCF's default overflow fix)", "first"),
    ("8-bit weights everywhere", "none"),
)


def judged(result) -> dict:
    """A gate verdict's figures as these benchmarks record them (benchmarks/bias_correction.py reads them too)."""
    return {
        "patients": len(result.per_patient),
        "fp32_dice": result.fp32_dice,
        "engine_dice": result.engine_dice,
        "drop_points": result.drop_points,
        "worst_patient_drop_points": result.worst["drop_points"],
        "min_agreement": result.least_agreement["agreement"],
        "mean_agreement": float(np.mean([r["agreement"] for r in result.per_patient])),
        "min_logit_sqnr_db": min(r["logit_sqnr_db"] for r in result.per_patient),
        "mean_logit_sqnr_db": float(np.mean([r["logit_sqnr_db"] for r in result.per_patient])),
        "passes_gate": result.passed,
        "per_patient": result.per_patient,
    }


@dataclass
class Int8Experiment:
    """One checkpoint made ready for INT8 experiments (this benchmark's and bias_correction.py's): its val and test
    slices, its FP32 export prepared for quantization, a calibration reader on `calib_samples` val slices with one
    cache file, and the PyTorch FP32 model's outputs on both splits, which `judge` compares with as the gate does."""

    ckpt: dict
    split: Split
    norm: Normalization
    size: int
    threshold: float
    slices: dict
    model: object
    prepared: Path
    chosen: object
    reader: object
    cache: Path
    refs: dict

    @classmethod
    def make(cls, checkpoint: Path, dataset, work: Path, calib_samples: int) -> Int8Experiment:
        ckpt = load_checkpoint(checkpoint)
        split, norm, size, threshold = split_of(ckpt), normalization_of(ckpt), ckpt["img_size"], ckpt["threshold"]
        slices = {name: load_slices(dataset, getattr(split, name)) for name in ("val", "test")}
        model = model_from_checkpoint(ckpt)  # exported and run as the reference (export_onnx leaves it untouched)
        export_onnx(model, work / "model.onnx", size)
        prepared = int8.preprocess_for_quantization(work / "model.onnx", work / "prepared.onnx")
        chosen = calibration.pick_calibration_slices(slices["val"], calib_samples)
        torch_runner = TorchRunner(model)
        refs = {
            name: Reference(
                run_on_slices(torch_runner, s, size, norm, threshold, f"pytorch fp32 {name}"), s, GateCriteria()
            )
            for name, s in slices.items()
        }
        reader = calibration.make_reader(chosen, size, norm)
        return cls(
            ckpt, split, norm, size, threshold, slices, model, prepared, chosen, reader, work / "calibration.json", refs
        )

    def judge(self, runner, label: str) -> dict:
        """`runner` on the val and test slices, judged against the FP32 model: {split: the figures of `judged`}."""
        return {
            name: judged(
                self.refs[name].judge(run_on_slices(runner, s, self.size, self.norm, self.threshold, f"{label} {name}"))
            )
            for name, s in self.slices.items()
        }


def first_conv_weight(path: Path) -> str:
    graph = onnx.load(str(path), load_external_data=False).graph
    return next(n.input[1] for n in graph.node if n.op_type == "Conv")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="int8-range-") as tmp:
        run(Path(tmp))


def run(work: Path) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", choices=("openvino", "cpu"), default="openvino")
    parser.add_argument("--calib-samples", type=int, default=32)  # build's default
    args = parser.parse_args()
    exp = Int8Experiment.make(args.checkpoint, load_dataset(args.data), work, args.calib_samples)
    split, slices, prepared, chosen = exp.split, exp.slices, exp.prepared, exp.chosen
    size, norm, reader, cache = exp.size, exp.norm, exp.reader, exp.cache
    base = int8.recipe_for(args.profile)
    first = first_conv_weight(prepared)
    runners, rows = {}, []
    for label, where in VARIANTS:
        recipe = replace(base, reduce_range=where == "all")
        overrides = {first: [{"axis": 0, "reduce_range": True}]} if where == "first" else None
        path = int8.quantize(
            prepared, work / f"int8-{where}.onnx", recipe, reader, "minmax", cache, tensor_overrides=overrides
        )
        runner = (
            OpenVinoRunner(path, "f32", args.threads)
            if args.profile == "openvino"
            else ort_backend.load(path, options=RunOptions(threads=args.threads, spin=False))
        )
        runners[where] = runner
        row = {"variant": label, "reduce_range": where, **exp.judge(runner, where)}
        rows.append(row)
    x = preprocess(slices["val"].images[:8], size, norm)
    for r in runners.values():
        r.infer(x), r.infer(x)
    seconds = interleaved_times(
        [functools.partial(r.infer, x) for r in runners.values()], args.rounds, np.random.default_rng(0)
    )
    for row, t in zip(rows, seconds):
        row["ms_per_image_b8"] = round(float(np.median(t)) * 1000 / 8, 2)
    for r in runners.values():
        r.close()
    info = machine_info()
    cpu = info["cpu"]
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out / "int8_weight_range.json",
        {
            "date": when,
            "machine": info,
            "checkpoint": str(args.checkpoint),
            "profile": args.profile,
            "calibration": {"split": "val", "samples": len(chosen), "method": "minmax"},
            "first_conv_weight": first,
            "rows": rows,
        },
    )
    runtime = "OpenVINO" if args.profile == "openvino" else "ONNX Runtime"
    lines = [
        f"{runtime} INT8 ({args.profile} profile), weight range; `{args.checkpoint}`; {cpu_line(cpu, args.threads)}; "
        f"{when}. One calibration cache ({len(chosen)} val slices, minmax) for all three. "
        f"Against the PyTorch FP32 model; n = {len(split.val)} val / {len(split.test)} test patients. Batch 8, median of {args.rounds} interleaved rounds.",
        "",
        "| weights | split | Dice/patient (FP32) | drop (pts) | worst patient drop | least agreement | mean agreement | least logit SQNR (dB) | gate | ms/img b8 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for name in ("val", "test"):
            r = row[name]
            lines.append(
                f"| {row['variant']} | {name} | {r['engine_dice']:.4f} ({r['fp32_dice']:.4f}) | {r['drop_points']:.2f} | {r['worst_patient_drop_points']:.2f} | "
                f"{r['min_agreement']:.4f} | {r['mean_agreement']:.4f} | {r['min_logit_sqnr_db']:.1f} | {'passes' if r['passes_gate'] else 'fails'} | "
                f"{row['ms_per_image_b8'] if name == 'val' else ''} |"
            )
    write_text_atomic(args.out / "int8_weight_range.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

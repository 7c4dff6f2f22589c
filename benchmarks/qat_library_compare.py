"""QAT libraries tried side by side on one checkpoint: NVIDIA Model Optimizer (what `build --qat` uses) vs NNCF.

usage: .venv/bin/pip install nncf && .venv/bin/python benchmarks/qat_library_compare.py CKPT --data DATA --out OUT

The same everything except the library: the 32 calibration slices `build` picks from the val patients, one epoch of
`engines.precision.qat.finetune` (distillation from the FP32 model, SGD lr 1e-3, cosine, batch norm frozen, seeded)
on the checkpoint's train split. For each library: the fake-quantized torch model's mean per-patient Dice on the val
patients against the FP32 model after calibration (PTQ) and after the QAT epoch, its mask agreement with the FP32
model, the epoch time; for NNCF also its own ONNX export (strip to native fake-quant, torch.onnx.export), checked
against the tensorrt profile's rules (int8, zero point 0, per-channel weights on axis 0) and scored with ONNX
Runtime. modelopt's export path is lggdeploy's own (see results/qat-recipe). Writes OUT/qat_library_compare.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_line, machine_info
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.transforms import preprocess, resize_images, resize_masks
from lggdeploy.engines.precision import qat
from lggdeploy.engines.precision.calibration import pick_calibration_slices
from lggdeploy.engines.precision.gate import run_on_slices
from lggdeploy.metrics import confusion_counts, summarize
from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of, split_of
from lggdeploy.models.torch_runner import TorchRunner


def masks_of(runner, slices, ckpt) -> np.ndarray:
    """The runner's masks at native size and the checkpoint's threshold, through the gate's own batch loop."""
    return run_on_slices(runner, slices, ckpt["img_size"], normalization_of(ckpt), ckpt["threshold"], "compare").masks


def score(predicted: np.ndarray, reference: np.ndarray, slices) -> dict:
    """Mean per-patient Dice, the drop against the FP32 model's masks (points), worst patient drop, agreement."""
    mine = summarize(confusion_counts(predicted, slices.masks), slices.patients)
    ref = summarize(confusion_counts(reference, slices.masks), slices.patients)
    agree = summarize(confusion_counts(predicted, reference), slices.patients)
    drops = [100 * (r["dice"] - m["dice"]) for m, r in zip(mine["per_patient"], ref["per_patient"])]
    return {
        "val_mean_patient_dice": mine["aggregates"]["mean_patient_dice"],
        "drop_points": float(np.mean(drops)),
        "worst_patient_drop_points": float(max(drops)),
        "least_agreement": float(min(p["dice"] for p in agree["per_patient"])),
    }


def nncf_quantize(model, batches):
    import nncf

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return nncf.quantize(
            model.eval(), nncf.Dataset(batches), preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(batches)
        )


def qdq_rules(path: Path) -> dict:
    """What the tensorrt profile asks of a Q/DQ graph: int8 zero points equal to 0, per-channel weights on axis 0."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in model.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].t.dims is not None
    }
    values = {**consts, **inits}
    zps, weight_axes, dq = [], [], 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        dq += 1
        zp = values.get(node.input[2]) if len(node.input) > 2 else None
        if zp is not None:
            zps.append((str(zp.dtype), bool(np.all(zp == 0))))
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        scale = values.get(node.input[1])
        if scale is not None and np.size(scale) > 1:
            weight_axes.append(axis)
    dtypes = sorted({d for d, _ in zps})
    return {
        "dequantize_nodes": dq,
        "zero_point_dtypes": dtypes,
        "all_zero_points_0": all(z for _, z in zps),
        "per_channel_axes": sorted(set(weight_axes)),
        "per_channel_nodes": len(weight_axes),
        "conv_nodes": sum(n.op_type == "Conv" for n in model.graph.node),
        "tensorrt_profile_ok": dtypes == ["int8"] and all(z for _, z in zps) and set(weight_axes) <= {0},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    ckpt = load_checkpoint(args.checkpoint)
    split, dataset = split_of(ckpt), load_dataset(args.data)
    norm, size = normalization_of(ckpt), ckpt["img_size"]
    val = load_slices(dataset, split.val)
    train = load_slices(dataset, split.train)
    chosen = pick_calibration_slices(val, 32)
    x = preprocess(chosen.images, size, norm)
    batches = [torch.from_numpy(x[i : i + 8]) for i in range(0, len(x), 8)]
    images, masks = resize_images(train.images, size), resize_masks(train.masks, size)
    teacher = model_from_checkpoint(ckpt).eval()
    reference = masks_of(TorchRunner(teacher, "cpu"), val, ckpt)
    recipe = qat.QatRecipe(epochs=args.epochs)
    rows = []
    for library, quantize in (("nvidia-modelopt", qat.quantize_for_training), ("nncf", nncf_quantize)):
        started = time.perf_counter()
        model = quantize(model_from_checkpoint(ckpt), batches)
        row = {"library": library, "calibration_seconds": round(time.perf_counter() - started, 1)}
        row["ptq"] = score(masks_of(TorchRunner(model.eval(), "cpu"), val, ckpt), reference, val)
        history = qat.finetune(model, images, masks, norm, recipe, teacher=teacher)
        row["qat_epoch_seconds"] = [h["seconds"] for h in history]
        row["qat"] = score(masks_of(TorchRunner(model.eval(), "cpu"), val, ckpt), reference, val)
        if library == "nncf":
            import nncf

            onnx_path = args.out / "nncf_qat.onnx"
            args.out.mkdir(parents=True, exist_ok=True)
            try:
                stripped = nncf.strip(model, do_copy=True, example_input=batches[0][:1])
                torch.onnx.export(
                    stripped.eval(),
                    batches[0][:1],
                    str(onnx_path),
                    opset_version=17,
                    dynamo=False,
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                )
                row["onnx_export"] = qdq_rules(onnx_path)
                from lggdeploy.backends.onnxruntime import OnnxRuntimeRunner

                row["onnx_export"]["onnxruntime"] = score(
                    masks_of(OnnxRuntimeRunner(onnx_path, ["CPUExecutionProvider"], 2), val, ckpt), reference, val
                )
            except Exception as exc:  # what NNCF's export does with this network is part of the finding
                row["onnx_export"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            finally:
                onnx_path.unlink(missing_ok=True)
        rows.append(row)
        print(json.dumps(row))
    fp32 = summarize(confusion_counts(reference, val.masks), val.patients)["aggregates"]["mean_patient_dice"]
    machine = machine_info()
    record = {
        "date": dt.date.today().isoformat(),
        "checkpoint": str(args.checkpoint),
        "val_patients": list(split.val),
        "fp32_val_mean_patient_dice": fp32,
        "recipe": {
            "epochs": recipe.epochs,
            "lr": recipe.lr,
            "optimizer": recipe.optimizer,
            "distill_weight": recipe.distill_weight,
        },
        "machine": machine,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "qat_library_compare.json", record)
    lines = [
        f"QAT libraries on {args.checkpoint} (val FP32 mean per-patient Dice {fp32:.4f}, n={len(split.val)} patients), "
        f"{cpu_line(machine['cpu'])}, {dt.date.today().isoformat()}.",
        "",
        "| library | stage | val Dice/patient | drop (pts) | worst patient (pts) | least agreement | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for stage, secs in (
            ("PTQ (calibrated fake-quant torch model)", r["calibration_seconds"]),
            (f"QAT {recipe.epochs} epoch(s)", sum(r["qat_epoch_seconds"])),
        ):
            s = r["ptq" if stage.startswith("PTQ") else "qat"]
            lines.append(
                f"| {r['library']} | {stage} | {s['val_mean_patient_dice']:.4f} | {s['drop_points']:.2f} | {s['worst_patient_drop_points']:.2f} | {s['least_agreement']:.4f} | {secs} |"
            )
        if "onnx_export" in r:
            e = r["onnx_export"]
            if "error" in e:
                lines.append(f"| {r['library']} | own ONNX export | failed: {e['error']} | | | | |")
            else:
                o = e["onnxruntime"]
                lines.append(
                    f"| {r['library']} | own ONNX export on ONNX Runtime (zero points {', '.join(e['zero_point_dtypes'])}, all 0: {e['all_zero_points_0']}; per-channel axes {e['per_channel_axes']}; tensorrt profile rules: {'kept' if e['tensorrt_profile_ok'] else 'broken'}) | {o['val_mean_patient_dice']:.4f} | {o['drop_points']:.2f} | {o['worst_patient_drop_points']:.2f} | {o['least_agreement']:.4f} | |"
                )
    write_text_atomic(args.out / "qat_library_compare.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Bench results -> table / markdown / CSV / JSON and the speed-accuracy plots."""

from __future__ import annotations

import os
from pathlib import Path

from lggdeploy.bench.labels import engine_name
from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.tables import csv_table, markdown_table
from lggdeploy.common.tables import rich_table as _rich_table

OUTPUT_FORMATS = ("table", "md", "csv", "json")  # what `bench --format` prints (not engine formats)


def flat_rows(results: dict) -> list[dict]:
    batches = results["options"]["batch_sizes"]
    small, large = str(min(batches)), str(max(batches))
    out = []
    for row in results["rows"]:
        lat = row.get("latency", {})
        delta = row.get("delta_dice_points")
        out.append(
            {
                "model": row["model"],
                "engine": engine_name(row),
                "status": row["status"] if row["status"] == "ok" else f"{row['status']}: {row['reason'][:60]}",
                "file_mb": row.get("file_mb"),
                f"p50_ms_b{small}": lat.get(small, {}).get("p50_ms"),
                f"p99_ms_b{small}": lat.get(small, {}).get("p99_ms"),
                f"p50_ms_per_image_b{large}": lat.get(large, {}).get("p50_ms_per_image"),
                f"images_per_s_b{large}": lat.get(large, {}).get("images_per_s"),
                f"speedup_b{large}": row.get("speedup", {}).get(large),
                "end_to_end_ms_per_image": row.get("end_to_end_ms_per_image"),
                "mean_patient_dice": row.get("mean_patient_dice"),
                "median_patient_dice": row.get("median_patient_dice"),
                "global_dice": row.get("global_dice"),
                "mean_patient_iou": row.get("mean_patient_iou"),
                "pixel_accuracy": row.get("pixel_accuracy"),
                "slice_dice_study_style": row.get("slice_mean_dice_study_style"),
                "delta_dice_points": delta["mean"] if delta else None,
                "delta_dice_ci95": f"[{delta['ci95'][0]:+.2f}, {delta['ci95'][1]:+.2f}]" if delta else None,
            }
        )
    return out


HEADERS = {
    "model": "model", "engine": "engine", "status": "status", "file_mb": "file MB",
    "end_to_end_ms_per_image": "end-to-end ms/img", "mean_patient_dice": "Dice/patient mean",
    "median_patient_dice": "Dice/patient median", "global_dice": "global Dice", "mean_patient_iou": "IoU/patient",
    "pixel_accuracy": "pixel acc.", "slice_dice_study_style": "per-slice Dice (study)",
    "delta_dice_points": "ΔDice pts vs FP32", "delta_dice_ci95": "ΔDice 95% CI",
}


def header(key: str) -> str:
    if key in HEADERS:
        return HEADERS[key]
    for prefix, text in (("p50_ms_per_image_b", "p50 ms/img b"), ("p50_ms_b", "p50 ms b"), ("p99_ms_b", "p99 ms b"), ("images_per_s_b", "img/s b"), ("speedup_b", "speed-up b")):
        if key.startswith(prefix):
            return text + key[len(prefix):]
    return key


def markdown(results: dict) -> str:
    rows = flat_rows(results)
    lines = [markdown_table(rows, [(k, header(k)) for k in rows[0]]).rstrip("\n")]
    cpu = results["machine"]["cpu"]
    lines += [
        "",
        f"Split: {results['options']['split']}; latency: median/p99 over {results['options']['iters']} interleaved rounds after "
        f"{results['options']['warmup']} warm-up runs, {results['options']['threads']} ONNX Runtime threads; "
        f"machine: {cpu['model']}, {cpu['cores']} cores ({', '.join(cpu['isa'])}); {results['created']}.",
        "ΔDice: per-patient Dice of the engine minus the PyTorch FP32 reference, in points (0.01 Dice), mean over patients with a paired bootstrap 95% interval.",
    ]
    return "\n".join(lines) + "\n"


def csv_text(results: dict) -> str:
    return csv_table(flat_rows(results))


def rich_table(results: dict):
    rows = flat_rows(results)
    hidden = {"median_patient_dice", "slice_dice_study_style", "end_to_end_ms_per_image", "global_dice", "pixel_accuracy", "file_mb"}
    if all(r["status"] == "ok" for r in rows):
        hidden.add("status")
    keep = [k for k in rows[0] if not k.startswith("p99") and k not in hidden]
    short = {"onnxruntime": "ort", " profile)": ")", " [reference]": " (ref)"}
    for r in rows:
        for long, brief in short.items():
            r["engine"] = r["engine"].replace(long, brief)
    return _rich_table(rows, [(k, header(k)) for k in keep], title="lggdeploy bench: speed and per-patient accuracy")


def write_all(results: dict, out_dir: str | os.PathLike) -> list[Path]:
    out_dir = Path(out_dir)
    written = [
        write_json_atomic(out_dir / "bench.json", results),
        write_text_atomic(out_dir / "bench.md", markdown(results)),
        write_text_atomic(out_dir / "bench.csv", csv_text(results)),
    ]
    from lggdeploy.bench.plots import plot

    return written + plot(results, out_dir)

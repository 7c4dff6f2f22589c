"""Bench results -> table / markdown / CSV / JSON and the speed-accuracy plots."""

from __future__ import annotations

import os
from pathlib import Path

from lggdeploy.bench.labels import engine_name
from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_line
from lggdeploy.common.tables import csv_table, markdown_table
from lggdeploy.common.tables import rich_table as _rich_table

OUTPUT_FORMATS = ("table", "md", "csv", "json")  # what `bench --format` prints (not engine formats)


def _delta_text(delta: dict | None) -> str | None:
    if not delta:
        return None
    if delta.get("ci95"):
        return f"[{delta['ci95'][0]:+.2f}, {delta['ci95'][1]:+.2f}]"
    return f"range {delta['min']:+.2f}..{delta['max']:+.2f} (no interval, n={delta['n']})"


def flat_rows(results: dict) -> list[dict]:
    batches = results["options"]["batch_sizes"]
    small, large = str(min(batches)), str(max(batches))
    out = []
    for row in results["rows"]:
        lat = row.get("latency", {})
        delta = row.get("delta_dice_points")
        first = lat.get(small, {})
        out.append(
            {
                "model": row["model"],
                "engine": engine_name(row),
                "status": row["status"] if row["status"] == "ok" else f"{row['status']}: {row['reason'][:60]}",
                "file_mb": row.get("file_mb"),
                f"p50_ms_b{small}": first.get("p50_ms"),
                f"iqr_ms_b{small}": first.get("iqr_ms"),
                f"p99_or_max_ms_b{small}": first.get("p99_ms")
                if first.get("p99_ms") is not None
                else first.get("max_ms"),
                f"p50_ms_per_image_b{large}": lat.get(large, {}).get("p50_ms_per_image"),
                f"images_per_s_b{large}": lat.get(large, {}).get("images_per_s"),
                f"speedup_b{small}": row.get("speedup", {}).get(small),
                f"speedup_b{large}": row.get("speedup", {}).get(large),
                f"e2e_ms_per_image_b{small}": (row.get("end_to_end_ms_per_image") or {}).get(small),
                f"e2e_ms_per_image_b{large}": (row.get("end_to_end_ms_per_image") or {}).get(large),
                "patients": row.get("patients"),
                "mean_patient_dice": row.get("mean_patient_dice"),
                "median_patient_dice": row.get("median_patient_dice"),
                "patients_missed": row.get("patients_missed"),
                "global_dice": row.get("global_dice"),
                "mean_patient_iou": row.get("mean_patient_iou"),
                "pixel_accuracy": row.get("pixel_accuracy"),
                "slice_dice_study_style": row.get("slice_mean_dice_study_style"),
                "postprocess": row.get("postprocess"),
                "delta_dice_points": delta["mean"] if delta else None,
                "delta_dice_spread": _delta_text(delta),
            }
        )
    return out


HEADERS = {
    "model": "model",
    "engine": "engine",
    "status": "status",
    "file_mb": "file MB",
    "end_to_end_ms_per_image": "end-to-end ms/img",
    "mean_patient_dice": "Dice/patient mean",
    "median_patient_dice": "Dice/patient median",
    "global_dice": "global Dice",
    "mean_patient_iou": "IoU/patient",
    "pixel_accuracy": "pixel acc.",
    "postprocess": "post-processing",
    "slice_dice_study_style": "per-slice Dice (study)",
    "delta_dice_points": "ΔDice pts vs FP32",
    "delta_dice_spread": "ΔDice 95% CI (n ≥ 5) or range",
    "patients": "n patients",
    "patients_missed": "patients missed",
}


def header(key: str) -> str:
    if key in HEADERS:
        return HEADERS[key]
    for prefix, text in (
        ("p50_ms_per_image_b", "p50 ms/img b"),
        ("p50_ms_b", "p50 ms b"),
        ("iqr_ms_b", "IQR ms b"),
        ("p99_or_max_ms_b", "p99 (max if <100 runs) ms b"),
        ("images_per_s_b", "img/s b"),
        ("speedup_b", "speed-up b"),
        ("e2e_ms_per_image_b", "end-to-end ms/img b"),
    ):
        if key.startswith(prefix):
            return text + key[len(prefix) :]
    return key


def notes(results: dict) -> list[str]:
    """What a reader needs beside the table: split and n, timing protocol, the A/A noise floor, machine, date."""
    options, cpu = results["options"], results["machine"]["cpu"]
    patients = {r.get("patients") for r in results["rows"] if r.get("patients")}
    n = ", ".join(str(p) for p in sorted(patients)) or "?"
    lines = [
        f"Split: {options['split']}, {n} patient(s)"
        + (" — ONE patient: a per-patient mean of one; read it as a case, not a verdict" if patients == {1} else "")
        + ".",
        f"Latency: median and IQR over {options['iters']} rounds after {options['warmup']} warm-up runs, engines in a freshly shuffled order each round "
        f"(seed {options.get('order_seed', 0)}), {options['threads']} threads for ONNX Runtime, OpenVINO and PyTorch alike; p99 only from 100 runs, else the max. "
        "End-to-end: uint8 slices in, resize and normalization, inference, masks at native size out, the engine's post-processing (median of 5).",
        "Accuracy: masks at each engine's stored threshold, each patient's volume post-processed as its manifest says (column post-processing).",
    ]
    floor = results.get("noise_floor") or {}
    if floor.get("worst_deviation") is not None:
        lines.append(
            f"A/A row: the reference timed twice as two entries; their ratio deviates from 1 by up to {floor['worst_deviation']:.1%} "
            + (
                "— WARNING: above 10 %, this run was noisy."
                if floor.get("warning")
                else "(the noise floor of this run)."
            )
        )
    lines += [
        f"Machine: {cpu_line(cpu)}; {results['created']}.",
        "ΔDice: per-patient Dice of the engine minus the PyTorch FP32 reference on the same slices, in points (0.01 Dice), mean over patients; "
        "a paired bootstrap 95% interval from 5 patients on, otherwise the range of the per-patient differences and no interval.",
    ]
    return lines


def markdown(results: dict) -> str:
    rows = flat_rows(results)
    lines = [markdown_table(rows, [(k, header(k)) for k in rows[0]]).rstrip("\n"), ""]
    lines += notes(results)
    return "\n".join(lines) + "\n"


def csv_text(results: dict) -> str:
    return csv_table(flat_rows(results))


def _compact_rows(rows: list[dict], small: str, large: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """The columns a newcomer reads first (as Ultralytics' benchmark prints them): what, how fast, how accurate."""
    for r in rows:
        delta, n = r.get("delta_dice_points"), r.get("patients")
        r["delta_with_n"] = None if delta is None else f"{delta:+.2f} (n={n})"
    columns = [
        ("model", "model"),
        ("engine", "engine"),
        (f"p50_ms_b{small}", f"ms b{small}"),
        (f"p50_ms_per_image_b{large}", f"ms/img b{large}"),
        (f"speedup_b{large}", f"speed-up b{large}"),
        ("mean_patient_dice", "Dice/patient"),
        ("delta_with_n", "ΔDice pts (n)"),
    ]
    if any(r["status"] != "ok" for r in rows):
        columns.append(("status", "status"))
    return rows, columns


def rich_table(results: dict, wide: bool = False):
    """The screen table: compact by default (model, engine, ms at the smallest batch, ms per image at the largest,
    speed-up, Dice per patient, ΔDice with its n); `wide`: every column of bench.md."""
    rows = flat_rows(results)
    batches = results["options"]["batch_sizes"]
    small, large = str(min(batches)), str(max(batches))
    if wide:
        columns = [(k, header(k)) for k in rows[0]]
    else:
        rows, columns = _compact_rows(rows, small, large)
    short = {"onnxruntime": "ort", " profile)": ")", " [reference]": " (ref)"}
    for r in rows:
        for long, brief in short.items():
            r["engine"] = r["engine"].replace(long, brief)
    return _rich_table(rows, columns, title="lggdeploy bench: speed and per-patient accuracy")


def write_all(results: dict, out_dir: str | os.PathLike) -> list[Path]:
    out_dir = Path(out_dir)
    written = [
        write_json_atomic(out_dir / "bench.json", results),
        write_text_atomic(out_dir / "bench.md", markdown(results)),
        write_text_atomic(out_dir / "bench.csv", csv_text(results)),
    ]
    from lggdeploy.bench.plots import plot

    return written + plot(results, out_dir)

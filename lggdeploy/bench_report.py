"""Bench results -> table / markdown / CSV / JSON and the speed-accuracy plots."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from lggdeploy.bench_stats import pareto_front
from lggdeploy.fileio import atomic_path, write_json_atomic, write_text_atomic

FORMATS = ("table", "md", "csv", "json")


def _engine_name(row: dict) -> str:
    name = f"{row['backend']} {row['precision']}"
    if row.get("int8_profile"):
        name += f" ({row['int8_profile']} profile)"
    if row.get("pruned"):
        name += " pruned"
    if row["backend"] == "torch":
        name += " [reference]"
    return name


def _short_name(row: dict) -> str:
    """A compact engine label for plots: 'ort int8/cpu', 'torch fp32 (ref)'."""
    name = _engine_name(row).replace("onnxruntime", "ort").replace(" [reference]", " (ref)")
    return name.replace(" (cpu profile)", "/cpu").replace(" (tensorrt profile)", "/trt")


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
                "engine": _engine_name(row),
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


def _fmt(value, key: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if key.startswith(("p50", "p99", "images_per_s", "end_to_end", "file_mb", "speedup", "delta")):
            return f"{value:.2f}"
        return f"{value:.4f}"
    return str(value)


def markdown(results: dict) -> str:
    rows = flat_rows(results)
    keys = list(rows[0])
    lines = ["| " + " | ".join(header(k) for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k], k) for k in keys) + " |" for r in rows]
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
    rows = flat_rows(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def rich_table(results: dict):
    from rich.table import Table

    rows = flat_rows(results)
    hidden = {"median_patient_dice", "slice_dice_study_style", "end_to_end_ms_per_image", "global_dice", "pixel_accuracy", "file_mb"}
    if all(r["status"] == "ok" for r in rows):
        hidden.add("status")
    keep = [k for k in rows[0] if not k.startswith("p99") and k not in hidden]
    table = Table(title="lggdeploy bench: speed and per-patient accuracy", show_lines=False)
    for k in keep:
        table.add_column(header(k), justify="left" if k in ("model", "engine", "status") else "right")
    short = {"onnxruntime": "ort", " profile)": ")", " [reference]": " (ref)"}
    for r in rows:
        for long, brief in short.items():
            r["engine"] = r["engine"].replace(long, brief)
        table.add_row(*(_fmt(r[k], k) for k in keep))
    return table


def plot(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (log-axis labels as plain numbers)

    batches = results["options"]["batch_sizes"]
    large = str(max(batches))
    scored = [r for r in results["rows"] if r["status"] == "ok" and r.get("mean_patient_dice") is not None and large in r.get("latency", {})]
    paths = []
    if not scored:
        return paths
    models = sorted({r["model"] for r in scored})
    markers = dict(zip(models, "osD^v<>"))
    colours = {"fp32": "tab:blue", "fp16": "tab:orange", "int8": "tab:green"}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    points = [(r["latency"][large]["p50_ms_per_image"], r["mean_patient_dice"]) for r in scored]
    order = sorted(range(len(points)), key=lambda i: points[i])
    for rank, i in enumerate(order):  # stagger labels so neighbouring points stay readable
        r, (x, y) = scored[i], points[i]
        edge = "black" if r["backend"] == "torch" else "none"
        ax.scatter(x, y, marker=markers[r["model"]], s=90, c=colours.get(r["precision"], "grey"), edgecolors=edge, linewidths=1.5, zorder=3)
        ax.annotate(_short_name(r), (x, y), textcoords="offset points", xytext=(6, -12 + 10 * (rank % 3)), fontsize=7)
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="grey", zorder=2, label="Pareto front")
    for model in models:
        ax.scatter([], [], marker=markers[model], c="white", edgecolors="black", label=model)
    for precision, colour in colours.items():
        ax.scatter([], [], marker="s", c=colour, label=precision)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(f"latency per image, ms (median, batch {large}, log scale) — lower is faster")
    ax.set_ylabel(f"mean per-patient Dice ({results['options']['split']} split) — higher is better")
    ax.set_title("speed vs accuracy (black edge: PyTorch FP32 reference)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "speed_accuracy.png"))
    plt.close(fig)

    engines = [r for r in scored if r.get("speedup")]
    if engines:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(engines) + 2), 4.5))
        width = 0.8 / len(batches)
        for k, b in enumerate(batches):
            values = [r["speedup"].get(str(b), 0) for r in engines]
            bars = ax.bar([i + k * width for i in range(len(engines))], values, width, label=f"batch {b}")
            ax.bar_label(bars, fmt="%.2f×", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(engines))])
        ax.set_xticklabels([f"{r['model']}\n{_short_name(r)}" for r in engines], fontsize=7, rotation=20, ha="right")
        ax.set_ylabel("speed-up vs PyTorch FP32 (median latency ratio)")
        ax.set_title("speed-up over the reference (1.0 = same speed)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / "speedup.png"))
        plt.close(fig)
    return paths


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def write_all(results: dict, out_dir: str | os.PathLike) -> list[Path]:
    out_dir = Path(out_dir)
    written = [
        write_json_atomic(out_dir / "bench.json", results),
        write_text_atomic(out_dir / "bench.md", markdown(results)),
        write_text_atomic(out_dir / "bench.csv", csv_text(results)),
    ]
    return written + plot(results, out_dir)

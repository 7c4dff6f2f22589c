"""Bench figures: speed vs accuracy (Pareto front, models by marker, precisions by colour) and speed-up bars."""

from __future__ import annotations

from pathlib import Path

from lggdeploy.bench.labels import short_name
from lggdeploy.bench.stats import pareto_front
from lggdeploy.common.files import atomic_path


def plot(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (log-axis labels as plain numbers)

    batches = results["options"]["batch_sizes"]
    large = str(max(batches))
    scored = [
        r
        for r in results["rows"]
        if r["status"] == "ok" and r.get("mean_patient_dice") is not None and large in r.get("latency", {})
    ]
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
        ax.scatter(
            x,
            y,
            marker=markers[r["model"]],
            s=90,
            c=colours.get(r["precision"], "grey"),
            edgecolors=edge,
            linewidths=1.5,
            zorder=3,
        )
        ax.annotate(short_name(r), (x, y), textcoords="offset points", xytext=(6, -12 + 10 * (rank % 3)), fontsize=7)
    front = pareto_front(points)
    ax.plot(
        [points[i][0] for i in front], [points[i][1] for i in front], "--", color="grey", zorder=2, label="Pareto front"
    )
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
        ax.set_xticklabels([f"{r['model']}\n{short_name(r)}" for r in engines], fontsize=7, rotation=20, ha="right")
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

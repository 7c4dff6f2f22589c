"""Bench figures: speed vs accuracy (one panel per model, its Pareto front, precisions by colour) and speed-up bars."""

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
    colours = {"fp32": "tab:blue", "fp16": "tab:orange", "bf16": "tab:purple", "int8": "tab:green"}
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models) + 1, 5), squeeze=False)
    for ax, model in zip(axes[0], models):
        _speed_accuracy_panel(ax, [r for r in scored if r["model"] == model], large, colours)
        ax.set_title(model)
    axes[0][0].set_ylabel(f"mean per-patient Dice ({results['options']['split']} split) — higher is better")
    handles = [plt.Line2D([], [], ls="--", color="grey", label="Pareto front")]
    handles += [plt.Line2D([], [], ls="", marker="o", color=c, label=p) for p, c in colours.items()]
    handles += [
        plt.Line2D([], [], ls="", marker="o", mfc="white", mec="black", mew=1.5, label="PyTorch FP32 reference")
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"speed vs accuracy, one panel per model (latency: median per image at batch {large})")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    paths.append(_save(fig, out_dir / "speed_accuracy.png"))
    plt.close(fig)

    engines = [r for r in scored if r.get("speedup")]
    if engines:
        paths.append(_speedup_bars(engines, batches, out_dir / "speedup.png"))
    return paths


def _speedup_bars(engines: list[dict], batches: list[int], path: Path) -> Path:
    """speedup.png: each engine's speed-up over PyTorch FP32, one bar per batch size."""
    import matplotlib.pyplot as plt

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
    saved = _save(fig, path)
    plt.close(fig)
    return saved


def _speed_accuracy_panel(ax, rows: list[dict], large: str, colours: dict) -> None:
    """One model's engines: latency against Dice, its Pareto front, labels placed so that none overlaps another."""
    import matplotlib.ticker

    points = [(r["latency"][large]["p50_ms_per_image"], r["mean_patient_dice"]) for r in rows]
    for r, (x, y) in zip(rows, points):
        reference = r["backend"] == "torch"
        ax.scatter(
            x, y, s=80, zorder=3, c="white" if reference else colours.get(r["precision"], "grey"),
            edgecolors="black" if reference else "none", linewidths=1.5,
        )  # fmt: skip
    front = sorted(points[i] for i in pareto_front(points))
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", zorder=2)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.margins(x=0.25, y=0.15)
    ax.set_xlabel("ms per image (log scale) — lower is faster")
    ax.grid(alpha=0.3, which="both")
    _place_labels(ax, points, [short_name(r) for r in rows])


def _place_labels(ax, points: list[tuple[float, float]], labels: list[str], step_px: float = 11.0) -> None:
    """Each label right of its point, moved up (with a leader line) until it clears every label placed before it."""
    ax.figure.canvas.draw()  # fixes the limits, so data -> pixel transforms hold
    pixels = ax.transData.transform(points)
    to_points = 72.0 / ax.figure.dpi
    placed: list[tuple[float, float]] = []
    for i in sorted(range(len(points)), key=lambda i: (pixels[i][1], pixels[i][0])):
        x, y = pixels[i]
        target = y
        while any(abs(target - py) < step_px and abs(x - px) < 110 for px, py in placed):
            target += step_px
        placed.append((x, target))
        moved = target != y
        ax.annotate(
            labels[i], points[i], textcoords="offset points", xytext=(7, (target - y) * to_points - 3), fontsize=7,
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"} if moved else None,
        )  # fmt: skip


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path

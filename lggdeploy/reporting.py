"""rich tables for metrics summaries, splits and data checks (printing only; no computation)."""

from __future__ import annotations

from rich.table import Table

from lggdeploy.metrics import METRIC_LABELS


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def metrics_table(summary: dict, title: str = "") -> Table:
    """Aggregates first (primary metric on top), then one row per patient."""
    table = Table(title=title or None, show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in METRIC_LABELS.items():
        table.add_row(label, _fmt(summary["aggregates"].get(key)))
    table.add_row("patients / slices", f"{summary['aggregates']['patients']} / {summary['aggregates']['slices']}")
    return table


def patients_table(summary: dict) -> Table:
    table = Table(title="per patient")
    for column in ("patient", "slices", "tumor slices", "Dice", "IoU", "accuracy"):
        table.add_column(column, justify="left" if column == "patient" else "right")
    for row in summary["per_patient"]:
        table.add_row(row["patient"], str(row["slices"]), str(row["tumor_slices"]), _fmt(row["dice"]), _fmt(row["iou"]), _fmt(row["accuracy"]))
    return table


def split_table(split, title: str = "") -> Table:
    table = Table(title=title or None)
    for column in ("split", "patients", "slices", "tumor slices", "tumor fraction"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name in ("train", "val", "test"):
        ids = split.patients(name)
        slices = sum(split.slices.get(p, 0) for p in ids)
        tumor = sum(split.tumor_slices.get(p, 0) for p in ids)
        table.add_row(name, str(len(ids)), str(slices), str(tumor), f"{tumor / slices:.1%}" if slices else "n/a")
    return table


def comparison_table(rows: list[dict], columns: list[tuple[str, str]], title: str = "") -> Table:
    """rows of dicts -> table with (key, header) columns."""
    table = Table(title=title or None)
    for _, header in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*(_fmt(row.get(key)) for key, _ in columns))
    return table


def comparison_markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"

"""The one table formatter: rows of dicts -> rich table (screen), markdown, CSV. Printing only; no computation.

Columns are (key, header) pairs. Numbers are formatted by `fmt`: latencies, sizes, speed-ups and Dice deltas
with 2 decimals, metrics with 4, missing values as an em dash.
"""

from __future__ import annotations

import csv
import io

TWO_DECIMALS = (
    "p50",
    "p90",
    "p99",
    "iqr",
    "max_ms",
    "images_per_s",
    "end_to_end",
    "file_mb",
    "speedup",
    "delta",
    "seconds",
    "ms",
)
LEFT = ("model", "engine", "status", "patient", "metric", "split", "name", "backend", "candidate")


def fmt(value, key: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "—"
        return (
            f"{value:.2f}"
            if key.startswith(TWO_DECIMALS) or key.endswith(("_s", "_ms", "_mb", "seconds"))
            else f"{value:.4f}"
        )
    return str(value)


def rich_table(rows: list[dict], columns: list[tuple[str, str]], title: str = ""):
    from rich.table import Table

    table = Table(title=title or None)
    for key, header in columns:
        table.add_column(header, justify="left" if key in LEFT else "right", no_wrap=key == "model")
    for row in rows:
        table.add_row(*(fmt(row.get(key), key) for key, _ in columns))
    return table


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(k), k) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict], keys: list[str] | None = None) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys or list(rows[0]), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def metrics_table(summary: dict, labels: dict[str, str], title: str = ""):
    """Aggregates of an evaluation summary (primary metric on top), with the number of patients and slices."""
    agg = summary["aggregates"]
    rows = [{"metric": label, "value": agg[key]} for key, label in labels.items() if key in agg]  # figures this run has
    rows.append({"metric": "patients / slices", "value": f"{agg['patients']} / {agg['slices']}"})
    return rich_table(rows, [("metric", "metric"), ("value", "value")], title)


PATIENT_COLUMNS = [
    ("patient", "patient"),
    ("slices", "slices"),
    ("tumor_slices", "tumor slices"),
    ("detected", "tumor found"),
    ("dice", "Dice"),
    ("dice_without_postprocess", "Dice, no post-processing"),
    ("dice_largest_component", "Dice, largest component"),
    ("iou", "IoU"),
    ("accuracy", "accuracy"),
]


def columns_present(rows: list[dict], columns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The columns some row has a value for (e.g. no post-processing column for a model without post-processing)."""
    return [(key, header) for key, header in columns if any(key in row for row in rows)]

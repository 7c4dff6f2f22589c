"""Engine labels for tables and plots: 'onnxruntime int8 (cpu profile)', 'ort int8/cpu'."""

from __future__ import annotations


def engine_name(row: dict) -> str:
    name = f"{row['backend']} {row['precision']}"
    if row.get("int8_profile"):
        name += f" ({row['int8_profile']} profile)"
    if row.get("pruned"):
        name += " pruned"
    if row["backend"] == "torch":
        name += " [reference, A/A]" if row.get("aa") else " [reference]"
    return name


def short_name(row: dict) -> str:
    """A compact engine label for plots: 'ort int8/cpu', 'torch fp32 (ref)'."""
    name = (
        engine_name(row)
        .replace("onnxruntime", "ort")
        .replace(" [reference, A/A]", " (ref A/A)")
        .replace(" [reference]", " (ref)")
    )
    return (
        name.replace(" (cpu profile)", "/cpu")
        .replace(" (tensorrt profile)", "/trt")
        .replace(" (openvino profile)", "/ov")
    )

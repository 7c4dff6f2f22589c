"""The accuracy gate: an engine must keep the FP32 model's mean per-patient Dice on the validation split.

Drops are in Dice points (1 point = 0.01 Dice). For INT8, a failing engine falls back layer by layer:
quantized nodes are ranked by the quantization error they add (onnxruntime.quantization.qdq_loss_debug:
the signal-to-quantization-noise ratio of each activation before and after its Q/DQ pair, measured on
calibration slices), the worst are kept in float, and the graph is rebuilt from the cached calibration
ranges, doubling the kept set until the drop is within budget or every candidate has been tried.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lggdeploy.common.progress import console


@dataclass
class GateResult:
    fp32_dice: float
    engine_dice: float
    max_drop_points: float
    nodes_kept_in_float: list[str] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.fp32_dice - self.engine_dice)

    @property
    def passed(self) -> bool:
        return self.drop_points <= self.max_drop_points + 1e-9

    def to_json(self) -> dict:
        return {
            "split": "val",
            "metric": "mean per-patient Dice",
            "fp32_dice": self.fp32_dice,
            "engine_dice": self.engine_dice,
            "drop_points": self.drop_points,
            "max_drop_points": self.max_drop_points,
            "passed": self.passed,
            "nodes_kept_in_float": self.nodes_kept_in_float,
            "attempts": self.attempts,
        }


def rank_quantized_nodes(float_model: Path, qdq_model: Path, reader, max_slices: int = 2) -> list[tuple[str, float]]:
    """(quantized node, dB of signal-to-noise it loses) for every quantized compute node, worst first.

    Both models run on a few calibration slices with every intermediate tensor saved; the float-vs-Q/DQ
    SQNR of each activation (qdq_loss_debug's xmodel_err) is compared across each node: SQNR of its
    noisiest input minus SQNR of its output is the error that node adds.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    reader.rewind()
    few = []  # collect_activations iterates its reader: a list of input dicts serves
    while len(few) < max_slices and (item := reader.get_next()) is not None:
        few.append(item)
    reader.rewind()

    with tempfile.TemporaryDirectory() as tmp:
        aug_float, aug_qdq = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        modify_model_output_intermediate_tensors(str(float_model), str(aug_float))
        modify_model_output_intermediate_tensors(str(qdq_model), str(aug_qdq))
        float_acts = collect_activations(str(aug_float), few)
        qdq_acts = collect_activations(str(aug_qdq), few)
    errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    sqnr = {name: float(err["xmodel_err"]) for name, err in errors.items() if "xmodel_err" in err}

    qdq_graph = onnx.load(str(qdq_model)).graph
    dequantized = {out for node in qdq_graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    quantized = {node.name for node in qdq_graph.node if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and dequantized.intersection(node.input)}
    ranking = []
    for node in onnx.load(str(float_model)).graph.node:
        if node.name not in quantized:
            continue
        outputs = [sqnr[o] for o in node.output if o in sqnr]
        if not outputs:
            continue
        inputs = [sqnr[i] for i in node.input if i in sqnr]
        before = min(inputs) if inputs else float("inf")
        ranking.append((node.name, min(before, 200.0) - min(outputs)))
    return sorted(ranking, key=lambda kv: kv[1], reverse=True)


def gate_with_fallback(
    fp32_dice: float,
    max_drop_points: float,
    build: Callable[[list[str]], Path],
    score: Callable[[Path], float],
    rank: Callable[[], list[tuple[str, float]]] | None,
    label: str = "",
    max_fallback_fraction: float = 0.5,
) -> tuple[Path, GateResult]:
    """Build with nothing excluded; while over budget and `rank` is given, keep 1, 2, 4, ... worst nodes in float.

    At most `max_fallback_fraction` of the quantized nodes go back to float: past that it is no INT8 engine.
    """
    kept: list[str] = []
    path = build(kept)
    dice = score(path)
    result = GateResult(fp32_dice, dice, max_drop_points, [], [{"nodes_kept_in_float": 0, "engine_dice": dice}])
    console.print(f"{label}: FP32 {fp32_dice:.4f}, engine {dice:.4f}, drop {result.drop_points:.2f} points (budget {max_drop_points})")
    if result.passed or rank is None:
        return path, result
    ranked = rank()
    ranking = [name for name, _ in ranked][: max(1, int(len(ranked) * max_fallback_fraction))]
    k = 1
    while not result.passed and k <= len(ranking):
        kept = ranking[:k]
        path = build(kept)
        dice = score(path)
        result.engine_dice, result.nodes_kept_in_float = dice, list(kept)
        result.attempts.append({"nodes_kept_in_float": k, "engine_dice": dice})
        console.print(f"{label}: {k} worst node(s) kept in float -> engine {dice:.4f}, drop {result.drop_points:.2f} points")
        if k == len(ranking):
            break
        k = min(2 * k, len(ranking))
    return path, result

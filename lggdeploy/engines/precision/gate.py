"""The accuracy gate: an engine must keep the FP32 model's accuracy on every validation patient.

The reference is the PyTorch FP32 model, run once on the val slices; each candidate engine runs on the same
slices with the same threshold. Per patient the gate records the engine's and the reference's Dice (against the
ground truth), their difference in points (1 point = 0.01 Dice), the label-free agreement (Dice of the engine's
mask against the reference's mask, pooled over the patient's volume) and the logit SQNR (dB). It passes only when

- the mean per-patient drop <= max_drop points,
- the worst patient's drop <= max_patient_drop points, and
- every patient's agreement >= min_agreement

(criteria.GateCriteria holds the defaults and why). That is the *fidelity* rule: the right test for a transform
meant to keep one function (export, FP16, BF16, INT8).

A retrained model — pruned and fine-tuned, or distilled: `build MODEL --reference UNPRUNED` with another checkpoint —
is a new function, and agreement with the unpruned model's masks is the wrong test for it (the same fine-tuning
without pruning fails agreement while gaining on every val patient). Its engines are judged by `RetrainedReference`:

- its FP32 engine by the *labels* rule against the unpruned FP32 model: mean drop <= max_drop, worst patient's drop
  <= max_patient_drop, and no val patient missed that the unpruned model found; agreement is recorded, not judged
  (the export itself was checked against its own PyTorch model by export's parity check);
- its FP16 / BF16 / INT8 engines twice: for fidelity against its *own* FP32 model (the rule above), and on labels
  against the unpruned FP32 model (*labels-total*: mean drop <= max_drop and no val patient missed), so pruning and
  quantization still share one budget.

The rule that judged an engine is named in its gate record (`rule`) and in optimize.md.

Agreement stays meaningful when the reference is weak: a model that predicts no tumor gives every engine
"drop 0.00"; only agreement can tell an engine that starts predicting tumor. When the reference predicts no tumor
on the val split at all, the gate says so (screen and manifest) and agreement alone decides.

INT8 fallback: quantized nodes are ranked by what they do to the final output (`rank_by_output_effect`: each
node alone put back in float in the Q/DQ graph, the output's SQNR gain measured on tumor slices of every val
patient; a graph of more than 64 quantized nodes is first screened by each node's local error, so the ranking costs
at most 64 sessions), the worst 1, 2, 4, ... are kept in float and the graph is rebuilt from the cached ranges, until the
gate passes — at most `max_fallback_fraction` of the quantized nodes, past which it is no INT8 engine.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lggdeploy.backends.base import RunOptions
from lggdeploy.backends.onnxruntime import session_options
from lggdeploy.common.errors import SearchStopped
from lggdeploy.common.progress import progress_bar
from lggdeploy.data.arrays import SliceArrays
from lggdeploy.data.transforms import Normalization, logits_to_masks
from lggdeploy.engines.precision.criteria import (  # noqa: F401 (re-exported: gate.GateCriteria)
    FIDELITY,
    LABELS,
    LABELS_TOTAL,
    RULES,
    GateCriteria,
    missed,
    rule_for,
)
from lggdeploy.metrics import confusion_counts, dice_from_counts
from lggdeploy.scoring import infer_batches

logger = logging.getLogger(__name__)


@dataclass
class Outputs:
    """One model's logits (model resolution) and masks (native resolution) on the gate's slices."""

    logits: np.ndarray
    masks: np.ndarray


def run_on_slices(
    runner,
    slices: SliceArrays,
    img_size: int,
    normalization: Normalization,
    threshold: float,
    label: str,
    batch_size: int = 16,
) -> Outputs:

    logits, masks = [], []
    with progress_bar() as bar:
        task = bar.add_task(f"gate {label}", total=len(slices), info="")
        for _, out in infer_batches(runner, slices.images, img_size, normalization, batch_size):
            logits.append(out[:, 0].astype(np.float32))
            masks.append(logits_to_masks(out, threshold=threshold))
            bar.advance(task, len(out))
    return Outputs(np.concatenate(logits), np.concatenate(masks))


MAX_SQNR_DB = 200.0  # identical outputs: reported as 200 dB rather than infinity (JSON has no infinity)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `candidate` against `reference`, in dB (capped at 200 when identical)."""
    noise = float(np.sum((reference.astype(np.float64) - candidate) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return MAX_SQNR_DB if noise == 0 else min(MAX_SQNR_DB, 10 * math.log10(max(signal, 1e-30) / noise))


@dataclass
class GateResult:
    criteria: GateCriteria
    per_patient: list[dict]
    reference_predicts_no_tumor: bool
    rule: str = FIDELITY  # FIDELITY, LABELS or LABELS_TOTAL: which of the criteria this result judges
    labels: GateResult | None = None  # a retrained model's quantized engine: its second verdict, against the unpruned
    nodes_kept_in_float: list[str] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)
    ranking: dict | None = None
    not_searched: str = ""  # why a failing engine's fallback search was not run (gate_with_fallback's worth_searching)

    @property
    def fp32_dice(self) -> float:
        return float(np.mean([r["fp32_dice"] for r in self.per_patient]))

    @property
    def engine_dice(self) -> float:
        return float(np.mean([r["engine_dice"] for r in self.per_patient]))

    @property
    def drop_points(self) -> float:
        return float(np.mean([r["drop_points"] for r in self.per_patient]))

    @property
    def worst(self) -> dict:
        return max(self.per_patient, key=lambda r: r["drop_points"])

    @property
    def least_agreement(self) -> dict:
        return min(self.per_patient, key=lambda r: r["agreement"])

    @property
    def missed(self) -> list[str]:
        """Val patients the reference found and the engine missed."""
        return [r["patient"] for r in self.per_patient if missed(r)]

    def own_failures(self) -> list[str]:
        c, out = self.criteria, []
        if self.drop_points > c.max_drop + 1e-9:
            out.append(f"mean drop {self.drop_points:.2f} points > {c.max_drop}")
        if self.rule != LABELS_TOTAL and self.worst["drop_points"] > c.max_patient_drop + 1e-9:
            out.append(
                f"patient {self.worst['patient']} dropped {self.worst['drop_points']:.2f} points > {c.max_patient_drop}"
            )
        if self.rule == FIDELITY and self.least_agreement["agreement"] < c.min_agreement - 1e-12:
            out.append(
                f"patient {self.least_agreement['patient']}: masks agree with the FP32 model's at Dice {self.least_agreement['agreement']:.4f} < {c.min_agreement}"
            )
        if self.rule != FIDELITY and self.missed:
            out.append(f"val patient(s) {', '.join(self.missed)} missed, which the unpruned FP32 model found")
        return out

    def failures(self) -> list[str]:
        """What fails, under this result's rule — and, for a retrained model's quantized engine, against the unpruned."""
        labels = [f"against the unpruned model: {f}" for f in self.labels.failures()] if self.labels else []
        return self.own_failures() + labels

    @property
    def rule_name(self) -> str:
        return f"{self.rule}+{self.labels.rule}" if self.labels else self.rule

    @property
    def total_drop_points(self) -> float:
        """Mean per-patient val Dice drop against the model the user started from (the unpruned FP32)."""
        return self.labels.drop_points if self.labels else self.drop_points

    @property
    def passed(self) -> bool:
        return not self.failures()

    def summary(self) -> dict:
        return {
            "nodes_kept_in_float": len(self.nodes_kept_in_float),
            "engine_dice": self.engine_dice,
            "mean_drop_points": self.drop_points,
            "worst_patient": self.worst["patient"],
            "worst_drop_points": self.worst["drop_points"],
            "min_agreement": self.least_agreement["agreement"],
            "rule": self.rule_name,
            "total_drop_points": self.total_drop_points,
            "passed": self.passed,
        }

    def to_json(self) -> dict:
        return {
            "split": "val",
            "patients": len(self.per_patient),
            "metric": "per-patient Dice (engine and PyTorch FP32 on the same val slices, same threshold)",
            "rule": self.rule_name,
            "rule_text": RULES[self.rule_name],
            "criteria": self.criteria.to_json(),
            "fp32_dice": self.fp32_dice,
            "engine_dice": self.engine_dice,
            "drop_points": self.drop_points,
            "worst_patient": self.worst["patient"],
            "worst_patient_drop_points": self.worst["drop_points"],
            "min_agreement": self.least_agreement["agreement"],
            "min_agreement_patient": self.least_agreement["patient"],
            "min_logit_sqnr_db": min(r["logit_sqnr_db"] for r in self.per_patient),
            "patients_missed": {
                "fp32": sum(r["fp32_detected"] is False for r in self.per_patient),
                "engine": sum(r["engine_detected"] is False for r in self.per_patient),
            },
            "reference_predicts_no_tumor": self.reference_predicts_no_tumor,
            "note": self.note,
            "total_drop_points": self.total_drop_points,
            "labels": self.labels.to_json() if self.labels else None,
            "passed": self.passed,
            "failures": self.failures(),
            "per_patient": self.per_patient,
            "nodes_kept_in_float": self.nodes_kept_in_float,
            "ranking": self.ranking,
            "attempts": self.attempts,
        }

    @property
    def note(self) -> str | None:
        if not self.reference_predicts_no_tumor:
            return None
        return REFERENCE_EMPTY_NOTE if self.rule == FIDELITY else UNPRUNED_EMPTY_NOTE


REFERENCE_EMPTY_NOTE = (
    "the FP32 reference predicts no tumor on any val slice: the Dice part of the gate is uninformative "
    "(every engine that also predicts nothing drops 0.00); only the agreement with the reference's masks decides"
)
UNPRUNED_EMPTY_NOTE = (
    "the unpruned FP32 model predicts no tumor on any val slice: judged on labels, no model can drop below it "
    "(train a model that finds tumor before pruning it)"
)


class Reference:
    """The FP32 model's outputs on the gate's val slices, computed once per checkpoint."""

    rule = FIDELITY  # what judge() applies unless told otherwise (RetrainedReference chooses per precision)

    def __init__(self, outputs: Outputs, slices: SliceArrays, criteria: GateCriteria):
        self.outputs, self.slices, self.criteria = outputs, slices, criteria
        self.patients = slices.patient_ids
        self.truth_counts = confusion_counts(outputs.masks, slices.masks)
        self.predicts_no_tumor = not outputs.masks.any()

    def judge(self, engine: Outputs, rule: str = FIDELITY) -> GateResult:
        engine_counts = confusion_counts(engine.masks, self.slices.masks)
        agreement_counts = confusion_counts(engine.masks, self.outputs.masks)
        rows = []
        for pid in self.patients:
            sel = self.slices.patients == pid
            ref_tp, _, ref_fn, _ = self.truth_counts[sel].sum(axis=0)
            eng_tp = engine_counts[sel].sum(axis=0)[0]
            ref_dice = float(dice_from_counts(*self.truth_counts[sel].sum(axis=0)[:3]))
            eng_dice = float(dice_from_counts(*engine_counts[sel].sum(axis=0)[:3]))
            has_tumor = ref_tp + ref_fn > 0
            rows.append(
                {
                    "patient": pid,
                    "fp32_dice": ref_dice,
                    "engine_dice": eng_dice,
                    "drop_points": 100.0 * (ref_dice - eng_dice),
                    "agreement": float(dice_from_counts(*agreement_counts[sel].sum(axis=0)[:3])),
                    "logit_sqnr_db": sqnr_db(self.outputs.logits[sel], engine.logits[sel]),
                    "fp32_detected": bool(ref_tp > 0) if has_tumor else None,  # any overlap with the tumor
                    "engine_detected": bool(eng_tp > 0) if has_tumor else None,
                }
            )
        return GateResult(self.criteria, rows, self.predicts_no_tumor, rule)


class RetrainedReference:
    """The gate of a retrained model's engines (module docstring): its FP32 engine on labels against the unpruned
    model; any other precision for fidelity against its own FP32 model and on labels against the unpruned one."""

    def __init__(self, unpruned: Reference, own: Callable[[], Reference], precision: str):
        self.unpruned, self.precision = unpruned, precision
        self._own = own  # the retrained model's own FP32 outputs, run only for the engines that need them

    @property
    def rule(self) -> str:
        return rule_for(self.precision, retrained=True)

    @property
    def predicts_no_tumor(self) -> bool:
        return (self.unpruned if self.precision == "fp32" else self._own()).predicts_no_tumor

    def judge(self, engine: Outputs) -> GateResult:
        if self.precision == "fp32":
            return self.unpruned.judge(engine, LABELS)
        result = self._own().judge(engine, FIDELITY)
        result.labels = self.unpruned.judge(engine, LABELS_TOTAL)
        return result


def describe(result: GateResult, label: str) -> str:
    verdict = "passed" if result.passed else "FAILED: " + "; ".join(result.failures())
    against = {FIDELITY: "", LABELS: " [labels rule: against the unpruned FP32 model]"}.get(
        result.rule, f" [{result.rule_name}]"
    )
    labels = (
        f"; against the unpruned FP32 model {result.labels.fp32_dice:.4f}, mean drop {result.labels.drop_points:.2f}"
        if result.labels
        else ""
    )
    return (
        f"{label}{against}: {len(result.per_patient)} val patients, FP32 {result.fp32_dice:.4f} -> engine {result.engine_dice:.4f}, "
        f"mean drop {result.drop_points:.2f} points, worst {result.worst['patient']} {result.worst['drop_points']:.2f}, "
        f"least agreement {result.least_agreement['agreement']:.4f}"
        + labels
        + (f", {len(result.nodes_kept_in_float)} node(s) kept in float" if result.nodes_kept_in_float else "")
        + f" — {verdict}"
    )


def gate_with_fallback(
    reference: Reference | RetrainedReference,
    build: Callable[[list[str]], Path],
    run: Callable[[Path], Outputs],
    rank: Callable[[], tuple[list[tuple[str, float | None]], dict]] | None,
    label: str = "",
    max_fallback_fraction: float = 0.5,
    out_of_time: Callable[[], bool] = lambda: False,
    worth_searching: Callable[[Path], str | None] | None = None,
) -> tuple[Path, GateResult]:
    """Build with nothing excluded; while the gate fails and `rank` is given, keep 1, 2, 4, ... worst nodes in float.
    `out_of_time()` is asked before the ranking and before every rebuild: when it says so, SearchStopped ends the search
    (no engine; `optimize --budget-minutes`). `worth_searching(path)` is asked once, when the engine built with nothing
    excluded fails: a reason it returns ends the search before it starts (`result.not_searched`; `optimize`'s speed
    probe) — whether `rank` is given or a caller searches on its own (QAT)."""
    if reference.predicts_no_tumor:
        logger.warning(f"{label}: {UNPRUNED_EMPTY_NOTE if reference.rule == LABELS else REFERENCE_EMPTY_NOTE}")
    path = build([])
    result = reference.judge(run(path))
    result.attempts.append(result.summary())
    logger.info(describe(result, label))
    if not result.passed and worth_searching is not None:
        result.not_searched = worth_searching(path) or ""
    if result.passed or rank is None or result.not_searched:
        return path, result
    _stop_if(out_of_time, label, result.attempts)
    ranked, how = rank()
    ranking = [name for name, _ in ranked][: max(1, int(len(ranked) * max_fallback_fraction))]
    ranking_record = {
        **how,
        "quantized_nodes": len(ranked),
        "top": [{"node": n, "score": s} for n, s in ranked[:32] if s is not None],
    }
    attempts = list(result.attempts)
    k = 1
    while k <= len(ranking):
        _stop_if(out_of_time, label, attempts)
        kept = ranking[:k]
        path = build(kept)
        result = reference.judge(run(path))
        result.nodes_kept_in_float = list(kept)
        attempts.append(result.summary())
        logger.info(describe(result, label))
        if result.passed or k == len(ranking):
            break
        k = min(2 * k, len(ranking))
    result.attempts, result.ranking = attempts, ranking_record
    return path, result


def _stop_if(out_of_time: Callable[[], bool], label: str, attempts: list[dict]) -> None:
    if out_of_time():
        last = attempts[-1]
        raise SearchStopped(
            f"{label}: --budget-minutes ran out during the INT8 fallback search, after {len(attempts)} failing build(s) "
            f"(the last kept {last['nodes_kept_in_float']} node(s) in float); no engine written: rerun with a larger --budget-minutes to continue"
        )


def quantized_nodes(qdq_model) -> list[str]:
    """Compute nodes of a Q/DQ graph that take a dequantized input (what `nodes_to_exclude` can put back in float)."""
    dequantized = {out for node in qdq_model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [
        n.name
        for n in qdq_model.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dequantized.intersection(n.input)
    ]


def float_inputs_for(qdq_model, float_model, node_name: str):
    """A copy of the Q/DQ graph in which `node_name` reads float tensors: its activation inputs skip their Q/DQ pair
    and its weights come from the float model. Everything else stays quantized."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    producers = {out: node for node in model.graph.node for out in node.output}
    float_node = next(n for n in float_model.graph.node if n.name == node_name)
    float_inits = {i.name: i for i in float_model.graph.initializer}
    present = {i.name for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    for position, name in enumerate(node.input):
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        source = producers.get(dq.input[0])
        if source is not None and source.op_type == "QuantizeLinear":
            node.input[position] = source.input[0]  # the activation before quantization
        elif position < len(float_node.input) and float_node.input[position] in float_inits:
            weight = float_node.input[position]
            if (
                weight in producers
            ):  # the quantizer named its DequantizeLinear output after the float tensor (int32 biases)
                weight = f"{weight}.float"
            if weight not in present:
                copy = onnx.TensorProto()
                copy.CopyFrom(float_inits[float_node.input[position]])
                copy.name = weight
                model.graph.initializer.append(copy)
                present.add(weight)
            node.input[position] = weight  # the float weight
    return model


MAX_SCORED_NODES = 64  # output-effect sessions per ranking; a larger graph is screened first (README: INT8 fallback)


def rank_by_output_effect(
    float_path: Path, qdq_path: Path, batch: np.ndarray, threads: int | None = None, max_scored: int = MAX_SCORED_NODES
) -> tuple[list[tuple[str, float | None]], dict]:
    """(node, dB of output SQNR gained when that node alone runs in float), worst node first.

    The output error of the full Q/DQ graph against the float graph is measured on `batch` (tumor slices of every
    val patient); then each quantized node is put back in float on its own (graph surgery, no recalibration) and
    the gain in output SQNR is its score: what that node's quantization costs the final logits.

    That is one session per node: 724 for unet-effb7, a quarter of an hour on two cores. A graph with more than
    `max_scored` quantized nodes is screened first by the error each node adds locally (`local_error_added`, one
    pass), and only the `max_scored` worst of the screen are scored by output effect; the rest follow in screen
    order with no score (None), so the fallback can still reach them.
    """
    import onnx

    float_model, qdq_model = onnx.load(str(float_path)), onnx.load(str(qdq_path))
    opts = _plain_session_options(threads)
    reference = _run_model(float_model, batch, opts)
    base = sqnr_db(reference, _run_model(qdq_model, batch, opts))
    names = quantized_nodes(qdq_model)
    how = {
        "method": "output effect: output SQNR gained when the node alone runs in float",
        "slices": len(batch),
        "output_sqnr_db_all_quantized": base,
    }
    rest: list[str] = []
    if len(names) > max_scored:
        local = local_error_added(float_model, qdq_model, batch, names, opts)
        screened = sorted(names, key=lambda n: local.get(n, -math.inf), reverse=True)
        names, rest = screened[:max_scored], screened[max_scored:]
        how["screen"] = (
            f"{len(screened)} quantized nodes: the {max_scored} adding the most error locally (dB of noise-to-signal ratio gained "
            f"across the node, one pass) were scored by output effect; the other {len(rest)} follow in screen order, unscored"
        )
    scores = []
    with progress_bar() as bar:
        task = bar.add_task("ranking nodes by output effect", total=len(names), info="")
        for name in names:
            variant = float_inputs_for(qdq_model, float_model, name)
            scores.append((name, sqnr_db(reference, _run_model(variant, batch, opts)) - base))
            bar.advance(task)
    ranked: list[tuple[str, float | None]] = sorted(scores, key=lambda kv: kv[1], reverse=True)
    return ranked + [(name, None) for name in rest], how


def _plain_session_options(threads: int | None):
    import onnxruntime as ort

    opts = session_options(RunOptions(threads=threads).cpu_threads())
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the Q/DQ numerics as written
    return opts


def _session(model, opts):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run_model(model, batch: np.ndarray, opts) -> np.ndarray:
    session = _session(model, opts)
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


NSR_FLOOR = 1e-6  # -60 dB: below INT8 rounding (~1e-4), so an exact input (the graph's) does not make a ratio infinite


def local_error_added(float_model, qdq_model, batch: np.ndarray, names: list[str], opts) -> dict[str, float]:
    """{quantized node: dB by which its output's noise-to-signal ratio exceeds its worst input's} in the Q/DQ graph
    against the float graph (noise: the Q/DQ tensor minus the float one; energies summed over the batch; each ratio
    plus NSR_FLOOR).

    Every input and output tensor of these nodes that both graphs hold (the Q/DQ graph keeps the float tensor names
    before each QuantizeLinear) is made a graph output; the slices run one at a time, so memory holds one slice's
    activations. A node's score is the error its own quantization (inputs, weights) adds, not what it inherits.
    (The relative growth: a plain difference of ratios missed unet-effb7's second-worst node by output effect, a
    late convolution whose small input error it triples.)
    """
    import onnx

    float_nodes = {n.name: n for n in float_model.graph.node}
    qdq_tensors = {o for n in qdq_model.graph.node for o in n.output}
    wanted: dict[str, tuple[list[str], list[str]]] = {}
    for name in names:
        node = float_nodes.get(name)
        if node is None:
            continue
        inputs = [t for t in node.input if t in qdq_tensors]  # activations (weights are initializers, not node outputs)
        outputs = [t for t in node.output if t in qdq_tensors]
        if outputs:
            wanted[name] = (inputs, outputs)
    tensors = sorted({t for ins, outs in wanted.values() for t in ins + outs})

    def with_outputs(model):
        augmented = onnx.ModelProto()
        augmented.CopyFrom(model)
        present = {o.name for o in augmented.graph.output}
        augmented.graph.output.extend(
            onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors if t not in present
        )
        return augmented

    float_session, qdq_session = _session(with_outputs(float_model), opts), _session(with_outputs(qdq_model), opts)
    input_name = float_session.get_inputs()[0].name
    signal = dict.fromkeys(tensors, 0.0)
    noise = dict.fromkeys(tensors, 0.0)
    for i in range(len(batch)):
        one = {input_name: batch[i : i + 1]}
        ref, got = float_session.run(tensors, one), qdq_session.run(tensors, one)
        for t, r, q in zip(tensors, ref, got):
            r = r.astype(np.float64)
            signal[t] += float(np.sum(r**2))
            noise[t] += float(np.sum((r - q) ** 2))

    def nsr(t: str) -> float:
        return noise[t] / max(signal[t], 1e-30)

    return {
        name: 10
        * math.log10((max(nsr(t) for t in outs) + NSR_FLOOR) / (max([nsr(t) for t in ins] or [0.0]) + NSR_FLOOR))
        for name, (ins, outs) in wanted.items()
    }


def rank_quantized_nodes(float_model: Path, qdq_model: Path, reader, max_slices: int = 2) -> list[tuple[str, float]]:
    """(quantized node, dB of activation SQNR it loses) from onnxruntime's qdq_loss_debug: the older, local ranking
    (kept for comparison in benchmarks; the gate ranks by output effect)."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    reader.rewind()
    few = []
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
    quantized = set(quantized_nodes(onnx.load(str(qdq_model))))
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

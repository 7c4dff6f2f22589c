"""INT8 with and without fast bias correction, same export, same calibration cache, same runtime.

usage: .venv/bin/python benchmarks/bias_correction.py CKPT [CKPT ...] --data DATA --out OUT [--profile openvino|cpu] [--threads 2]

NNCF, OpenVINO's own quantizer, shifts each quantized layer's bias so that its output mean matches the float
layer's (fast bias correction, on by default); lggdeploy's INT8 profiles do not. `correct_bias` below is that
correction on an ONNX Runtime Q/DQ graph: each convolution with 8-bit weights gets its bias moved by (W - W_q) · E[x]
(E[x]: its input's mean per channel over the calibration slices, from the FP32 graph) — by linearity what NNCF
measures on a sub-graph fed the mean input — skipping convolutions without a bias and shifts above twice the bias,
as NNCF does. It stays here, not in lggdeploy, until it earns its place (results/bias-correction/). Both graphs of a checkpoint come
from one export and ONE calibration cache (identical activation ranges and weights: only the biases differ), run by
the runtime the profile is for (OpenVINO for `openvino`, ONNX Runtime for `cpu`) on the checkpoint's val and test
patients, and are judged against the PyTorch FP32 model as the accuracy gate judges (per-patient Dice, drop, mask
agreement, logit SQNR). Bias correction changes no operator, so no timing. Writes OUT/bias_correction.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
from pathlib import Path

import numpy as np
from int8_weight_range import Int8Experiment  # the same setup and figures as the weight-range benchmark

from lggdeploy.backends import onnxruntime as ort_backend
from lggdeploy.backends.base import RunOptions
from lggdeploy.backends.openvino import OpenVinoRunner, precision_hint
from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_line, machine_info
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.engines.precision import int8

BIAS_SHIFT_LIMIT = 2.0  # NNCF's FAST_BIAS_CORRECTION_THRESHOLD: a shift above twice the bias is not trusted


def conv_input_means(prepared: Path, reader) -> dict:
    """Per convolution of the float graph (by node name): the mean of its input per channel over the calibration
    slices, as the FP32 model computes it."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(prepared))
    graph = model.graph
    inputs = {i.name for i in graph.input}
    wanted = {node.name: node.input[0] for node in graph.node if node.op_type == "Conv"}
    present = {o.name for o in graph.output}
    for tensor in sorted(set(wanted.values()) - inputs - present):
        graph.output.append(onnx.ValueInfoProto(name=tensor))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor by its name
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    reader.rewind()
    while (feed := reader.get_next()) is not None:
        values = dict(zip(names, session.run(names, feed))) | feed
        for tensor in set(wanted.values()):
            x = np.asarray(values[tensor], dtype=np.float64)
            sums[tensor] = sums.get(tensor, 0.0) + x.sum(axis=(0, 2, 3))
            counts[tensor] = counts.get(tensor, 0) + x.shape[0] * x.shape[2] * x.shape[3]
    reader.rewind()
    if not counts:
        raise SystemExit("bias correction: the calibration reader gave no slices")
    return {node: sums[tensor] / counts[tensor] for node, tensor in wanted.items()}


def _dequantized(inits: dict, node):
    """The float values a DequantizeLinear of constant initializers produces."""
    import numpy as np

    q = inits[node.input[0]].astype(np.float64)
    scale = inits[node.input[1]].astype(np.float64)
    zero = inits[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else np.zeros_like(scale)
    if scale.ndim == 1 and scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def correct_bias(qdq: Path, prepared: Path, means: dict, limit: float = BIAS_SHIFT_LIMIT) -> dict:
    """Fast bias correction, in place (atomic): each convolution whose weights are 8-bit in `qdq` gets its bias moved by
    (W - W_q) · E[x], the mean error the rounded weights make on its mean input (`means`, from `conv_input_means`),
    so the quantized layer's output mean is the float layer's. By linearity that is what NNCF's fast bias
    correction measures on a sub-graph fed the mean input. Skipped, as NNCF does: convolutions without a bias, and
    shifts larger than `limit` times the bias. Returns the counts for the manifest."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    float_graph = onnx.load(str(prepared)).graph
    float_inits = {i.name: i for i in float_graph.initializer}
    float_weight = {n.name: n.input[1] for n in float_graph.node if n.op_type == "Conv"}
    model = onnx.load(str(qdq))
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    replaced: dict = {}
    counts = {"corrected": 0, "skipped_no_bias": 0, "skipped_large_shift": 0}
    for node in graph.node:
        w_dq = producer.get(node.input[1]) if node.op_type == "Conv" else None
        if w_dq is None or w_dq.op_type != "DequantizeLinear" or node.name not in means:
            continue  # not a convolution with 8-bit weights (kept in float, or not from this graph)
        if w_dq.input[0] not in inits or float_weight.get(node.name) not in float_inits:
            continue
        if len(node.input) < 3 or not node.input[2]:
            counts["skipped_no_bias"] += 1
            continue
        weights = numpy_helper.to_array(float_inits[float_weight[node.name]]).astype(np.float64)
        error = (_dequantized(inits, w_dq) - weights).sum(axis=(2, 3))  # (C_out, C_in / groups)
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        c_out, c_in = error.shape
        mean = np.asarray(means[node.name], dtype=np.float64).reshape(groups, c_in)
        shift = np.einsum("goi,gi->go", error.reshape(groups, c_out // groups, c_in), mean).reshape(c_out)
        b_dq = producer.get(node.input[2])
        quantized = b_dq is not None and b_dq.op_type == "DequantizeLinear" and b_dq.input[0] in inits
        holder = b_dq.input[0] if quantized else node.input[2]
        if holder not in inits or consumers.get(node.input[2], 0) > 1:
            continue
        bias = _dequantized(inits, b_dq) if quantized else inits[holder].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            magnitude = np.max(np.abs(np.where(shift == 0, 0.0, shift / bias)))
        if not magnitude < limit:
            counts["skipped_large_shift"] += 1
            continue
        corrected = bias - shift
        if quantized:
            scale = inits[b_dq.input[1]].astype(np.float64)
            zero = inits[b_dq.input[2]].astype(np.float64) if len(b_dq.input) > 2 and b_dq.input[2] else 0.0
            info = np.iinfo(inits[holder].dtype)
            corrected = np.clip(np.round(corrected / scale + zero), info.min, info.max)
        replaced[holder] = corrected.astype(inits[holder].dtype)
        counts["corrected"] += 1
    for init in graph.initializer:
        if init.name in replaced:
            init.CopyFrom(numpy_helper.from_array(replaced[init.name], init.name))
    onnx.save(model, str(qdq))
    return counts


def one_checkpoint(path: Path, dataset, args, work: Path) -> dict:
    exp = Int8Experiment.make(path, dataset, work, args.calib_samples)
    prepared, reader, cache = exp.prepared, exp.reader, exp.cache
    means = conv_input_means(prepared, reader)
    rows = []
    for corrected in (False, True):
        recipe = int8.recipe_for(args.profile)
        graph = int8.quantize(prepared, work / f"int8-{corrected}.onnx", recipe, reader, "minmax", cache)
        counts = correct_bias(graph, prepared, means) if corrected else {}
        runner = (
            OpenVinoRunner(graph, precision_hint("int8"), args.threads)
            if args.profile == "openvino"
            else ort_backend.load(graph, options=RunOptions(threads=args.threads, spin=False))
        )
        row = {"bias_correction": corrected, "counts": counts, **exp.judge(runner, str(corrected))}
        runner.close()
        rows.append(row)
    return {
        "checkpoint": str(path),
        "model": exp.ckpt["model"]["name"],
        "patients": {"val": len(exp.split.val), "test": len(exp.split.test)},
        "calibration": {"split": "val", "samples": len(exp.chosen), "method": "minmax"},
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", choices=("openvino", "cpu"), default="openvino")
    parser.add_argument("--calib-samples", type=int, default=32)  # build's default
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    results = []
    for path in args.checkpoints:
        with tempfile.TemporaryDirectory(prefix="bias-correction-") as tmp:
            results.append(one_checkpoint(path, dataset, args, Path(tmp)))
    info = machine_info()
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out / f"bias_correction_{args.profile}.json",
        {"date": when, "machine": info, "profile": args.profile, "results": results},
    )
    runtime = "OpenVINO" if args.profile == "openvino" else "ONNX Runtime"
    lines = [
        f"{runtime} INT8 ({args.profile} profile) without and with fast bias correction; {cpu_line(info['cpu'], args.threads)}; "
        f"{when}. Per checkpoint one calibration cache (32 val slices, minmax) for both; against the PyTorch FP32 model.",
        "",
        "| model | bias correction | split (n) | Dice/patient (FP32) | drop (pts) | worst patient drop | least agreement | mean agreement | least / mean logit SQNR (dB) | gate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for row in result["rows"]:
            c = row["counts"]
            how = (
                f"on ({c['corrected']} corrected, {c['skipped_large_shift']} skipped)"
                if row["bias_correction"]
                else "off"
            )
            for name in ("val", "test"):
                r = row[name]
                lines.append(
                    f"| {result['model']} | {how} | {name} ({r['patients']}) | {r['engine_dice']:.4f} ({r['fp32_dice']:.4f}) | "
                    f"{r['drop_points']:.2f} | {r['worst_patient_drop_points']:.2f} | {r['min_agreement']:.4f} | "
                    f"{r['mean_agreement']:.4f} | {r['min_logit_sqnr_db']:.1f} / {r['mean_logit_sqnr_db']:.1f} | "
                    f"{'passes' if r['passes_gate'] else 'fails'} |"
                )
    write_text_atomic(args.out / f"bias_correction_{args.profile}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

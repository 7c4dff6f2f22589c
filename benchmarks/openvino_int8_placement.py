"""OpenVINO INT8: where the Q/DQ nodes sit and what precision the float remainder runs in, timed side by side.

usage: .venv/bin/python benchmarks/openvino_int8_placement.py ENGINES_DIR --out OUT [--rounds 10] [--batch 8]

ENGINES_DIR: one checkpoint's engine folder holding openvino-bf16.onnx, openvino-int8-cpu.onnx (ONNX Runtime's
placement: Q/DQ on convolution inputs and outputs) and openvino-int8-openvino.onnx (inputs only) — e.g. an
`lggdeploy optimize` run plus `lggdeploy build --backend openvino --precision int8 --int8-profile cpu` into it. Each
INT8 engine is compiled twice, its float remainder in f32 and in bf16, through lggdeploy's own OpenVINO runner (the
threads, stream and hint bench uses); every graph is timed interleaved round by round in a shuffled order (bench's `interleaved_times`), on random
input (latency does not depend on the values); median ms per image. The gate verdicts are the engines' manifests'
(their remainder as built); the other hint is timed only. Also counts the Q/DQ nodes and, with --profile, reads
OpenVINO's per-node counters to say where the time goes. Writes OUT/openvino_int8_placement.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from lggdeploy.backends.openvino import OpenVinoRunner
from lggdeploy.bench.run import interleaved_times
from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_line, machine_info

ENGINES = (
    ("OpenVINO BF16 (FP32 graph)", "openvino-bf16.onnx", ("bf16",)),
    ("OpenVINO INT8, cpu profile (Q/DQ on conv inputs and outputs)", "openvino-int8-cpu.onnx", ("f32", "bf16")),
    ("OpenVINO INT8, openvino profile (Q/DQ on conv inputs)", "openvino-int8-openvino.onnx", ("f32", "bf16")),
)


def time_split(runner: OpenVinoRunner, x: np.ndarray) -> dict[str, float]:
    """Share of OpenVINO's per-node time by kernel kind (one profiled call on a separately compiled model)."""
    import openvino as ov

    model = runner.model.clone()
    model.reshape({runner.input_name: list(x.shape)})
    request = ov.Core().compile_model(model, "CPU", {**runner.config, "PERF_COUNT": True}).create_infer_request()
    request.infer({0: x})
    request.infer({0: x})
    spent: Counter = Counter()
    for node in request.get_profiling_info():
        if node.status.name == "EXECUTED":
            spent[node.node_type] += node.real_time.total_seconds()
    total = sum(spent.values())
    return {kind: round(100 * t / total, 1) for kind, t in spent.most_common(6)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engines", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 256, 256)).astype(np.float32)
    runs, facts = {}, {}
    for name, file, hints in ENGINES:
        path = args.engines / file
        manifest = json.loads((args.engines / f"{file}.json").read_text())
        ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
        facts[name] = {
            "file": file,
            "gate_passed": manifest["gate"]["passed"],
            "nodes_kept_in_float": len(manifest["gate"]["nodes_kept_in_float"]),
            "val_drop_points": round(manifest["gate"]["drop_points"], 2),
            "built_with_hint": manifest.get("inference_precision_hint", "f32"),
            "quantize_linear_nodes": ops.get("QuantizeLinear", 0),
        }
        for hint in hints:
            runs[(name, hint)] = OpenVinoRunner(path, hint, args.threads)
    for r in runs.values():
        r.infer(x), r.infer(x)  # compile and warm up
    seconds = interleaved_times(
        [functools.partial(r.infer, x) for r in runs.values()], args.rounds, np.random.default_rng(0)
    )
    times = {key: [s * 1000 / args.batch for s in t] for key, t in zip(runs, seconds)}
    base = float(np.median(times[(ENGINES[0][0], "bf16")]))
    rows = []
    for (name, hint), t in times.items():
        row = {
            "engine": name,
            "remainder": hint,
            "ms_per_image": round(float(np.median(t)), 2),
            "vs_bf16": round(base / float(np.median(t)), 2),
            **facts[name],
        }
        if args.profile:
            row["time_by_kernel_percent"] = time_split(runs[(name, hint)], x)
        rows.append(row)
    for r in runs.values():
        r.close()
    info = machine_info()
    cpu = info["cpu"]
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out / "openvino_int8_placement.json",
        {
            "date": when,
            "machine": info,
            "engines": str(args.engines),
            "batch": args.batch,
            "rounds": args.rounds,
            "rows": rows,
        },
    )
    lines = [
        f"OpenVINO INT8 placement and remainder precision, `{args.engines}`; {cpu_line(cpu, args.threads)}; "
        f"{when}; batch {args.batch}, median of {args.rounds} interleaved rounds, ms per image.",
        "",
        "| engine | float remainder | Q nodes | nodes kept in float (gate) | gate (remainder as built) | ms/img | × BF16 engine |"
        + (" time by kernel kind |" if args.profile else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if args.profile else ""),
    ]
    for r in rows:
        gate = f"{'passed' if r['gate_passed'] else 'FAILED'}, val drop {r['val_drop_points']} ({r['built_with_hint']})"
        cells = [
            r["engine"],
            r["remainder"],
            str(r["quantize_linear_nodes"]),
            str(r["nodes_kept_in_float"]),
            gate,
            f"{r['ms_per_image']:.2f}",
            f"{r['vs_bf16']:.2f}",
        ]
        if args.profile:
            cells.append(", ".join(f"{k} {v} %" for k, v in r["time_by_kernel_percent"].items()))
        lines.append("| " + " | ".join(cells) + " |")
    write_text_atomic(args.out / "openvino_int8_placement.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

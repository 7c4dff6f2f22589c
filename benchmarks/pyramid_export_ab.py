"""The pyramid-pooling export form (engines/exportable.py) before and after, timed side by side.

usage: .venv/bin/python benchmarks/pyramid_export_ab.py --before ENGINES_DIR --after ENGINES_DIR --out OUT [--rounds 10]

ENGINES_DIR: one checkpoint's engine folder holding model.onnx (FP32) and openvino-int8-cpu.onnx, one built with the
exporter's own graph (export_graph 1) and one with today's (export_graph 2) — e.g. two `lggdeploy optimize` runs of the
same checkpoint. Times ONNX Runtime FP32, OpenVINO FP32 / BF16 / INT8 of both folders through lggdeploy's own
runners (the threads, streams and hints `bench` uses), interleaved round by round in a shuffled order (bench's `interleaved_times`), on random
input (latency does not depend on the values), batch 8 and 1; median ms per image. Also counts the graphs' nodes.
Writes OUT/pyramid_export_ab.json and .md.
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

from lggdeploy.backends import onnxruntime as ort_backend
from lggdeploy.backends.base import RunOptions
from lggdeploy.backends.openvino import PRECISION_HINT, OpenVinoRunner
from lggdeploy.bench.run import interleaved_times
from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_line, machine_info

ENGINES = (
    ("ONNX Runtime FP32", "model.onnx", "ort", "fp32"),
    ("OpenVINO FP32", "model.onnx", "ov", "fp32"),
    ("OpenVINO BF16", "model.onnx", "ov", "bf16"),
    ("OpenVINO INT8", "openvino-int8-cpu.onnx", "ov", "int8"),
)


def runner(path: Path, kind: str, precision: str, threads: int):
    if kind == "ort":
        return ort_backend.load(path, {"precision": "fp32"}, RunOptions(threads=threads, spin=False))
    return OpenVinoRunner(
        path, PRECISION_HINT[precision], threads
    )  # as the engines it compared were built (INT8 remainder in f32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    graphs = {}
    for tag, folder in (("before", args.before), ("after", args.after)):
        record = json.loads((folder / "model.onnx.json").read_text())
        ops = Counter(n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node)
        # export_graph as recorded (exports made before the record had the field read as 1, whatever their form)
        graphs[tag] = {
            "folder": str(folder),
            "export_graph": record.get("export_graph", 1),
            "nodes": sum(ops.values()),
            "ops": dict(ops.most_common()),
        }
    rows = []
    rng = np.random.default_rng(0)
    for batch in (8, 1):
        x = np.random.default_rng(0).standard_normal((batch, 3, 256, 256)).astype(np.float32)
        runs = {
            (name, tag): runner((args.before if tag == "before" else args.after) / file, kind, precision, args.threads)
            for name, file, kind, precision in ENGINES
            for tag in ("before", "after")
        }
        for r in runs.values():
            r.infer(x), r.infer(x)  # compile and warm up
        seconds = interleaved_times([functools.partial(r.infer, x) for r in runs.values()], args.rounds, rng)
        times = {key: [s * 1000 / batch for s in t] for key, t in zip(runs, seconds)}
        for name, *_ in ENGINES:
            before, after = (float(np.median(times[(name, t)])) for t in ("before", "after"))
            rows.append(
                {
                    "engine": name,
                    "batch": batch,
                    "before_ms": round(before, 2),
                    "after_ms": round(after, 2),
                    "speedup": round(before / after, 2),
                }
            )
        for r in runs.values():
            r.close()
    info = machine_info()
    cpu = info["cpu"]
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out / "pyramid_export_ab.json",
        {"date": when, "machine": info, "graphs": graphs, "rounds": args.rounds, "rows": rows},
    )
    lines = [
        f"Pyramid pooling export form, before ({graphs['before']['nodes']} graph nodes) and after ({graphs['after']['nodes']} nodes); "
        f"{cpu_line(cpu, args.threads)}; {when}; median of {args.rounds} interleaved rounds, ms per image.",
        "",
        "| engine | batch | before | after | speed-up |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['engine']} | {r['batch']} | {r['before_ms']:.2f} | {r['after_ms']:.2f} | {r['speedup']:.2f}x |"
        for r in rows
    ]
    write_text_atomic(args.out / "pyramid_export_ab.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Which INT8 sensitivity ranking finds what hurts? The tensorrt profile's Q/DQ graph of one checkpoint, the worst
k nodes kept in float under each ranking, judged by the gate on every val patient.

usage: .venv/bin/python benchmarks/ranking_compare.py CHECKPOINT --data DIR --out FOLDER [--calib-method minmax]
Writes FOLDER/ranking_compare.json and .md. Rankings compared:
- activation SQNR (onnxruntime.quantization.qdq_loss_debug on the first two calibration slices: the old gate's)
- output effect (each node alone put back in float, output SQNR gain on one tumor slice per val patient: the new gate's)
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

from lggdeploy.common.files import temporary_folder, write_json_atomic, write_text_atomic
from lggdeploy.common.machine import machine_info
from lggdeploy.engines.build import BuildOptions, Int8Graph, _Context
from lggdeploy.engines.formats import select_formats
from lggdeploy.engines.precision import calibration
from lggdeploy.engines.precision.gate import rank_by_output_effect, rank_quantized_nodes

KS = (0, 1, 2, 4, 8, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engines", type=Path, default=Path("benchmarks/runs/34p/engines"))
    parser.add_argument("--calib-method", default="minmax")
    args = parser.parse_args()

    opts = BuildOptions(
        out_dir=args.engines, data=args.data, precision="int8", int8_profile="tensorrt", calib_method=args.calib_method
    )
    ctx = _Context(args.checkpoint, opts)
    fmt = [f for f in select_formats("onnxruntime", "int8", "tensorrt")][0]
    results = {
        "checkpoint": str(args.checkpoint),
        "profile": "tensorrt",
        "calib_method": args.calib_method,
        "val_patients": ctx.val.patient_ids,
        "rankings": {},
    }
    with temporary_folder(ctx.folder) as tmp:
        work = Path(tmp)
        source = Int8Graph(ctx, fmt, work, ctx.ptq)
        graph, facts = source.graph, source.facts["calibration"]
        graph([])  # qdq-0.onnx, the graph both rankings read
        prepared = work / "prepared.onnx"
        started = time.perf_counter()
        reader = calibration.make_reader(
            calibration.pick_calibration_slices(ctx.val, opts.calib_samples), ctx.img_size, ctx.normalization
        )
        sqnr = rank_quantized_nodes(prepared, work / "qdq-0.onnx", reader)
        sqnr_seconds = time.perf_counter() - started
        started = time.perf_counter()
        batch, patients = ctx.ranking_batch()
        effect, how = rank_by_output_effect(prepared, work / "qdq-0.onnx", batch)
        effect_seconds = time.perf_counter() - started
        for name, ranked, seconds in (
            ("activation SQNR (old)", sqnr, sqnr_seconds),
            ("output effect (new)", effect, effect_seconds),
        ):
            order = [n for n, _ in ranked]
            rows = []
            for k in KS:
                kept = order[:k]
                path = work / f"{len(kept)}-{name[:3]}.onnx"
                engine = fmt.module.build(graph(kept), fmt, path, ctx.build_target(fmt))
                result = ctx.reference.judge(ctx.run_engine(path, fmt, engine))
                rows.append({"kept_in_float": k, **result.summary()})
                print(name, rows[-1], flush=True)
            results["rankings"][name] = {
                "seconds": round(seconds, 1),
                "quantized_nodes": len(ranked),
                "top": ranked[:10],
                "attempts": rows,
            }
    results["calibration"] = facts
    results["machine"] = machine_info()
    results["date"] = dt.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "ranking_compare.json", results)
    lines = [
        f"# INT8 tensorrt profile: which nodes to keep in float ({results['date']})",
        "",
        f"checkpoint `{args.checkpoint}`, calibration {args.calib_method}, val patients {len(ctx.val.patient_ids)}",
        "",
        "| ranking | nodes kept in float | mean drop (points) | worst patient drop | least agreement | gate |",
        "|---|---|---|---|---|---|",
    ]
    for name, ranking in results["rankings"].items():
        for row in ranking["attempts"]:
            lines.append(
                f"| {name} | {row['kept_in_float']} | {row['mean_drop_points']:.2f} | {row['worst_drop_points']:.2f} ({row['worst_patient']}) | {row['min_agreement']:.4f} | {'pass' if row['passed'] else 'fail'} |"
            )
    lines += ["", "ranking time: " + ", ".join(f"{n} {r['seconds']} s" for n, r in results["rankings"].items())]
    write_text_atomic(args.out / "ranking_compare.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

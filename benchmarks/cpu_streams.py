"""One batch split over CPU streams: does running batch 8 as two half-batches, one per core, beat one request on
both cores? Timed side by side, PyTorch eager FP32 as the reference.

usage: .venv/bin/python benchmarks/cpu_streams.py CKPT ENGINES_DIR --out OUT [--rounds 20] [--batch 8]

CKPT: the checkpoint (PyTorch eager FP32, the reference). ENGINES_DIR: its engine folder with
onnxruntime-fp32.onnx and openvino-int8-openvino.onnx (and openvino-fp32.onnx if present), as `lggdeploy build`
writes them. Each engine runs two ways on the same input:
- one request: batch 8 in one call on `--threads` cores: lggdeploy's own runners, opened as bench opens them;
- streams: the batch split into `--threads` equal parts run at the same time, one core each (OpenVINO: the model
  compiled with NUM_STREAMS = threads, one thread per stream, one request per part; ONNX Runtime: one lggdeploy runner
  per part with one intra-op thread, run from a thread pool — ONNX Runtime releases the GIL while it runs).
  OpenVINO engines run with the float-remainder precision their manifest records.
Both ways must give the same output (max |difference| of the logits is recorded). Every arm is timed interleaved
round by round in a shuffled order (bench's `interleaved_times`), with an A/A pair of the reference; median ms per
image. Writes OUT/cpu_streams.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lggdeploy.backends.base import RunOptions
from lggdeploy.backends.onnxruntime import CPU, OnnxRuntimeRunner
from lggdeploy.bench.run import interleaved_times
from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_line, keep_freed_memory, machine_info
from lggdeploy.engines.formats import open_engine


class OrtStreams:
    """The batch split over `parts` of lggdeploy's ONNX Runtime runners, one intra-op thread each, run concurrently."""

    def __init__(self, path: Path, parts: int):
        self.runners = [OnnxRuntimeRunner(path, [CPU], 1, spin=False) for _ in range(parts)]
        self.pool = ThreadPoolExecutor(parts)

    def infer(self, x: np.ndarray) -> np.ndarray:
        parts = np.array_split(x, len(self.runners))
        return np.concatenate(list(self.pool.map(lambda runner, part: runner.infer(part), self.runners, parts)))


class OvStreams:
    """One compiled model with `parts` streams (one thread each), the batch split into `parts` requests run at once."""

    def __init__(self, path: Path, hint: str, parts: int, batch_shape: tuple):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        model.reshape({model.inputs[0].get_any_name(): [batch_shape[0] // parts, *batch_shape[1:]]})
        config = {
            "INFERENCE_PRECISION_HINT": hint,
            "INFERENCE_NUM_THREADS": parts,
            "NUM_STREAMS": parts,
            "PERFORMANCE_HINT": "THROUGHPUT",
        }
        compiled = core.compile_model(model, "CPU", config)
        self.requests = [compiled.create_infer_request() for _ in range(parts)]

    def infer(self, x: np.ndarray) -> np.ndarray:
        for request, part in zip(self.requests, np.split(np.ascontiguousarray(x, np.float32), len(self.requests))):
            request.start_async({0: part})
        for request in self.requests:
            request.wait()
        return np.concatenate([np.array(r.get_output_tensor(0).data, np.float32, copy=True) for r in self.requests])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("engines", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint
    from lggdeploy.models.torch_runner import TorchRunner

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the CLI does: without it PyTorch page-faults its activations in on every batch
    ckpt = load_checkpoint(args.checkpoint)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, ckpt["img_size"], ckpt["img_size"])).astype(np.float32)
    model = model_from_checkpoint(ckpt).eval()
    torch_runner = TorchRunner(model, "cpu")
    arms: dict[str, object] = {
        "PyTorch eager FP32 (reference)": torch_runner.infer,
        "PyTorch eager FP32 (A/A twin)": torch_runner.infer,
    }
    one_request = RunOptions(threads=args.threads, spin=False)  # lggdeploy's runners, as bench opens them
    ort_path = args.engines / "onnxruntime-fp32.onnx"
    arms["ONNX Runtime FP32, one request"] = open_engine(ort_path, options=one_request).infer
    arms[f"ONNX Runtime FP32, {args.threads} streams"] = OrtStreams(ort_path, args.threads).infer
    for label, file in (("OpenVINO FP32", "openvino-fp32.onnx"), ("OpenVINO INT8", "openvino-int8-openvino.onnx")):
        path = args.engines / file
        if not path.exists():
            print(f"{path} not found: {label} left out")
            continue
        one = open_engine(path, options=one_request)
        arms[f"{label}, one request"] = one.infer
        hint = one.config["INFERENCE_PRECISION_HINT"]  # the float remainder's precision, as built and gated
        arms[f"{label}, {args.threads} streams"] = OvStreams(path, hint, args.threads, x.shape).infer
    outputs = {name: np.asarray(call(x), np.float32) for name, call in arms.items()}  # warm-up, and the outputs
    for call in arms.values():
        call(x)
    seconds = interleaved_times(
        [functools.partial(call, x) for call in arms.values()], args.rounds, np.random.default_rng(0)
    )
    ms = {name: float(np.median(t)) * 1000 / args.batch for name, t in zip(arms, seconds)}
    ref = ms["PyTorch eager FP32 (reference)"]
    ort_one = ms["ONNX Runtime FP32, one request"]
    rows = []
    for name in arms:
        family = name.split(",")[0]
        twin = next((o for o in arms if o.startswith(family + ", one request")), None)
        diff = float(np.max(np.abs(outputs[name] - outputs[twin]))) if twin and twin != name else None
        rows.append(
            {
                "arm": name,
                "ms_per_image": round(ms[name], 2),
                "x_pytorch": round(ref / ms[name], 2),
                "x_ort_fp32": round(ort_one / ms[name], 2),
                "max_abs_logit_diff_vs_one_request": diff,
            }
        )
    info = machine_info()
    cpu = info["cpu"]
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    aa = abs(ms["PyTorch eager FP32 (A/A twin)"] / ref - 1) * 100
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out / "cpu_streams.json",
        {
            "date": when,
            "machine": info,
            "checkpoint": str(args.checkpoint),
            "engines": str(args.engines),
            "batch": args.batch,
            "threads": args.threads,
            "rounds": args.rounds,
            "aa_percent": round(aa, 2),
            "rows": rows,
        },
    )
    lines = [
        f"One batch of {args.batch} over {args.threads} CPU streams against one request on {args.threads} threads; `{args.engines}`; "
        f"{cpu_line(cpu, args.threads)}; {when}; median of {args.rounds} interleaved rounds, ms per image; "
        f"A/A noise {aa:.1f} %.",
        "",
        "| arm | ms/img | × PyTorch eager FP32 | × ONNX Runtime FP32 (one request) | max abs logit diff vs one request |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        diff = "" if r["max_abs_logit_diff_vs_one_request"] is None else f"{r['max_abs_logit_diff_vs_one_request']:.2e}"
        lines.append(
            f"| {r['arm']} | {r['ms_per_image']:.2f} | {r['x_pytorch']:.2f} | {r['x_ort_fp32']:.2f} | {diff} |"
        )
    write_text_atomic(args.out / "cpu_streams.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

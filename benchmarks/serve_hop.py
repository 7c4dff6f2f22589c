"""Concurrency 1: `lggdeploy serve` (the engine inside Triton's Python backend) against the same handler behind
NVIDIA PyTriton (Triton's Python backend hands each request to another process), both against in-process batch 1.

    .venv-serve/bin/python benchmarks/serve_hop.py ENGINE --out OUT [--pairs 200]
    .venv-serve/bin/python benchmarks/serve_hop.py ENGINE --out OUT --no-pytriton \
        --serve delay0=--max-queue-delay-us=0 --serve delay500=--max-queue-delay-us=500      # serve's settings, paired

`lggdeploy serve` ran on PyTriton until this comparison; PyTriton's proxy forwards every request from the Python
backend to the process that bound the model (ZeroMQ and shared memory). Here both servers run at once on the same
engine file with the same handler (`SliceHandler`, masks only), the same queue delay (`serve`'s default), gRPC client; each round calls
the direct server, the PyTriton server and the handler in this process once each in a random order, with a pause
between calls, and the medians of the paired differences against the in-process call are reported (immune to the
drift that moves separate figures by more than the milliseconds judged) with a 95 % bootstrap interval of each median.
`--serve NAME=FLAGS` (repeatable) runs several `serve` processes with different options in the same rounds instead
of the one default. Loopback only; writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from serve_load import client_library, free_ports, load, slice_handler, wait_ready

from lggdeploy.common.machine import cpu_line, machine_info
from lggdeploy.engines.formats import read_manifest
from lggdeploy.serve.repository import QUEUE_DELAY_US
from lggdeploy.serve.server import find_tritonserver, server_environment

PYTRITON_SERVER = """
import sys, numpy as np
from pathlib import Path
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
sys.path.insert(0, {here!r})
from serve_load import slice_handler
handler = slice_handler(Path({engine!r}))

@batch
def infer(slices):
    return handler(slices)

config = TritonConfig(http_port={http}, grpc_port={grpc}, metrics_port={metrics}, log_verbose=0)
with Triton(config=config) as triton:
    triton.bind(model_name="pytriton-slice", infer_func=infer,
                inputs=[Tensor(name="slices", dtype=np.uint8, shape=(256, 256, 3))],
                outputs=[Tensor(name="masks", dtype=np.uint8, shape=(256, 256))],
                config=ModelConfig(max_batch_size=8, batcher=DynamicBatcher(max_queue_delay_microseconds={delay})),
                strict=True)
    triton.serve()
"""


def median_interval(differences: np.ndarray, resamples: int = 10000) -> list[float]:
    """A 95 % percentile-bootstrap interval of the median of paired differences."""
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(differences, (resamples, len(differences))), axis=1)
    return [float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))]


def timed(call, block: int) -> float:
    """Milliseconds of one call (block 1: after an idle pause, as a scanner's paced slices arrive), or the median of a
    closed loop of `block` calls back to back after two unrecorded ones (perf_analyzer's concurrency 1, and `bench`'s
    batch-1 loop on the in-process side)."""
    if block == 1:
        started = time.perf_counter()
        call()
        return (time.perf_counter() - started) * 1000
    laps = []
    for i in range(block + 2):
        started = time.perf_counter()
        call()
        if i >= 2:
            laps.append((time.perf_counter() - started) * 1000)
    return float(np.median(laps))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=1, help=">1: throughput against in-process batch 8")
    parser.add_argument("--requests", type=int, default=64, help="requests per load block (--concurrency > 1)")
    parser.add_argument("--block", type=int, default=1, help="calls per turn, back to back (1: one call after a pause)")
    parser.add_argument("--serve", action="append", metavar="NAME=FLAGS", help="a serve process: its name, its flags")
    parser.add_argument("--pytriton", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    engine = args.engine.resolve()
    model = f"{read_manifest(engine)['model']['name']}-slice"
    variants = dict(v.split("=", 1) for v in args.serve or ["serve="])
    args.out.mkdir(parents=True, exist_ok=True)
    lgg = str(Path(sys.executable).parent / "lggdeploy")
    servers, ready = [], []  # (name, process, log); (name, http port, gRPC port, model)
    ports_left = free_ports(3 * (len(variants) + 1))  # all at once: no port handed out twice
    try:
        for name, flags in variants.items():
            http, grpc, metrics = ports_left.pop(), ports_left.pop(), ports_left.pop()
            ports = [f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
            log = open(args.out / f"{name}.log", "w")
            process = subprocess.Popen(
                [lgg, "serve", str(engine), *ports, *flags.split()], stdout=log, stderr=subprocess.STDOUT
            )
            servers.append((name, process, log))
            ready.append((name, http, grpc, model))
        if args.pytriton:
            http, grpc, metrics = ports_left.pop(), ports_left.pop(), ports_left.pop()
            script = PYTRITON_SERVER.format(
                here=str(Path(__file__).parent),
                engine=str(engine),
                http=http,
                grpc=grpc,
                metrics=metrics,
                delay=QUEUE_DELAY_US,
            )
            log = open(args.out / "pytriton.log", "w")
            process = subprocess.Popen(  # this Python's lib/ first on LD_LIBRARY_PATH, as `serve` sets it for its stub
                [sys.executable, "-c", script],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_environment(find_tritonserver()),
            )
            servers.append(("pytriton", process, log))
            ready.append(("pytriton", http, grpc, "pytriton-slice"))
        for (_, http, _, served), (_, process, _) in zip(ready, servers):
            wait_ready(http, [served], process)
        library = client_library("grpc")
        x = np.random.default_rng(1).integers(0, 255, (1, 256, 256, 3), dtype=np.uint8)
        handler = slice_handler(engine)
        calls = {"local": lambda: handler(x)["masks"]}
        for name, _, port, served in ready:
            client = library.InferenceServerClient(f"127.0.0.1:{port}")
            tensor = library.InferInput("slices", list(x.shape), "UINT8")
            tensor.set_data_from_numpy(x)
            calls[name] = lambda c=client, t=tensor, m=served: c.infer(m, [t]).as_numpy("masks")
        reference = calls["local"]()
        for name, call in calls.items():
            assert np.array_equal(call(), reference), f"{name} answers differently"
            for _ in range(3):
                call()
        if args.concurrency > 1:  # throughput: each server's load block against in-process batch-8 blocks
            x8 = np.repeat(x, 8, axis=0)
            calls = {"local": lambda: handler(x8)}
            for name, _, port, served in ready:
                calls[name] = lambda p=port, m=served: load(
                    f"127.0.0.1:{p}", m, args.concurrency, args.requests, "grpc"
                )
        rng = np.random.default_rng(0)
        figures: dict[str, list[float]] = {name: [] for name in calls}  # ms, or slices/s under load
        for _ in range(args.pairs):
            for name in rng.permutation(list(calls)):
                time.sleep(0.02 if args.concurrency == 1 else 0.2)  # idle threads stop spinning
                if args.concurrency == 1:
                    figures[name].append(timed(calls[name], args.block))
                elif name == "local":
                    figures[name].append(8000 / timed(calls[name], max(1, args.requests // 8)))  # slices/s
                else:
                    level = calls[name]()
                    assert level["errors"] == 0, level
                    figures[name].append(level["slices_per_s"])
    finally:
        for _, process, _ in servers:
            process.send_signal(signal.SIGTERM)
        codes = {name: process.wait(timeout=120) for name, process, _ in servers}
        for _, _, log in servers:
            log.close()
    local = np.array(figures["local"])
    if args.concurrency > 1:
        rows = {
            name: {
                "flags": variants.get(name, "PyTriton binding"),
                "slices_per_s_p50": float(np.median(values)),
                "paired_ratio_to_in_process_b8_p50": float(np.median(np.array(values) / local)),
                "paired_ratio_to_in_process_b8_p50_95ci": median_interval(np.array(values) / local),
            }
            for name, values in figures.items()
            if name != "local"
        }
    else:
        rows = {
            name: {
                "flags": variants.get(name, "PyTriton binding"),
                "p50_ms": float(np.median(values)),
                "paired_minus_in_process_p50_ms": float(np.median(np.array(values) - local)),
                "paired_minus_in_process_p25_p75_ms": [
                    float(np.percentile(np.array(values) - local, q)) for q in (25, 75)
                ],
                "paired_minus_in_process_p50_95ci_ms": median_interval(np.array(values) - local),
            }
            for name, values in figures.items()
            if name != "local"
        }
    info = machine_info()
    results = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**info, "cpu_line": cpu_line(info.get("cpu", {}))},
        "engine": {"file": engine.name, "sha256": read_manifest(engine)["sha256"]},
        "pairs": args.pairs,
        "block": args.block,
        "concurrency": args.concurrency,
        "requests_per_block": args.requests if args.concurrency > 1 else None,
        ("in_process_b1_p50_ms" if args.concurrency == 1 else "in_process_b8_slices_per_s_p50"): float(
            np.median(local)
        ),
        "served": rows,
        "exit_codes": codes,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("machine", "command")}, indent=1))


if __name__ == "__main__":
    main()

"""Concurrency 1: `lggdeploy serve` (the engine inside Triton's Python backend) against the same handler behind
NVIDIA PyTriton (Triton's Python backend hands each request to another process), both against in-process batch 1.

    .venv-serve/bin/python benchmarks/serve_hop.py ENGINE --out OUT [--pairs 200]

`lggdeploy serve` ran on PyTriton until this comparison; PyTriton's proxy forwards every request from the Python
backend to the process that bound the model (ZeroMQ and shared memory). Here both servers run at once on the same
engine file with the same handler (`SliceHandler`, masks only), queue delay 500 µs, gRPC client; each round calls
the direct server, the PyTriton server and the handler in this process once each in a random order, with a pause
between calls, and the medians of the paired differences against the in-process call are reported (immune to the
drift that moves separate figures by more than the milliseconds judged). Loopback only; writes OUT/results.json.
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
from serve_load import client_library, free_ports, slice_handler, wait_ready

from lggdeploy.common.machine import cpu_line, machine_info
from lggdeploy.engines.formats import read_manifest
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
                config=ModelConfig(max_batch_size=8, batcher=DynamicBatcher(max_queue_delay_microseconds=500)),
                strict=True)
    triton.serve()
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args()
    engine = args.engine.resolve()
    model = f"{read_manifest(engine)['model']['name']}-slice"
    ports = free_ports(6)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = [open(args.out / name, "w") for name in ("direct.log", "pytriton.log")]
    lgg = str(Path(sys.executable).parent / "lggdeploy")
    direct = [lgg, "serve", str(engine), *(f"--{k}-port={p}" for k, p in zip(("http", "grpc", "metrics"), ports[:3]))]
    script = PYTRITON_SERVER.format(
        here=str(Path(__file__).parent), engine=str(engine), http=ports[3], grpc=ports[4], metrics=ports[5]
    )
    servers = [
        subprocess.Popen(direct, stdout=logs[0], stderr=subprocess.STDOUT),
        subprocess.Popen(  # this Python's lib/ first on LD_LIBRARY_PATH, as `serve` sets it for its stub
            [sys.executable, "-c", script],
            stdout=logs[1],
            stderr=subprocess.STDOUT,
            env=server_environment(find_tritonserver()),
        ),
    ]
    try:
        wait_ready(ports[0], [model], servers[0])
        wait_ready(ports[3], ["pytriton-slice"], servers[1])
        library = client_library("grpc")
        x = np.random.default_rng(1).integers(0, 255, (1, 256, 256, 3), dtype=np.uint8)
        handler = slice_handler(engine)
        calls = {"local": lambda: handler(x)["masks"]}
        for name, port, served in (("serve", ports[1], model), ("pytriton", ports[4], "pytriton-slice")):
            client = library.InferenceServerClient(f"127.0.0.1:{port}")
            tensor = library.InferInput("slices", list(x.shape), "UINT8")
            tensor.set_data_from_numpy(x)
            calls[name] = lambda c=client, t=tensor, m=served: c.infer(m, [t]).as_numpy("masks")
        reference = calls["local"]()
        for name, call in calls.items():
            assert np.array_equal(call(), reference), f"{name} answers differently"
            for _ in range(3):
                call()
        rng = np.random.default_rng(0)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.pairs):
            for name in rng.permutation(list(calls)):
                time.sleep(0.02)  # idle threads stop spinning
                started = time.perf_counter()
                calls[name]()
                times[name].append((time.perf_counter() - started) * 1000)
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        codes = [server.wait(timeout=120) for server in servers]
        for log in logs:
            log.close()
    local = np.array(times["local"])
    rows = {
        name: {
            "p50_ms": float(np.median(values)),
            "paired_minus_in_process_p50_ms": float(np.median(np.array(values) - local)),
            "paired_minus_in_process_p25_p75_ms": [float(np.percentile(np.array(values) - local, q)) for q in (25, 75)],
        }
        for name, values in times.items()
        if name != "local"
    }
    info = machine_info()
    results = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**info, "cpu_line": cpu_line(info.get("cpu", {}))},
        "engine": {"file": engine.name, "sha256": read_manifest(engine)["sha256"]},
        "pairs": args.pairs,
        "in_process_b1_p50_ms": float(np.median(local)),
        "served": rows,
        "exit_codes": codes,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["served"] | {"in_process_b1_p50_ms": results["in_process_b1_p50_ms"]}, indent=1))


if __name__ == "__main__":
    main()

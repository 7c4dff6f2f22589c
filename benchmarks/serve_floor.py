"""The floor under any served request on this machine: a Triton Python-backend model that thresholds one channel
(no engine) on the tritonserver `serve` runs, called by the same gRPC client with a slice — what transport, Triton's
scheduler and the Python backend's stub cost a request before any network runs.

    .venv-serve/bin/python benchmarks/serve_floor.py --out OUT [--calls 400]

Two patterns: one call after a 20 ms pause (the server's threads asleep, as when a scanner's slices arrive paced)
and calls back to back (a closed loop, perf_analyzer's concurrency 1). Queue delay 0. Loopback only; writes
OUT/results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from serve_load import client_library, wait_ready

from lggdeploy.common.machine import cpu_line, machine_info
from lggdeploy.serve.server import ServeOptions, _start, find_tritonserver, free_ports

CONFIG = """name: "floor"
backend: "python"
max_batch_size: 8
input [ { name: "slices" data_type: TYPE_UINT8 dims: [ 256, 256, 3 ] } ]
output [ { name: "masks" data_type: TYPE_UINT8 dims: [ 256, 256 ] } ]
dynamic_batching { max_queue_delay_microseconds: 0 }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("masks", threshold(
                pb_utils.get_input_tensor_by_name(r, "slices").as_numpy()))])
            for r in requests
        ]


def threshold(x):
    return (x[..., 1] > 100).astype(np.uint8)
"""


def threshold(x: np.ndarray) -> np.ndarray:
    return (x[..., 1] > 100).astype(np.uint8)


def laps(call, calls: int, pause_s: float) -> list[float]:
    out = []
    for _ in range(calls):
        time.sleep(pause_s)
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve-floor"))
    (work / "repo" / "floor" / "1").mkdir(parents=True)
    (work / "repo" / "floor" / "config.pbtxt").write_text(CONFIG)
    (work / "repo" / "floor" / "1" / "model.py").write_text(MODEL)
    http, grpc, metrics = free_ports(3)
    install = find_tritonserver()
    opts = ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics)
    process = _start(install, work / "repo", install.backend_directory(work / "backends"), opts)
    try:
        wait_ready(http, ["floor"], process)
        library = client_library("grpc")
        client = library.InferenceServerClient(f"127.0.0.1:{grpc}")
        x = np.random.default_rng(1).integers(0, 255, (1, 256, 256, 3), dtype=np.uint8)
        tensor = library.InferInput("slices", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        served = lambda: client.infer("floor", [tensor]).as_numpy("masks")  # noqa: E731
        assert np.array_equal(served(), threshold(x))
        laps(served, 5, 0)
        results = {
            "served_after_pause_ms": laps(served, args.calls, 0.02),
            "served_back_to_back_ms": laps(served, args.calls, 0),
            "local_after_pause_ms": laps(lambda: threshold(x), args.calls, 0.02),
        }
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    summary = {
        name: {"p50": float(np.median(v)), "p25_p75": [float(np.percentile(v, q)) for q in (25, 75)]}
        for name, v in results.items()
    }
    info = machine_info()
    record = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**info, "cpu_line": cpu_line(info.get("cpu", {}))},
        "calls": args.calls,
        "summary_ms": summary,
        "exit_code": code,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

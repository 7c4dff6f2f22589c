"""`lggdeploy serve` under load beside the same engine in-process, in one run on one machine (loopback only).

    .venv-serve/bin/python benchmarks/serve_load.py ENGINE --out benchmarks/results/serve-<cpu> [--requests 240]

In-process (the serving handlers with the engine opened as `serve` opens it: preprocessing, engine, threshold):
batch-1 latency (p50) and batch-8 throughput, medians over interleaved rounds. Then `lggdeploy serve ENGINE` is
started and tritonclient (HTTP, one slice per request) drives `<preset>-slice` at concurrency 1, 2, 4, 8, 16 —
each a bounded number of requests, client threads in this process: slices/s and p50/p99 latency. The in-process
rounds are repeated after the load so that drift shows. Triton's own counters (metrics port) are scraped around
each level: mean milliseconds per request in its request / queue / compute phases (compute_infer: the Python
backend model running the handler and engine), so the client's latency splits into client + transport, queue and the model's
execution. `--paired`: concurrency 1 timed pair by pair against the in-process handler. Writes results.json
(command, machine, date).
Client and server share this machine's cores: what the client spends is not the server's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from lggdeploy.common.machine import cpu_line, machine_info
from lggdeploy.engines.formats import open_engine, read_manifest
from lggdeploy.serve.handlers import EngineFacts, SliceHandler
from lggdeploy.serve.server import free_ports


def slice_handler(engine: Path) -> SliceHandler:
    """The slice handler `serve` runs (masks only, its default), on the engine opened as `serve` opens it."""
    manifest = read_manifest(engine)
    return SliceHandler(open_engine(engine, manifest), EngineFacts.from_manifest(manifest), 8, probabilities=False)


def client_library(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as library
    else:
        import tritonclient.http as library
    return library


def in_process(engine: Path, rounds: int = 30) -> dict:
    handler = slice_handler(engine)
    rng = np.random.default_rng(0)
    x1 = rng.integers(0, 255, (1, 256, 256, 3), dtype=np.uint8)
    x8 = rng.integers(0, 255, (8, 256, 256, 3), dtype=np.uint8)
    for _ in range(3):
        handler(x1), handler(x8)
    b1, b8 = [], []
    for _ in range(rounds):  # interleaved
        t = time.perf_counter()
        handler(x1)
        b1.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        handler(x8)
        b8.append((time.perf_counter() - t) * 1000)
    return {
        "b1_p50_ms": float(np.median(b1)),
        "b8_p50_ms": float(np.median(b8)),
        "b8_slices_per_s": 8000 / float(np.median(b8)),
        "rounds": rounds,
    }


def wait_ready(port: int, models: list[str], process) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("serve exited before it was ready")
        try:
            for url in ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{url}", timeout=2):
                    pass
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("serve did not become ready")


PHASES = ("request", "queue", "compute_input", "compute_infer", "compute_output")


def server_counters(metrics_port: int, model: str) -> dict:
    """Triton's cumulative counters for `model` (Prometheus text): successes, executions, microseconds per phase."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    names = {"nv_inference_request_success": "success", "nv_inference_exec_count": "executions"}
    names |= {f"nv_inference_{p}_duration_us": p for p in PHASES}
    counters = dict.fromkeys(names.values(), 0.0)
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in names and f'model="{model}"' in rest:
            counters[names[name]] += float(line.rsplit(" ", 1)[1])
    return counters


def per_request(before: dict, after: dict) -> dict:
    """Server-side mean milliseconds per request in each phase between two scrapes (and slices per execution)."""
    n = after["success"] - before["success"]
    out = {f"{p}_ms": (after[p] - before[p]) / 1000 / n for p in PHASES} if n else {}
    executions = after["executions"] - before["executions"]
    return out | {"requests_per_execution": n / executions if executions else None}


def load(url: str, model: str, concurrency: int, requests: int, protocol: str = "http") -> dict:
    httpclient = client_library(protocol)
    x = np.random.default_rng(1).integers(0, 255, (1, 256, 256, 3), dtype=np.uint8)
    latencies, errors, lock = [], [], threading.Lock()
    per_thread = max(1, requests // concurrency)

    def worker() -> None:
        client = httpclient.InferenceServerClient(url)
        tensor = httpclient.InferInput("slices", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        for _ in range(per_thread):
            t = time.perf_counter()
            try:
                client.infer(model, [tensor]).as_numpy("masks")
                with lock:
                    latencies.append((time.perf_counter() - t) * 1000)
            except Exception as exc:  # counted, never hidden
                with lock:
                    errors.append(str(exc)[:200])

    for _ in range(2):  # warm-up requests per level
        worker_client = httpclient.InferenceServerClient(url)
        warm = httpclient.InferInput("slices", list(x.shape), "UINT8")
        warm.set_data_from_numpy(x)
        worker_client.infer(model, [warm])
    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "slices_per_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies else None,
    }


def paired_c1(engine: Path, url: str, model: str, protocol: str, pairs: int = 200, pause_s: float = 0.02) -> dict:
    """Concurrency 1 measured against in-process batch 1 pair by pair: each round one served request and one call of
    the same handler in this process, in a random order, a pause between them (idle threads stop spinning); the
    median of the paired differences is immune to the drift that makes separate before/after figures differ by more
    than the 2 ms being judged."""
    client_lib = client_library(protocol)
    handler = slice_handler(engine)
    x = np.random.default_rng(1).integers(0, 255, (1, 256, 256, 3), dtype=np.uint8)
    client = client_lib.InferenceServerClient(url)
    tensor = client_lib.InferInput("slices", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)

    def served() -> None:
        client.infer(model, [tensor]).as_numpy("masks")

    def local() -> None:
        handler(x)

    for _ in range(3):
        served(), local()
    rng = np.random.default_rng(0)
    times = {"served": [], "local": []}
    for _ in range(pairs):
        for name in rng.permutation(["served", "local"]):
            time.sleep(pause_s)
            t = time.perf_counter()
            served() if name == "served" else local()
            times[name].append((time.perf_counter() - t) * 1000)
    diffs = np.array(times["served"]) - np.array(times["local"])
    return {
        "pairs": pairs,
        "served_p50_ms": float(np.median(times["served"])),
        "in_process_b1_p50_ms": float(np.median(times["local"])),
        "paired_difference_p50_ms": float(np.median(diffs)),
        "paired_difference_p25_p75_ms": [float(np.percentile(diffs, 25)), float(np.percentile(diffs, 75))],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--max-queue-delay-us", type=int, help="serve's option (default: serve's default)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--paired", action="store_true", help="also concurrency 1 paired with in-process batch 1")
    args = parser.parse_args()
    engine = args.engine.resolve()
    manifest = read_manifest(engine)
    model = f"{manifest['model']['name']}-slice"
    before = in_process(engine)
    http, grpc, metrics = free_ports(3)
    command = [str(Path(sys.executable).parent / "lggdeploy"), "serve", str(engine), "--http-port", str(http)]
    command += ["--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    if args.max_queue_delay_us is not None:
        command += ["--max-queue-delay-us", str(args.max_queue_delay_us)]
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "serve.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(http, [model], server)
        port = grpc if args.protocol == "grpc" else http
        paired = paired_c1(engine, f"127.0.0.1:{port}", model, args.protocol) if args.paired else None
        levels = []
        for c in map(int, args.levels.split(",")):
            counters = server_counters(metrics, model)
            level = load(f"127.0.0.1:{port}", model, c, args.requests, args.protocol)
            # the warm-up requests fall inside the scrape window too: means over all of them
            levels.append(level | {"server_mean_per_request": per_request(counters, server_counters(metrics, model))})
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
        log.close()
    after = in_process(engine)
    b8 = (
        min(before["b8_slices_per_s"], after["b8_slices_per_s"]),
        max(before["b8_slices_per_s"], after["b8_slices_per_s"]),
    )
    b1 = before["b1_p50_ms"], after["b1_p50_ms"]
    for level in levels:
        level["vs_in_process_b8"] = level["slices_per_s"] / float(np.mean(b8))
        level["p50_minus_in_process_b1_ms"] = (level["p50_ms"] or float("nan")) - float(np.mean(b1))
    results = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            **machine_info(),
            "cpu_line": cpu_line(machine_info().get("cpu", {})),
            "python": platform.python_version(),
        },
        "engine": {
            "file": engine.name,
            "sha256": manifest["sha256"],
            "preset": manifest["model"]["name"],
            "img_size": manifest["img_size"],
        },
        "in_process_before": before,
        "in_process_after": after,
        "serve": levels,
        "paired_concurrency_1": paired,
        "serve_exit_code": code,
        "options": vars(args) | {"engine": str(args.engine), "out": str(args.out)},
        "cores": os.cpu_count(),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps({"in_process": [before, after], "serve": levels, "paired_concurrency_1": paired}, indent=1))


if __name__ == "__main__":
    main()

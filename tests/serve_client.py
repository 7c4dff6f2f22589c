"""A Triton client run with the serving venv's Python (tritonclient lives there): `python serve_client.py JOB.json`.

The job names the server, the model, the inputs (an .npz) and what to do; the answers go to the job's `out` (.npz +
.json). Used by tests/test_serve.py and benchmarks/serve_load.py; loopback only, bounded loops."""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np


def infer(client_module, url: str, model: str, arrays: dict[str, np.ndarray], outputs: list[str]):
    client = client_module.InferenceServerClient(url)
    inputs = []
    for name, array in arrays.items():
        dtype = {"uint8": "UINT8", "float32": "FP32", "float64": "FP64"}[str(array.dtype)]
        tensor = client_module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(model, inputs)
    return {name: result.as_numpy(name) for name in outputs}


def main(job_file: str) -> None:
    job = json.loads(open(job_file).read())
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = grpcclient if job.get("protocol") == "grpc" else httpclient
    with np.load(job["inputs"]) as data:
        arrays = {k: data[k] for k in data.files}
    report: dict = {"errors": [], "latencies_ms": []}
    if job["mode"] == "once":
        try:
            answers = infer(module, job["url"], job["model"], arrays, job["outputs"])
            np.savez(
                job["out"] + ".npz", **{k: v.astype(bytes) if v.dtype == object else v for k, v in answers.items()}
            )
        except Exception as exc:
            report["errors"].append(str(exc)[-3000:] or type(exc).__name__)
    else:  # "load": `concurrency` threads, each sending `requests` requests of one slice batch
        lock = threading.Lock()

        def worker() -> None:
            for _ in range(job["requests"]):
                started = time.perf_counter()
                try:
                    infer(module, job["url"], job["model"], arrays, job["outputs"])
                    with lock:
                        report["latencies_ms"].append((time.perf_counter() - started) * 1000)
                except Exception as exc:
                    with lock:
                        report["errors"].append(str(exc)[:200])

        started = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(job["concurrency"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report["seconds"] = time.perf_counter() - started
    with open(job["out"] + ".json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])

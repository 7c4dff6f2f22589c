"""A backend outside lggdeploy, written as docs/adding-a-backend.md says: this module plus one BackendSpec row.

It runs the FP32 graph with ONNX Runtime on one thread, graph optimizations off, and stores
the graph as its "engine" file `.onethread.onnx` — enough to be a real, different backend for build, the gate, bench and the
runtime to drive through the contract alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from lggdeploy.backends.base import BackendSpec, BuildTarget, RunnerBase, RunOptions

SPEC = BackendSpec("onethread", __name__, ".onethread.onnx", "cpu", ("fp32",), (), "pip install lggdeploy")


def is_available() -> tuple[bool, str]:
    import onnxruntime as ort

    return True, f"onnxruntime {ort.__version__}, one thread, no graph optimization"


def supports(precision: str) -> tuple[bool, str]:
    return (precision == "fp32", "" if precision == "fp32" else "this backend runs FP32 only")


def build(onnx_path: str | Path, fmt, target: str | Path, options: BuildTarget) -> dict:
    shutil.copyfile(onnx_path, target)
    return {"graph_optimization": "none", "threads": 1}


class OneThreadRunner(RunnerBase):
    def __init__(self, path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name
        self.closed = False

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.name: np.ascontiguousarray(batch, np.float32)})[0]

    def close(self) -> None:
        self.session, self.closed = None, True


def load(path, manifest: dict | None = None, options: RunOptions = RunOptions()) -> OneThreadRunner:
    return OneThreadRunner(path)

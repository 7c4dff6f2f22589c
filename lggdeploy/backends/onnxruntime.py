"""ONNX Runtime: the CPU backend (and CUDA when onnxruntime-gpu is installed). Builds and loads; no torch.

build: the precision-typed ONNX graph with ONNX Runtime's extended graph optimizations applied once, offline
(fusions, constant folding; Q/DQ pairs of the cpu INT8 profile become QLinear ops). A graph meant for another
runtime's parser (the tensorrt INT8 profile) is kept as it is (`BuildTarget.optimize=False`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from lggdeploy.backends.base import BuildTarget, RunnerBase, RunOptions
from lggdeploy.common.errors import EngineError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def is_available() -> tuple[bool, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime is not installed (pip install onnxruntime)"
    return True, f"onnxruntime {ort.__version__}, providers {', '.join(ort.get_available_providers())}"


def supports(precision: str) -> tuple[bool, str]:
    """Every precision of its row runs on any CPU (FP16 and INT8 may run slower than FP32 where the ISA lacks them)."""
    return True, ""


def session_options(threads: int, spin: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spin:  # idle worker threads sleep instead of spinning into the next engine's measurement
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def build(onnx_path: str | Path, fmt, target: str | Path, options: BuildTarget) -> dict:
    """Write the engine file for `fmt` from a precision-typed ONNX graph; returns facts for the manifest."""
    import onnxruntime as ort

    if options.optimize:
        session_opts = session_options(1)
        session_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        session_opts.optimized_model_filepath = str(target)
        ort.InferenceSession(str(onnx_path), session_opts, providers=[CPU])
    else:
        shutil.copyfile(onnx_path, target)
    return {
        "providers": [CPU],
        "onnxruntime_version": ort.__version__,
        "graph_optimization": "extended, offline" if options.optimize else "none (plain Q/DQ)",
    }


class OnnxRuntimeRunner(RunnerBase):
    def __init__(self, path, providers: list[str], threads: int, spin: bool = True):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), session_options(threads, spin), providers=providers)
        except Exception as exc:
            raise EngineError(
                f"{path}: ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0][:200]})"
            ) from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.providers = self.session.get_providers()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, np.float32)})[
            0
        ].astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None


def load(path, manifest: dict | None = None, options: RunOptions = RunOptions()) -> OnnxRuntimeRunner:
    """Open an ONNX file with the providers its manifest names (CPU when none are named) that exist here."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = (manifest or {}).get("providers") or [CPU]
    if options.device.startswith("cuda") and CUDA in available and CUDA not in wanted:
        wanted = [CUDA, *wanted]
    providers = [p for p in wanted if p in available]
    if not providers:
        raise EngineError(f"{path}: built for ONNX Runtime providers {wanted}, this machine has {available}")
    runner = OnnxRuntimeRunner(path, providers, options.cpu_threads(), options.spin)
    size = (manifest or {}).get("img_size")
    shape = runner.session.get_inputs()[0].shape
    if size is not None and all(isinstance(d, int) for d in shape[2:]) and tuple(shape[2:]) != (size, size):
        runner.close()
        raise EngineError(
            f"{path}: the model takes {shape[2]}x{shape[3]} inputs but its manifest says img_size {size}; the manifest belongs to another engine: rebuild it"
        )
    return runner

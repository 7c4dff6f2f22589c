"""ONNX Runtime: the CPU backend (and CUDA when onnxruntime-gpu is installed). No torch."""

from __future__ import annotations

import os

import numpy as np

from lggdeploy.errors import EngineError


def is_available() -> tuple[bool, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime is not installed (pip install onnxruntime)"
    return True, f"onnxruntime {ort.__version__}, providers {', '.join(ort.get_available_providers())}"


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class OnnxRuntimeRunner:
    def __init__(self, path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in available]
        if not providers:
            raise EngineError(f"{path}: none of the engine's execution providers are available here (have {available})")
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
        except Exception as exc:
            raise EngineError(f"{path}: ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0][:200]})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.providers = self.session.get_providers()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, np.float32)})[0].astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None


def load(path, manifest: dict | None = None, threads: int | None = None) -> OnnxRuntimeRunner:
    providers = (manifest or {}).get("providers")
    return OnnxRuntimeRunner(path, providers=providers, threads=threads)

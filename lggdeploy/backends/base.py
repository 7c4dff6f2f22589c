"""The Runner protocol every backend implements (Polygraphy's runners, MMDeploy's wrappers).

A backend module provides:
    is_available() -> (bool, reason)
    load(path, manifest: dict) -> Runner
and a Runner has infer(batch: float32 NCHW, already preprocessed) -> float32 logits (N, 1, H, W), and close().
bench, the accuracy gate and the runtime use only this, so they cannot drift apart. No torch here.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import numpy as np

from lggdeploy.errors import BackendUnavailable

BACKENDS = {
    "torch": "lggdeploy.backends.torch_backend",
    "onnxruntime": "lggdeploy.backends.onnxruntime_backend",
    "tensorrt": "lggdeploy.backends.tensorrt_backend",
}


@runtime_checkable
class Runner(Protocol):
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def backend_module(name: str):
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def availability(name: str) -> tuple[bool, str]:
    return backend_module(name).is_available()


def load_runner(backend: str, path, manifest: dict) -> Runner:
    module = backend_module(backend)
    ok, reason = module.is_available()
    if not ok:
        raise BackendUnavailable(f"backend {backend} is not usable here: {reason}")
    return module.load(path, manifest)

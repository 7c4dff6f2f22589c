"""The Runner protocol every deployment backend implements (Polygraphy's runners, MMDeploy's wrappers).

A backend module (one file in this package, named in BACKENDS) provides:

    is_available() -> (bool, reason)
    build(onnx_path, fmt, target, options: BuildTarget) -> dict     engine file + facts for the manifest
    load(path, manifest, options: RunOptions) -> Runner

and a Runner has infer(batch: float32 NCHW, already preprocessed) -> float32 logits (N, 1, H, W), and close().
The gate, bench and the runtime open engines only through `lggdeploy.engines.formats.open_engine`, which
asks this protocol, so they cannot drift apart. No torch here.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from lggdeploy.common.errors import BackendUnavailable, LggError

BACKENDS = {
    "onnxruntime": "lggdeploy.backends.onnxruntime",
    "tensorrt": "lggdeploy.backends.tensorrt",
    "openvino": "lggdeploy.backends.openvino",
}


@runtime_checkable
class Runner(Protocol):
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RunOptions:
    """How an engine is run here: the one place threads and device are decided."""

    threads: int | None = None  # CPU intra-op threads; None: every core
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N" (backends that have only one kind ignore it)
    spin: bool = True  # CPU worker threads busy-wait between runs (fast for one engine; bench turns it off)

    def cpu_threads(self) -> int:
        cores = os.cpu_count() or 1
        if self.threads is None:
            return cores
        if not 1 <= self.threads <= cores:
            raise LggError(f"--threads {self.threads}: give a number from 1 to {cores} (the cores of this machine)")
        return self.threads


@dataclass(frozen=True)
class BuildTarget:
    """What a backend needs to turn a precision-typed ONNX graph into an engine file."""

    img_size: int = 256
    batch: tuple[int, int, int] = (1, 8, 32)  # min / opt / max batch of the optimization profile
    workspace_gib: float = 4.0
    timing_cache: Path | None = None
    optimize: bool = True  # apply the backend's own offline graph optimizations


def backend_module(name: str):
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def availability(name: str) -> tuple[bool, str]:
    return backend_module(name).is_available()

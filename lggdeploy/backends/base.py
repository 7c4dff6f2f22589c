"""The Runner protocol every deployment backend implements (Polygraphy's runners, MMDeploy's wrappers).

A backend is one module in this package plus one row of BACKENDS (what it is called, its engine file suffix,
where it runs, the precisions and INT8 profiles it builds). The formats table (engines/formats.py), `build`,
`bench`, `optimize`'s ladder (CPU backends), `doctor` and the CLI's help all read that row. The module provides
(CONTRACT, checked by check_backend_module and tests/test_architecture.py):

    is_available() -> (bool, reason)                                  reason: the version, or why not
    supports(precision) -> (bool, reason)                             on this machine (e.g. BF16 needs AVX512-BF16)
    build(onnx_path, fmt, target, options: BuildTarget) -> dict       engine file + facts for the manifest
    load(path, manifest, options: RunOptions) -> Runner

and a Runner has infer(batch: float32 NCHW, already preprocessed) -> float32 logits (N, 1, H, W) and close(), and is
a context manager (RunnerBase gives it `with`). docs/adding-a-backend.md walks through adding one.
The gate, bench and the runtime open engines only through `lggdeploy.engines.formats.open_engine`, which
asks this protocol, so they cannot drift apart. No torch here.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from lggdeploy.common.errors import BackendUnavailable, LggError

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class BackendSpec:
    """One backend's row: everything the rest of lggdeploy needs to know about it besides its module's functions."""

    name: str
    module: str  # the module that builds and loads its engines
    suffix: str  # engine file suffix
    device: str  # "cpu" or "gpu": optimize's CPU ladder takes the CPU backends
    precisions: tuple[str, ...]  # in the order `build --precision all` builds them
    int8_profiles: tuple[
        str, ...
    ] = ()  # Q/DQ placements it builds (engines/precision/int8.py); the first is its default
    install: str = ""  # the pip line that makes it available


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("onnxruntime", "lggdeploy.backends.onnxruntime", ".onnx", "cpu", ("fp32", "fp16", "int8"), ("cpu", "tensorrt"), "pip install lggdeploy"),
        BackendSpec("tensorrt", "lggdeploy.backends.tensorrt", ".plan", "gpu", ("fp32", "fp16", "int8"), ("tensorrt",), "pip install 'lggdeploy[tensorrt]'"),
        BackendSpec("openvino", "lggdeploy.backends.openvino", ".onnx", "cpu", ("fp32", "bf16", "int8"), ("openvino", "cpu"), "pip install 'lggdeploy[openvino]'"),
    )
}  # fmt: skip
CONTRACT = ("is_available", "supports", "build", "load")


def register_backend(spec: BackendSpec) -> None:
    """Add (or replace) a backend row at run time: a plug-in backend outside this package, or a test's fake."""
    BACKENDS[spec.name] = spec


@runtime_checkable
class Runner(Protocol):
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class RunnerBase:
    """What every Runner shares: `with load(...) as runner:` closes it on the way out."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    return importlib.import_module(BACKENDS[name].module)


def check_backend_module(name: str) -> list[str]:
    """What backend `name`'s module lacks of CONTRACT (empty when complete)."""
    module = backend_module(name)
    return [f for f in CONTRACT if not callable(getattr(module, f, None))]


def cpu_backends() -> list[str]:
    return [name for name, spec in BACKENDS.items() if spec.device == "cpu"]


def describe_backends() -> str:
    """For the CLI's help: 'onnxruntime (cpu), tensorrt (gpu), ...'."""
    return ", ".join(f"{name} ({spec.device})" for name, spec in BACKENDS.items())


def availability(name: str) -> tuple[bool, str]:
    return backend_module(name).is_available()

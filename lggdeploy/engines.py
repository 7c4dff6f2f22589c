"""Engine artifacts: the one table that build iterates and bench discovers, names, and JSON manifests.

engines/<preset>-<checkpoint sha8>/
    model.onnx, model.onnx.json             FP32 export + its record (parity result)
    onnxruntime-fp32.onnx (+ .json)         every engine has a manifest sidecar <engine>.json
    onnxruntime-int8-cpu.onnx, tensorrt-fp16.plan, ...
    calibration/<key>.json                  INT8 calibration caches (ranges), reused by rebuilds
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lggdeploy.errors import EngineError
from lggdeploy.fileio import write_json_atomic


@dataclass(frozen=True)
class EngineFormat:
    backend: str
    precision: str
    int8_profile: str | None
    suffix: str

    @property
    def name(self) -> str:
        return "-".join(p for p in (self.backend, self.precision, self.int8_profile) if p)

    def filename(self) -> str:
        return self.name + self.suffix


# Adding a backend or precision is adding a row here (and a builder), not editing five ifs.
FORMATS: tuple[EngineFormat, ...] = (
    EngineFormat("onnxruntime", "fp32", None, ".onnx"),
    EngineFormat("onnxruntime", "fp16", None, ".onnx"),
    EngineFormat("onnxruntime", "int8", "cpu", ".onnx"),
    EngineFormat("onnxruntime", "int8", "tensorrt", ".onnx"),
    EngineFormat("tensorrt", "fp32", None, ".plan"),
    EngineFormat("tensorrt", "fp16", None, ".plan"),
    EngineFormat("tensorrt", "int8", "tensorrt", ".plan"),
)
PRECISIONS = ("fp32", "fp16", "int8")


def select_formats(backend: str, precision: str, int8_profile: str | None = None) -> list[EngineFormat]:
    """The rows a `build --backend B --precision P [--int8-profile X]` asks for."""
    if precision not in PRECISIONS + ("all",):
        raise EngineError(f"unknown --precision {precision!r}: choose fp32, fp16, int8 or all")
    rows = [f for f in FORMATS if f.backend == backend and (precision == "all" or f.precision == precision)]
    if not rows:
        raise EngineError(f"unknown --backend {backend!r}: choose onnxruntime or tensorrt")
    if int8_profile is not None:
        rows = [f for f in rows if f.precision != "int8" or f.int8_profile == int8_profile]
    elif backend == "onnxruntime":  # default INT8 profile for the CPU backend: the cpu one
        rows = [f for f in rows if f.precision != "int8" or f.int8_profile == "cpu"]
    if not rows:
        raise EngineError(f"--int8-profile {int8_profile} does not exist for backend {backend}")
    return rows


def manifest_path(engine: str | os.PathLike) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def write_manifest(engine: str | os.PathLike, manifest: dict) -> Path:
    return write_json_atomic(manifest_path(engine), {"format": "lggdeploy-engine", "version": 1, **manifest})


def read_manifest(engine: str | os.PathLike) -> dict:
    engine = Path(engine)
    if not engine.is_file():
        raise EngineError(f"engine {engine} does not exist: build it with `lggdeploy build`")
    path = manifest_path(engine)
    if not path.is_file():
        raise EngineError(f"{engine} has no manifest ({path.name}): engines are only usable with the manifest `lggdeploy build` writes beside them")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineError(f"{path}: manifest is not valid JSON ({exc}); rebuild the engine") from None
    if manifest.get("format") != "lggdeploy-engine":
        raise EngineError(f"{path}: not an lggdeploy engine manifest; rebuild the engine")
    return manifest


def discover(root: str | os.PathLike) -> list[Path]:
    """Every engine under `root` that has a manifest, in a stable order."""
    root = Path(root)
    suffixes = {f.suffix for f in FORMATS}
    return sorted(p for p in root.rglob("*") if p.suffix in suffixes and p.name != "model.onnx" and manifest_path(p).is_file())

"""Engine artifacts: the one table that build iterates, bench discovers and the runtime opens; names; manifests.

engines/<preset>-<checkpoint sha8>/
    model.onnx, model.onnx.json             FP32 export + its record (parity result)
    onnxruntime-fp32.onnx (+ .json)         every engine has a manifest sidecar <engine>.json
    onnxruntime-int8-cpu.onnx, tensorrt-fp16.plan, ...
    calibration/<key>.json                  INT8 calibration caches (ranges), reused by rebuilds

Each row of FORMATS (derived from backends/base.py's BACKENDS) names the backend module (lggdeploy/backends/<backend>.py) that builds and loads it;
`open_engine` is the one place an engine is opened (threads and device decided by RunOptions), for the
accuracy gate, bench and the runtime alike. Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lggdeploy.backends.base import BACKENDS, Runner, RunOptions, backend_module
from lggdeploy.common.errors import BackendUnavailable, EngineError
from lggdeploy.common.files import sha256_file
from lggdeploy.engines.manifest import MANIFEST_FORMAT, EngineManifest, read_manifest_file, write_manifest_file  # noqa: F401


@dataclass(frozen=True)
class EngineFormat:
    backend: str  # a module in lggdeploy/backends/ that builds and loads this row
    precision: str
    int8_profile: str | None
    suffix: str

    @property
    def name(self) -> str:
        return "-".join(p for p in (self.backend, self.precision, self.int8_profile) if p)

    def filename(self) -> str:
        return self.name + self.suffix

    @property
    def module(self):
        """The backend module (imported on first use: importing lggdeploy imports no backend library)."""
        return backend_module(self.backend)

    def available(self) -> tuple[bool, str]:
        return self.module.is_available()

    def require_available(self) -> str:
        """The backend's version; BackendUnavailable (one line: why, and what to install) when it is not here."""
        ok, reason = self.usable(precision_too=False)
        if not ok:
            raise BackendUnavailable(reason)
        return reason

    def usable(self, precision_too: bool = True) -> tuple[bool, str]:
        """(True, the backend's version) when it is available here and (`precision_too`) this machine runs the row's
        precision (the backend's `supports`); else (False, the one line saying why): build, optimize, the device
        build and open_engine all ask here."""
        ok, reason = self.available()
        if not ok:
            return False, f"backend {self.backend} is not usable here: {reason}"
        if not precision_too:
            return True, reason
        supported, why = self.module.supports(self.precision)
        return (True, reason) if supported else (False, f"{self.name}: {why}")

    @property
    def plain_qdq(self) -> bool:
        """The tensorrt INT8 profile stays pure Q/DQ (what TensorRT's parser and other runtimes read), whatever runs it:
        no backend graph optimization is applied to it."""
        return self.precision == "int8" and self.int8_profile == "tensorrt"


PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def all_formats() -> tuple[EngineFormat, ...]:
    """Every engine format: each backend's precisions, INT8 once per profile it builds (backends/base.py's rows)."""
    return tuple(
        EngineFormat(spec.name, precision, profile if precision == "int8" else None, spec.suffix)
        for spec in BACKENDS.values()
        for precision in spec.precisions
        for profile in (spec.int8_profiles if precision == "int8" else (None,))
    )


def default_int8_profile(backend: str) -> str | None:
    spec = BACKENDS.get(backend)
    return spec.int8_profiles[0] if spec and spec.int8_profiles else None


# Derived from the backend rows: adding a backend is a module in backends/ and its row, not an edit here.
FORMATS: tuple[EngineFormat, ...] = all_formats()


def select_formats(backend: str, precision: str, int8_profile: str | None = None) -> list[EngineFormat]:
    """The rows a `build --backend B --precision P [--int8-profile X]` asks for."""
    if precision not in PRECISIONS + ("all",):
        raise EngineError(f"unknown --precision {precision!r}: choose {', '.join(PRECISIONS)} or all")
    formats = all_formats()
    backends = sorted({f.backend for f in formats})
    if backend not in backends:
        raise EngineError(f"unknown --backend {backend!r}: choose {', '.join(backends)}")
    rows = [f for f in formats if f.backend == backend and (precision == "all" or f.precision == precision)]
    profile = int8_profile or default_int8_profile(backend)
    rows = [f for f in rows if f.precision != "int8" or f.int8_profile == profile]
    if not rows:
        if precision != "int8" or not any(f.backend == backend and f.precision == "int8" for f in formats):
            have = sorted({f.precision for f in formats if f.backend == backend}, key=PRECISIONS.index)
            raise EngineError(f"backend {backend} has no {precision} engines: choose {', '.join(have)}")
        raise EngineError(f"--int8-profile {int8_profile} does not exist for backend {backend}")
    return rows


def format_of(manifest: dict, path: str | os.PathLike = "engine") -> EngineFormat:
    for fmt in all_formats():
        if (fmt.backend, fmt.precision, fmt.int8_profile) == (
            manifest.get("backend"),
            manifest.get("precision"),
            manifest.get("int8_profile"),
        ):
            return fmt
    raise EngineError(
        f"{path}: its manifest names backend {manifest.get('backend')!r}, precision {manifest.get('precision')!r}, "
        f"INT8 profile {manifest.get('int8_profile')!r}, which no engine format of this lggdeploy has; rebuild it"
    )


def manifest_path(engine: str | os.PathLike) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def write_manifest(engine: str | os.PathLike, manifest: Mapping) -> Path:
    return write_manifest_file(manifest_path(engine), manifest)


def install_engine(candidate: Path, target: Path, manifest: dict, companions: list[tuple[Path, Path]] = ()) -> Path:
    """Put a built engine in place with its manifest so that no kill leaves an engine beside a manifest that is not its
    own: the old manifest goes first (an engine without one is refused at load), then the companions (e.g. the portable
    Q/DQ twin) and the engine are renamed into place (candidates live in the engines folder: atomic renames), then the
    new manifest is written."""
    manifest_path(target).unlink(missing_ok=True)
    for source, destination in companions:
        os.replace(source, destination)
    os.replace(candidate, target)
    return write_manifest(target, manifest)


def read_manifest(engine: str | os.PathLike) -> EngineManifest:
    engine = Path(engine)
    if not engine.is_file():
        raise EngineError(f"engine {engine} does not exist: build it with `lggdeploy build`")
    path = manifest_path(engine)
    if not path.is_file():
        raise EngineError(
            f"{engine} has no manifest ({path.name}): engines are only usable with the manifest `lggdeploy build` writes beside them"
        )
    return read_manifest_file(path)


def discover(root: str | os.PathLike) -> list[Path]:
    """Every engine under `root` that has a manifest, in a stable order."""
    root = Path(root)
    suffixes = {f.suffix for f in all_formats()}
    return sorted(
        p for p in root.rglob("*") if p.suffix in suffixes and p.name != "model.onnx" and manifest_path(p).is_file()
    )


def verify_engine(path: str | os.PathLike, manifest: dict) -> None:
    """The file is the engine its manifest describes (same sha256): a renamed or replaced file is refused."""
    recorded = manifest.get("sha256")
    if not recorded:
        raise EngineError(
            f"{manifest_path(path)} records no sha256 for {Path(path).name}: rebuild the engine with `lggdeploy build`"
        )
    actual = sha256_file(path)
    if actual != recorded:
        raise EngineError(
            f"{path} (sha256 {actual[:12]}…) is not the engine its manifest {manifest_path(path).name} describes "
            f"(sha256 {recorded[:12]}…): the file was replaced or renamed; rebuild it with `lggdeploy build`"
        )


def open_engine(
    path: str | os.PathLike, manifest: dict | None = None, options: RunOptions = RunOptions(), verify: bool = True
) -> Runner:
    """The Runner of an engine file: its manifest's format row picks the backend; refused with the reason when
    that backend is not usable here, or when the file is not the one the manifest describes (`verify`)."""
    manifest = manifest if manifest is not None else read_manifest(path)
    if verify:
        verify_engine(path, manifest)
    fmt = format_of(manifest, path)
    fmt.require_available()
    return fmt.module.load(path, manifest, options)

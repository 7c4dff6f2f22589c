"""The engine manifest: the typed, versioned record beside every engine (`<engine>.json`), read and written here only.

What the rest of lggdeploy needs from a manifest is a field of EngineManifest (backend, precision, preprocessing,
threshold, post-processing, the file's sha256, where it came from); what is particular to a backend or a precision
(the FP16 conversion, INT8 calibration, QAT, the portable Q/DQ twin, TensorRT's GPU, optimize's choice, a device
build's verification) is kept in `details`, under the same top-level keys on disk. Manifests of earlier versions load
into the same record; one from a newer lggdeploy, or with a field of the wrong type or out of range, is refused in
one line that names the file. Torch-free.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lggdeploy.common.errors import EngineError
from lggdeploy.common.files import write_json_atomic

MANIFEST_FORMAT = "lggdeploy-engine"
MANIFEST_VERSION = 2  # 2: read and checked through EngineManifest (the keys on disk are those of version 1)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class EngineManifest(Mapping):
    """One engine's record. Fields are typed and checked; `manifest["key"]` and `.get` read the JSON form (fields and
    details alike), so code written against the plain dict of version 1 reads it unchanged."""

    backend: str
    precision: str
    img_size: int
    normalization: dict
    threshold: float
    int8_profile: str | None = None
    sha256: str | None = None  # of the engine file (open_engine refuses a file that does not match)
    engine: str | None = None  # its file name
    backend_version: str | None = None
    model: dict | None = None  # the preset's record
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    onnx_sha256: str | None = None
    opset: int | None = None
    input: Any = None
    output: Any = None
    postprocess: dict | None = None
    split: dict | None = None
    data_root: str | None = None
    pruned: bool = False
    pruning: list = field(default_factory=list)
    gate: dict | None = None
    forced: bool = False
    build_seconds: float | None = None
    created: str | None = None
    details: dict = field(default_factory=dict)  # backend- and precision-specific records (top-level keys on disk)

    REQUIRED = ("backend", "precision", "img_size", "normalization", "threshold")

    # --- reading ---------------------------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Mapping, origin: str | os.PathLike = "manifest") -> EngineManifest:
        """The record of a manifest's JSON (any version up to this one); EngineError naming `origin` when it cannot be."""
        if not isinstance(data, Mapping):
            raise EngineError(f"{origin}: not an lggdeploy engine manifest; rebuild the engine")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise EngineError(
                f"{origin}: manifest version {version!r} was written by a newer lggdeploy (this one reads up to "
                f"{MANIFEST_VERSION}); upgrade lggdeploy or rebuild the engine"
            )
        missing = [key for key in cls.REQUIRED if key not in data]
        if missing:
            raise EngineError(
                f"{origin}: manifest lacks {', '.join(map(repr, missing))}; rebuild the engine with `lggdeploy build`"
            )
        names = {f.name for f in fields(cls)} - {"details"}
        known = {k: v for k, v in data.items() if k in names}
        details = {k: v for k, v in data.items() if k not in names and k not in ("format", "version")}
        manifest = cls(**known, details=details)
        manifest.check(origin)
        return manifest

    def check(self, origin: str | os.PathLike = "manifest") -> None:
        """Types and ranges of the fields everything else relies on."""

        def bad(what: str) -> EngineError:
            return EngineError(f"{origin}: the manifest's {what}; rebuild the engine with `lggdeploy build`")

        if not isinstance(self.backend, str) or not self.backend:
            raise bad(f"backend {self.backend!r} is not a backend name")
        if self.precision not in PRECISIONS:
            raise bad(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if isinstance(self.img_size, bool) or not isinstance(self.img_size, int) or not 32 <= self.img_size <= 4096:
            raise bad(f"img_size {self.img_size!r} is not a size in pixels (32 to 4096)")
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, int | float)
            or not 0 < self.threshold < 1
        ):
            raise bad(f"threshold {self.threshold!r} is not a probability strictly between 0 and 1")
        if not isinstance(self.normalization, dict):
            raise bad(f"normalization {self.normalization!r} is not a record")
        for name in ("postprocess", "gate", "model", "split"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise bad(f"{name} {value!r} is not a record")
        if self.sha256 is not None and not (isinstance(self.sha256, str) and len(self.sha256) == 64):
            raise bad(f"sha256 {self.sha256!r} is not a sha256")

    # --- writing ---------------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        """The JSON form: format and version, the fields that are set, then the details (version 1's layout)."""
        data: dict = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "details" and (value is not None or f.name in self.REQUIRED):
                data[f.name] = value
        return {**data, **self.details}

    def with_details(self, **details) -> EngineManifest:
        return replace(self, details={**self.details, **details})

    # --- Mapping: the JSON form, read as a dict ------------------------------------------------------------------

    @functools.cached_property
    def _json(self) -> dict:  # the record is frozen: its JSON form is built once
        return self.to_json()

    def __getitem__(self, key: str):
        return self._json[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._json)

    def __len__(self) -> int:
        return len(self._json)


def read_manifest_file(path: Path) -> EngineManifest:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{path}: manifest is not valid JSON ({exc}); rebuild the engine") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise EngineError(f"{path}: not an lggdeploy engine manifest; rebuild the engine")
    return EngineManifest.from_json(data, path)


def write_manifest_file(path: Path, manifest: Mapping) -> Path:
    """A manifest (a record, or the plain dict a build assembles: checked on the way) written atomically."""
    record = manifest if isinstance(manifest, EngineManifest) else EngineManifest.from_json(manifest, path)
    return write_json_atomic(path, record.to_json())

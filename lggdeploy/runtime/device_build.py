"""`lggdeploy build BUNDLE --backend tensorrt`: build an engine on the device from a bundle, then prove it there.

A TensorRT plan is specific to its GPU and TensorRT version, so an edge scanner builds its own from the graph the
bundle carries — the FP32 ONNX, the typed FP16 graph of a packed FP16 engine, or the plain Q/DQ INT8 graph — and
there is no checkpoint and no val data on the device for the build-time gate. The device's gate is the bundle's
verification set: the new engine is run on it and judged by the same agreement criterion as `verify`; only an
engine that passes is written (`--force` keeps a failing one, marked). Torch-free: part of the runtime install.

The new engine's manifest is the packed source engine's (model, checkpoint sha256, normalization, threshold, the
build machine's gate) with this device's backend facts, its own sha256, and `built_on_device` (bundle, source
graph and its sha256, the verification result).
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from lggdeploy.backends.base import BuildTarget
from lggdeploy.common.errors import GateFailed, LggError
from lggdeploy.common.files import sha256_file, temporary_folder
from lggdeploy.engines.formats import (
    EngineFormat,
    default_int8_profile,
    install_engine,
    read_manifest,
    select_formats,
    write_manifest,
)
from lggdeploy.postprocess import PostProcess
from lggdeploy.runtime.bundle import BundleError, VerifyReport, check_engine, inside, opened_bundle, safe_name
from lggdeploy.runtime.segmenter import Segmenter

# What the build machine's manifest says about its own build, not about the model: replaced on the device.
BUILD_FACTS = (
    "engine",
    "backend",
    "backend_version",
    "precision",
    "int8_profile",
    "sha256",
    "build_seconds",
    "created",
    "portable_qdq",
    "tensorrt_version",
    "gpu",
    "compute_capability",
    "batch_profile",
    "workspace_gib",
    "timing_cache",
    "forced",
    "fp16",
)


@dataclass
class DeviceBuild:
    engine: Path
    source: str
    report: VerifyReport
    manifest: dict


def source_graph(root: Path, description: dict, fmt: EngineFormat, origin: Path) -> tuple[Path, dict]:
    """The graph in the bundle that `fmt` is built from, and the manifest of the packed engine it belongs to."""
    entries = description["engines"]

    def at(relative: str) -> Path:  # every path bundle.json names stays inside the bundle
        return inside(root, relative, origin, "path")

    if fmt.precision in ("fp32", "bf16"):
        return at("onnx/model.onnx"), read_manifest(at(entries[0]["file"]))
    for entry in entries:
        if entry["precision"] != fmt.precision or (
            fmt.precision == "int8" and entry.get("int8_profile") != fmt.int8_profile
        ):
            continue
        if entry.get("portable_qdq"):
            return at(entry["portable_qdq"]), read_manifest(at(entry["file"]))
        if (
            entry["backend"] == "onnxruntime"
        ):  # an ONNX Runtime engine is itself a typed ONNX graph (FP16, or plain Q/DQ)
            return at(entry["file"]), read_manifest(at(entry["file"]))
    have = ", ".join(f"{e['precision']}{'-' + e['int8_profile'] if e.get('int8_profile') else ''}" for e in entries)
    want = f"--precision {fmt.precision}" + (f" --int8-profile {fmt.int8_profile}" if fmt.int8_profile else "")
    raise BundleError(
        f"{origin} holds no {fmt.name.split('-', 1)[1]} graph to build from (it packs: {have}); on the build machine run "
        f"`lggdeploy build CKPT {want}` and pack that engine too"
    )


BUNDLE_SUFFIXES = (".tar.gz", ".tgz")


def bundle_among(paths: list[Path]) -> Path | None:
    """The bundle `build` was given (it builds on this device from it), or None for checkpoints; a bundle must come
    alone."""
    bundles = [p for p in paths if Path(p).name.endswith(BUNDLE_SUFFIXES)]
    if not bundles:
        return None
    if len(paths) > 1:
        raise LggError(
            "give one bundle on its own (`lggdeploy build scanner-bundle.tar.gz --backend tensorrt`), "
            "not with checkpoints or other bundles"
        )
    return Path(bundles[0])


def build_from_bundle(
    bundle: str | os.PathLike,
    backend: str = "tensorrt",
    precision: str = "fp32",
    int8_profile: str | None = None,
    out_dir: str | os.PathLike = "engines",
    batch: tuple[int, int, int] = (1, 8, 32),
    workspace_gib: float = 4.0,
    threads: int | None = None,
    force: bool = False,
    trusted_key: str | os.PathLike | None = None,
) -> list[DeviceBuild]:
    """Build every format `backend`/`precision` asks for from the bundle's graphs, verify each on the bundle's set."""
    bundle = Path(bundle)
    if precision == "all":
        raise LggError(
            "--precision all is not offered for a bundle: name the precision this device should run (fp32, fp16 or int8)"
        )
    formats = select_formats(backend, precision, int8_profile or default_int8_profile(backend))
    for fmt in formats:
        fmt.require_available()
    with opened_bundle(bundle, trusted_key) as opened:
        root, description = opened.root, opened.description
        # a name from the bundle becomes a folder name: made safe, so nothing is written outside --out
        folder = (
            Path(out_dir)
            / f"{safe_name(description['model']['name'])}-{safe_name(description['checkpoint_sha256'][:8])}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        target = BuildTarget(
            img_size=description["img_size"],
            batch=tuple(batch),
            workspace_gib=workspace_gib,
            timing_cache=folder / "tensorrt.timing-cache",
        )
        return [
            _build_one(bundle, root, description, fmt, folder, target, threads, force)
            for fmt in formats
        ]  # fmt: skip


def _build_one(bundle: Path, root: Path, description: dict, fmt, folder: Path, target: BuildTarget, threads, force):
    """One engine from the bundle's graph, verified on the bundle's set before it is installed with its manifest."""

    source, base = source_graph(root, description, fmt, bundle)
    started = time.perf_counter()
    with temporary_folder(folder) as tmp:
        candidate = Path(tmp) / fmt.filename()
        facts = fmt.module.build(source, fmt, candidate, replace(target, optimize=not fmt.plain_qdq))
        manifest = {k: v for k, v in base.items() if k not in BUILD_FACTS and k not in ("format", "version")}
        manifest.update(
            engine=fmt.filename(),
            backend=fmt.backend,
            backend_version=fmt.available()[1],
            precision=fmt.precision,
            int8_profile=fmt.int8_profile,
            **facts,
            sha256=sha256_file(candidate),
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        write_manifest(candidate, manifest)
        with Segmenter.load(candidate, threads=threads, postprocess=PostProcess()) as segmenter:  # network masks only
            report = check_engine(segmenter, root, description, bundle)
        if not report.passed and not force:
            raise GateFailed(
                f"{fmt.name} built on this device from {source.relative_to(root)} disagrees with the validated model "
                f"on the bundle's verification set ({'; '.join(report.failures)}); no engine written (--force keeps "
                "it, marked)"
            )
        verification = {
            "passed": report.passed,
            "min_agreement": report.min_agreement,
            "overall_agreement": report.overall_agreement,
            "least_slice_agreement": min(report.per_slice_agreement),
            "slices": len(report.per_slice_agreement),
        }
        manifest.update(
            build_seconds=round(time.perf_counter() - started, 2),
            forced=not report.passed,
            built_on_device={
                "bundle": bundle.name,
                "source": source.relative_to(root).as_posix(),
                "source_sha256": sha256_file(source),
                "verification": verification,
            },
        )
        install_engine(candidate, folder / fmt.filename(), manifest)
    return DeviceBuild(folder / fmt.filename(), source.relative_to(root).as_posix(), report, manifest)

"""`lggdeploy build`: checkpoint -> ONNX -> FP32 / FP16 / INT8 engines, each behind the accuracy gate.

One engine = one row of engines.FORMATS. The FP32 reference is the PyTorch model; the gate scores every
engine on the validation split of the checkpoint's own split. An engine that fails its gate is not
written unless `force`, and then its manifest says so.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lggdeploy.backends import availability
from lggdeploy.engines import EngineFormat, select_formats, write_manifest
from lggdeploy.errors import BackendUnavailable, GateFailed, LggError
from lggdeploy.fileio import sha256_file
from lggdeploy.progress import console


@dataclass
class BuildOptions:
    out_dir: Path = Path("engines")
    data: Path | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    int8_profile: str | None = None
    calib_samples: int = 32
    calib_method: str = "minmax"
    max_drop: float = 0.5  # Dice points
    force: bool = False
    batch: tuple[int, int, int] = (1, 8, 32)
    workspace_gib: float = 4.0
    threads: int | None = None


class _Context:
    """What every engine of one checkpoint shares: the export, val slices, FP32 reference Dice."""

    def __init__(self, checkpoint: Path, opts: BuildOptions):
        from lggdeploy.checkpoint import load_checkpoint, normalization_of, split_of
        from lggdeploy.data.arrays import load_slices
        from lggdeploy.data.kaggle import load_dataset
        from lggdeploy.export import engine_tag, export_checkpoint

        self.checkpoint = checkpoint
        self.opts = opts
        self.ckpt = load_checkpoint(checkpoint)
        self.split = split_of(self.ckpt)
        if not self.split.val:
            raise LggError(f"{checkpoint}: its split has no validation patients; calibration and the accuracy gate need them (retrain with a split that has val patients)")
        self.img_size = self.ckpt["img_size"]
        self.normalization = normalization_of(self.ckpt)
        self.threshold = self.ckpt["threshold"]
        self.sha = sha256_file(checkpoint)
        self.folder = Path(opts.out_dir) / engine_tag(self.ckpt, self.sha)
        data = Path(opts.data) if opts.data else Path(self.ckpt.get("data_root") or "")
        if not data.is_dir():
            raise LggError(f"the checkpoint's data folder {data} is not here: pass --data DIR (the kaggle_3m folder with its val patients)")
        dataset = load_dataset(data)
        self.split.check_against(dataset, origin=f"{checkpoint} (embedded split)")
        self.val = load_slices(dataset, self.split.val)
        self.onnx = self.folder / "model.onnx"
        record = self.folder / "model.onnx.json"
        if not (self.onnx.is_file() and record.is_file() and json.loads(record.read_text()).get("checkpoint_sha256") == self.sha):
            export_checkpoint(checkpoint, opts.out_dir, data)
        self.export_record = json.loads(record.read_text())
        self._fp32_dice: float | None = None

    def score(self, runner, label: str) -> float:
        from lggdeploy.scoring import score_runner

        summary = score_runner(runner, self.val, self.img_size, self.normalization, threshold=self.threshold, description=f"gate {label}")
        return summary["aggregates"]["mean_patient_dice"]

    @property
    def fp32_dice(self) -> float:
        if self._fp32_dice is None:
            from lggdeploy.backends.torch_backend import TorchRunner
            from lggdeploy.checkpoint import model_from_checkpoint

            self._fp32_dice = self.score(TorchRunner(model_from_checkpoint(self.ckpt)), "pytorch fp32 reference")
        return self._fp32_dice

    def score_onnx(self, path: Path, label: str) -> float:
        from lggdeploy.backends.onnxruntime_backend import OnnxRuntimeRunner

        runner = OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"], threads=self.opts.threads)
        try:
            return self.score(runner, label)
        finally:
            runner.close()


def optimize_offline(source: Path, target: Path) -> Path:
    """ONNX Runtime's graph optimizations applied once, at build time (extended level: fusions, constant folding)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return target


def _int8_builder(ctx: _Context, fmt: EngineFormat, work: Path, optimize: bool):
    """(build(kept_nodes) -> path, rank(path) -> ranking, calibration facts) for one INT8 profile."""
    from lggdeploy.precision import calibration, int8

    recipe = int8.recipe_for(fmt.int8_profile)
    prepared = int8.preprocess_for_quantization(ctx.onnx, work / "prepared.onnx")
    chosen = calibration.pick_calibration_slices(ctx.val, ctx.opts.calib_samples)
    ids = calibration.slice_ids(chosen)
    key = calibration.cache_key(ctx.export_record["onnx_sha256"], ids, ctx.opts.calib_method, recipe.symmetric_activations)
    cache = ctx.folder / "calibration" / f"{key}.json"
    reader = calibration.make_reader(chosen, ctx.img_size, ctx.normalization)
    cache_was_there = cache.is_file()

    def build(kept: list[str]) -> Path:
        qdq = int8.quantize(prepared, work / f"qdq-{len(kept)}.onnx", recipe, reader, ctx.opts.calib_method, cache, kept)
        return optimize_offline(qdq, work / f"opt-{len(kept)}.onnx") if optimize else qdq

    def rank(path: Path) -> list[tuple[str, float]]:
        from lggdeploy.precision.gate import rank_quantized_nodes

        # Always the plain Q/DQ graph of the first build: the offline-optimized one (cpu profile) has its
        # Q/DQ pairs fused into QLinear ops, which qdq_loss_debug cannot match to the float graph.
        return rank_quantized_nodes(prepared, work / "qdq-0.onnx", reader)

    facts = {
        "recipe": recipe.to_json(),
        "split": "val",
        "method": ctx.opts.calib_method,
        "samples": len(chosen),
        "tumor_samples": int(chosen.tumor_slices().sum()),
        "slice_list_sha256": calibration.slice_list_hash(ids),
        "cache": str(cache.relative_to(ctx.folder)),
        "cache_reused": cache_was_there,
    }
    return build, rank, facts


def build_one(ctx: _Context, fmt: EngineFormat) -> dict:
    """Build, gate and (if it passes, or --force) write one engine with its manifest."""
    from lggdeploy.precision.fp16 import FP32_OPS, convert_fp16
    from lggdeploy.precision.gate import gate_with_fallback

    opts = ctx.opts
    ok, reason = availability(fmt.backend)
    if not ok:
        raise BackendUnavailable(f"backend {fmt.backend} is not usable here: {reason}")
    target = ctx.folder / fmt.filename()
    label = f"{ctx.ckpt['model']['name']} {fmt.name}"
    started = time.perf_counter()
    extra: dict = {}
    with tempfile.TemporaryDirectory(dir=ctx.folder, prefix=".build-") as tmp:
        work = Path(tmp)
        rank = None
        if fmt.precision in ("fp32", "fp16"):
            typed = ctx.onnx if fmt.precision == "fp32" else convert_fp16(ctx.onnx, work / "fp16.onnx")
            if fmt.precision == "fp16":
                extra["fp16"] = {"converter": "onnxconverter-common float16, keep_io_types", "kept_in_fp32_ops": FP32_OPS}

            def build_graph(kept: list[str]) -> Path:  # nothing to keep in float: one graph per precision
                return optimize_offline(typed, work / f"{fmt.precision}-opt.onnx") if fmt.backend == "onnxruntime" else typed

        else:
            # The cpu profile is optimized offline for ONNX Runtime; the tensorrt profile stays pure Q/DQ for TensorRT's parser.
            build_graph, rank, extra["calibration"] = _int8_builder(ctx, fmt, work, optimize=fmt.int8_profile == "cpu")

        if fmt.backend == "onnxruntime":
            score = lambda path: ctx.score_onnx(path, fmt.name)  # noqa: E731
            build = build_graph
        else:
            from lggdeploy.backends import tensorrt_backend

            def build(kept: list[str]) -> Path:
                plan = work / f"engine-{len(kept)}.plan"
                extra["tensorrt"] = tensorrt_backend.build_engine(
                    build_graph(kept), plan, opts.batch, ctx.img_size, opts.workspace_gib, ctx.folder / "tensorrt.timing-cache"
                )
                return plan

            def score(path: Path) -> float:
                runner = tensorrt_backend.load(path, extra["tensorrt"])
                try:
                    return ctx.score(runner, fmt.name)
                finally:
                    runner.close()

        path, gate = gate_with_fallback(ctx.fp32_dice, opts.max_drop, build, score, rank if fmt.precision == "int8" else None, label)
        if not gate.passed and not opts.force:
            raise GateFailed(
                f"{label}: mean per-patient Dice on val dropped {gate.drop_points:.2f} points (FP32 {gate.fp32_dice:.4f} -> {gate.engine_dice:.4f}), "
                f"over the {opts.max_drop}-point budget even with {len(gate.nodes_kept_in_float)} node(s) kept in float; "
                "no engine written (raise --max-drop, try --calib-method, or --force to keep it marked as failed)"
            )
        seconds = time.perf_counter() - started
        manifest = _manifest(ctx, fmt, path, gate, seconds, extra)
        os.replace(path, target)  # every candidate lives in `work`, inside the engines folder: an atomic rename
        manifest["sha256"] = sha256_file(target)
        write_manifest(target, manifest)
    console.print(f"[green]built[/] {target} ({seconds:.1f} s, gate {'passed' if gate.passed else 'FAILED (forced)'})")
    return {**manifest, "engine": str(target)}


def _manifest(ctx: _Context, fmt: EngineFormat, path: Path, gate, seconds: float, extra: dict) -> dict:
    backend_version = availability(fmt.backend)[1]
    manifest = {
        "engine": fmt.filename(),
        "backend": fmt.backend,
        "backend_version": backend_version,
        "precision": fmt.precision,
        "int8_profile": fmt.int8_profile,
        "model": ctx.ckpt["model"],
        "checkpoint": str(ctx.checkpoint),
        "checkpoint_sha256": ctx.sha,
        "onnx_sha256": ctx.export_record["onnx_sha256"],
        "opset": ctx.export_record["opset"],
        "input": ctx.export_record["input"],
        "output": ctx.export_record["output"],
        "img_size": ctx.img_size,
        "normalization": ctx.ckpt["normalization"],
        "threshold": ctx.threshold,
        "split": ctx.ckpt["split"],
        "pruned": bool(ctx.ckpt.get("pruning")),
        "pruning": ctx.ckpt.get("pruning", []),
        "gate": gate.to_json(),
        "forced": not gate.passed,
        "build_seconds": round(seconds, 2),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    if fmt.backend == "onnxruntime":
        manifest["providers"] = ["CPUExecutionProvider"]
        import onnxruntime

        manifest["onnxruntime_version"] = onnxruntime.__version__
    if fmt.backend == "tensorrt":
        manifest.update(extra.get("tensorrt", {}))
    return manifest


@dataclass
class BuildReport:
    engines: list[dict]
    failures: list[str]  # gate failures: one message each; the other engines were still built


def build_engines(checkpoints: list[Path], opts: BuildOptions) -> BuildReport:
    """Every requested format for every checkpoint. Unavailable backends fail before any work is done;
    an engine that fails its gate is reported and the rest of the matrix is still built."""
    formats = select_formats(opts.backend, opts.precision, opts.int8_profile)
    ok, reason = availability(opts.backend)
    if not ok:
        raise BackendUnavailable(f"backend {opts.backend} is not usable here: {reason}")
    report = BuildReport([], [])
    for checkpoint in checkpoints:
        ctx = _Context(Path(checkpoint), opts)
        for fmt in formats:
            try:
                report.engines.append(build_one(ctx, fmt))
            except GateFailed as exc:
                console.print(f"[red]gate failed:[/] {exc}")
                report.failures.append(str(exc))
    return report

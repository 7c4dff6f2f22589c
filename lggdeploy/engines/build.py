"""`lggdeploy build`: checkpoint -> ONNX -> FP32 / FP16 / INT8 engines, each behind the accuracy gate.

One engine = one row of formats.FORMATS. Precision lives in the graph (a typed FP16 graph, Q/DQ nodes for
INT8), made here for every backend alike; the row's backend module turns that graph into its engine file
(`build`) and opens it (`load`, through formats.open_engine). The FP32 reference is the PyTorch model; the
gate scores every engine on the validation split of the checkpoint's own split. An engine that fails its
gate is not written unless `force`, and then its manifest says so.
"""

from __future__ import annotations

import collections
import datetime as _dt
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lggdeploy.backends.base import BuildTarget, RunOptions
from lggdeploy.common.errors import BackendUnavailable, CannotWin, GateFailed, LggError, SearchStopped
from lggdeploy.common.files import atomic_path, ensure_folder, remove_stale_temporaries, sha256_file, temporary_folder
from lggdeploy.common.progress import progress_bar
from lggdeploy.data.arrays import SliceArrays, load_slices, pick_slices
from lggdeploy.data.kaggle import load_dataset, resolve_data_root
from lggdeploy.data.transforms import preprocess, resize_images, resize_masks
from lggdeploy.engines.export import EXPORT_GRAPH, engine_tag, export_checkpoint, export_onnx
from lggdeploy.engines.formats import EngineFormat, install_engine, open_engine, select_formats
from lggdeploy.engines.options import BuildOptions  # noqa: F401 (the documented import path)
from lggdeploy.engines.precision import calibration, int8, qat
from lggdeploy.engines.precision.calibration import pick_calibration_slices, slice_ids, slice_list_hash
from lggdeploy.engines.precision.fp16 import FP32_OPS, convert_fp16
from lggdeploy.engines.precision.gate import (
    Outputs,
    Reference,
    RetrainedReference,
    gate_with_fallback,
    rank_by_output_effect,
    run_on_slices,
)
from lggdeploy.engines.precision.int8 import METHODS
from lggdeploy.postprocess import PostProcess

logger = logging.getLogger(__name__)

# The PyTorch FP32 reference's outputs on the val slices, by (model sha256, val slices, size, normalization,
# threshold): `optimize` builds each rung with its own build_engines call, and an EfficientNet-B7's reference takes a
# minute on two cores — computed once per process, the two most recent kept (the unpruned and a pruned model).
_REFERENCE_OUTPUTS: collections.OrderedDict = collections.OrderedDict()
REFERENCE_OUTPUTS_KEPT = 2


class _Context:
    """What every engine of one checkpoint shares: the export, val slices, FP32 reference Dice."""

    def __init__(self, checkpoint: Path, opts: BuildOptions):
        from lggdeploy.models.checkpoint import load_checkpoint, normalization_of, split_of

        self.checkpoint = checkpoint
        self.opts = opts
        self.run_options = RunOptions(threads=opts.threads)
        self.ckpt = load_checkpoint(checkpoint)
        self.split = split_of(self.ckpt)
        if not self.split.val:
            raise LggError(
                f"{checkpoint}: its split has no validation patients; calibration and the accuracy gate need them (retrain with a split that has val patients)"
            )
        self.img_size = self.ckpt["img_size"]
        self.normalization = normalization_of(self.ckpt)
        self.threshold = self.ckpt["threshold"]
        if opts.reference is not None:
            _ = (
                self.reference_ckpt
            )  # a reference that cannot judge this checkpoint: its one line before any export is made
        self.sha = sha256_file(checkpoint)
        self.folder = Path(opts.out_dir) / engine_tag(self.ckpt, self.sha)
        remove_stale_temporaries(self.folder)  # .build-* folders and .tmp files of a build that was killed
        data = resolve_data_root(
            opts.data, self.ckpt.get("data_root"), "INT8 calibration and the accuracy gate (its val patients)"
        )
        dataset = load_dataset(data)
        self.split.check_against(dataset, origin=f"{checkpoint} (embedded split)")
        self.dataset = dataset
        self.val = load_slices(dataset, self.split.val)
        self.onnx = self.folder / "model.onnx"
        record = self.folder / "model.onnx.json"
        if not (self.onnx.is_file() and record.is_file() and _current_export(json.loads(record.read_text()), self.sha)):
            export_checkpoint(checkpoint, opts.out_dir, data)
        self.export_record = json.loads(record.read_text())
        self.criteria = opts.criteria
        self._reference: Reference | None = None
        self._own_reference: Reference | None = None
        self._qat: _QatModel | None = None
        self.ptq = _FloatSource(self.onnx, self.export_record["onnx_sha256"], "")

    def calibration_slices(self):

        return pick_calibration_slices(self.val, self.opts.calib_samples)

    def qat_model(self) -> _QatModel:
        """The checkpoint fine-tuned with fake quantization, exported to float ONNX: once per checkpoint and recipe
        (both INT8 profiles start from it), kept under qat/ so that a second build reuses it."""
        if self._qat is None:
            self._qat = _quantization_aware(self)
        return self._qat

    def run(self, runner, label: str) -> Outputs:
        return run_on_slices(runner, self.val, self.img_size, self.normalization, self.threshold, label)

    @property
    def reference(self) -> Reference:
        """The PyTorch FP32 model (this checkpoint's, or --reference's) on the val slices, once per checkpoint."""
        if self._reference is None:
            sha = self.sha if self.opts.reference is None else sha256_file(self.opts.reference)
            self._reference = self.torch_reference(self.reference_ckpt, sha, "pytorch fp32 reference")
        return self._reference

    def own_reference(self) -> Reference:
        """This checkpoint's own PyTorch FP32 model on the val slices (a retrained model's quantized engines keep it)."""
        if not self.retrained:
            return self.reference
        if self._own_reference is None:
            self._own_reference = self.torch_reference(self.ckpt, self.sha, "pytorch fp32 (the retrained model itself)")
        return self._own_reference

    def torch_reference(self, ckpt: dict, sha: str, label: str) -> Reference:
        from lggdeploy.models.checkpoint import model_from_checkpoint
        from lggdeploy.models.torch_runner import TorchRunner

        key = (sha, self.val_sha256, self.img_size, repr(self.normalization), self.threshold)
        outputs = _REFERENCE_OUTPUTS.get(key)
        if outputs is None:
            outputs = self.run(TorchRunner(model_from_checkpoint(ckpt)), label)
            _REFERENCE_OUTPUTS[key] = outputs
            while len(_REFERENCE_OUTPUTS) > REFERENCE_OUTPUTS_KEPT:
                _REFERENCE_OUTPUTS.popitem(last=False)
        return Reference(outputs, self.val, self.criteria)

    @functools.cached_property
    def val_sha256(self) -> str:
        """The val slices' pixels, hashed: a reference run is reused only on the very same inputs."""
        digest = hashlib.sha256()
        for array in (self.val.images, self.val.patients.astype(str)):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    @functools.cached_property
    def retrained(self) -> bool:
        """--reference names another model (the unpruned one a pruned, fine-tuned checkpoint replaces): this checkpoint
        is a new function, judged by the labels rule (gate.RetrainedReference)."""
        return self.opts.reference is not None and sha256_file(self.opts.reference) != self.sha

    def judge_for(self, fmt: EngineFormat) -> Reference | RetrainedReference:
        """Who judges an engine of this format: its own FP32 model, or for a retrained checkpoint the rule of its precision."""
        if not self.retrained:
            return self.reference
        return RetrainedReference(self.reference, self.own_reference, fmt.precision)

    @property
    def reference_path(self) -> Path:  # the checkpoint whose FP32 model the gate compares with (--reference)
        return self.opts.reference or self.checkpoint

    def gate_record(self, gate) -> dict:
        """The gate's record as the manifest keeps it (and GateFailed carries it when no engine is written): `reference`
        is the model its top-level figures compare with; `labels_reference` the unpruned model of its second verdict."""
        if gate.labels is None:
            return {**gate.to_json(), "reference": str(self.reference_path)}
        return {**gate.to_json(), "reference": str(self.checkpoint), "labels_reference": str(self.reference_path)}

    @functools.cached_property
    def reference_ckpt(self) -> dict:  # read once, checked before any export
        if self.opts.reference is None:
            return self.ckpt
        from lggdeploy.models.checkpoint import load_checkpoint

        other = load_checkpoint(self.opts.reference)
        for key in ("img_size", "normalization", "split"):
            if other[key] != self.ckpt[key]:
                raise LggError(
                    f"the reference {self.opts.reference} differs from {self.checkpoint} in its {key}: a gate needs the same inputs and val patients"
                )
        return other

    def open_candidate(self, path: Path, fmt: EngineFormat, facts: dict):
        """A candidate engine opened exactly as bench and the runtime will (formats.open_engine): no manifest, no sha256 yet."""
        candidate = {
            "backend": fmt.backend,
            "precision": fmt.precision,
            "int8_profile": fmt.int8_profile,
            "img_size": self.img_size,
            **facts,
        }
        return open_engine(path, candidate, self.run_options, verify=False)

    def val_batch(self, count: int):
        """`count` val slices spread over the patients, preprocessed as the engines take them (the speed probe's input)."""

        return preprocess(
            pick_slices(self.val, min(count, len(self.val.images))).images, self.img_size, self.normalization
        )

    def run_engine(self, path: Path, fmt: EngineFormat, facts: dict) -> Outputs:
        """Open a candidate engine as bench and the runtime will and run it on val."""
        runner = self.open_candidate(path, fmt, facts)
        try:
            return self.run(runner, fmt.name)
        finally:
            runner.close()

    def ranking_batch(self):
        """One tumor slice per val patient (at least 4 slices), preprocessed: what the sensitivity ranking runs on."""

        tumor = self.val.tumor_slices()
        pool = (
            SliceArrays(
                self.val.images[tumor], self.val.masks[tumor], self.val.patients[tumor], self.val.numbers[tumor]
            )
            if tumor.any()
            else self.val
        )
        chosen = pick_slices(pool, max(4, len(pool.patient_ids)))
        return preprocess(chosen.images, self.img_size, self.normalization), sorted(set(chosen.patients.tolist()))

    def build_target(self, fmt: EngineFormat) -> BuildTarget:
        return BuildTarget(
            self.img_size,
            self.opts.batch,
            self.opts.workspace_gib,
            self.folder / "tensorrt.timing-cache",
            optimize=not fmt.plain_qdq,
        )


@dataclass
class _FloatSource:
    """The float ONNX an INT8 graph is quantized from: the export (post-training) or the QAT model's."""

    onnx: Path
    sha256: str  # of the ONNX file: keys its calibration cache, whose tensor names are the graph's
    tag: str  # "" or "qat-": names its work files and its calibration cache
    ranges: dict | None = None  # QAT: {module: amax}, mapped onto the ONNX convolutions' inputs
    model: object = None  # QAT: the fine-tuned float network (its weights identify each convolution)


def _current_export(record: dict, checkpoint_sha256: str) -> bool:
    """An export on disk is reused only when it is of this checkpoint and of today's graph form."""

    return record.get("checkpoint_sha256") == checkpoint_sha256 and record.get("export_graph", 1) == EXPORT_GRAPH


def _taught_by_itself(record: dict, ctx: _Context) -> bool:
    """A stored QAT model is reused only if it was distilled from this checkpoint itself (models fine-tuned before the
    teacher was recorded by its sha256, with the unpruned model as teacher of a pruned one, are fine-tuned again)."""
    if "teacher_sha256" in record:
        return record["teacher_sha256"] == ctx.sha
    return Path(record.get("teacher", "")).resolve() == Path(ctx.checkpoint).resolve()


@dataclass
class _QatModel:
    source: _FloatSource
    record: dict


def _quantization_aware(ctx: _Context) -> _QatModel:
    """The QAT model of this checkpoint and recipe: reused from qat/ when a build made it, else fine-tuned and stored;
    then its float ONNX (exported from the stored model — after fine-tuning, for a model fine-tuned before today's
    export form, or after a kill between the checkpoint and its ONNX; never a retraining)."""
    from lggdeploy.models.checkpoint import load_checkpoint, make_payload, model_from_checkpoint, save_checkpoint

    recipe = qat.QatRecipe(epochs=ctx.opts.qat_epochs, lr=ctx.opts.qat_lr)
    chosen = ctx.calibration_slices()
    key = recipe.key(ctx.sha, slice_ids(chosen))
    folder = ctx.folder / "qat"
    stored, onnx_path = folder / f"{key}.pt", folder / f"{key}-graph{EXPORT_GRAPH}.onnx"
    if stored.is_file() and _taught_by_itself(load_checkpoint(stored)["qat"], ctx):
        ckpt = load_checkpoint(stored)
        model = model_from_checkpoint(ckpt)
        record = {**ckpt["qat"], "reused": True}
        logger.info(f"QAT: reusing {stored} ({record['epochs']} epoch(s), lr {record['lr']})")
    else:
        model, record = _finetune_qat(ctx, recipe, chosen, key)
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(stored, make_payload(model, base=ctx.ckpt, qat=record, qat_of=ctx.sha))
    if not onnx_path.is_file():
        with atomic_path(onnx_path) as tmp:
            export_onnx(model, tmp, ctx.img_size)
    source = _FloatSource(onnx_path, sha256_file(onnx_path), "qat-", record["conv_input_amax"], model)
    facts = {k: v for k, v in record.items() if k != "conv_input_amax"}
    return _QatModel(source, facts | {"checkpoint": str(stored), "checkpoint_sha256": sha256_file(stored)})


def _finetune_qat(ctx: _Context, recipe, chosen, key: str):
    """Fake-quantize the checkpoint (ranges from the calibration slices), fine-tune it on the train split distilled
    from the reference model, strip the quantizers: (float model, record with the convolution inputs' ranges)."""
    import torch

    from lggdeploy.models.checkpoint import model_from_checkpoint

    recipe.validate()
    started = time.perf_counter()
    train = load_slices(ctx.dataset, ctx.split.train)
    if len(train) < recipe.batch_size:
        raise LggError(
            f"{ctx.checkpoint}: its train split holds {len(train)} slices, too few for quantization-aware fine-tuning"
        )
    x = preprocess(chosen.images, ctx.img_size, ctx.normalization)
    batches = [torch.from_numpy(x[i : i + 8]) for i in range(0, len(x), 8)]
    quantized = qat.quantize_for_training(model_from_checkpoint(ctx.ckpt), batches)
    images, masks = resize_images(train.images, ctx.img_size), resize_masks(train.masks, ctx.img_size)
    logger.info(
        f"QAT: {qat.LIBRARY} {qat.modelopt_version()}, {recipe.epochs} epoch(s) on {len(ctx.split.train)} train "
        f"patients ({len(train)} slices), lr {recipe.lr}"
    )
    teacher = model_from_checkpoint(ctx.ckpt)  # fidelity: the engine must keep this model's function
    with progress_bar(True) as bar:
        task = bar.add_task("QAT", total=None, info="")

        def on_step(epoch, step, steps, loss):
            done = (epoch - 1) * steps + step
            bar.update(task, total=steps * recipe.epochs, completed=done, info=f"epoch {epoch} loss {loss:.4f}")

        history = qat.finetune(quantized, images, masks, ctx.normalization, recipe, on_step, teacher=teacher)
    amax = qat.conv_amax(quantized)
    model = qat.strip_quantizers(quantized, model_from_checkpoint(ctx.ckpt))
    run = {"train_slices": len(train), "history": history, "seconds": round(time.perf_counter() - started, 1)}
    return model, _qat_record(ctx, recipe, chosen, key, run, amax)


def _qat_record(ctx: _Context, recipe, chosen, key: str, run: dict, amax: dict) -> dict:

    settings = ("epochs", "lr", "optimizer", "batch_size", "weight_decay", "seed", "augment", "distill_weight")
    return {
        "library": qat.LIBRARY,
        "library_version": qat.modelopt_version(),
        "config": "INT8_DEFAULT_CFG (int8, per-channel weights on axis 0, per-tensor activations, max calibration)",
        **{k: getattr(recipe, k) for k in settings},
        "loss": f"distillation from the FP32 model (BCE on its probabilities), weight {recipe.distill_weight}; "
        "the rest Dice + BCE on labels",
        "teacher": str(ctx.checkpoint),
        "teacher_sha256": ctx.sha,
        "batch_norm": "statistics frozen",
        "schedule": "cosine to zero",
        "train_patients": list(ctx.split.train),
        "train_slices": run["train_slices"],
        "calibration_slice_list_sha256": slice_list_hash(slice_ids(chosen)),
        "history": run["history"],
        "seconds": run["seconds"],
        "conv_input_amax": amax,
        "key": key,
    }


class FloatGraph:
    """The FP32 export as it is (FP32, and BF16 — an execution precision of the FP32 graph), or converted to a typed
    FP16 graph. Nothing can be kept in float: one graph, no ranking."""

    tag, label = "", ""
    rank = None

    def __init__(self, ctx: _Context, fmt: EngineFormat, work: Path):

        self.typed, self.facts = ctx.onnx, {}
        if fmt.precision != "fp16":
            return
        self.typed, changed = convert_fp16(ctx.onnx, work / "fp16.onnx")
        converter = "onnxconverter-common float16, keep_io_types"
        self.facts["fp16"] = {"converter": converter, "kept_in_fp32_ops": FP32_OPS, **changed}
        if changed["weights_clamped_to_fp16_range"]:
            logger.warning(
                f"{ctx.ckpt['model']['name']} {fmt.name}: {changed['weights_clamped_to_fp16_range']} weight array(s) "
                f"hold values beyond the FP16 range (largest {changed['largest_clamped_value']:.3g}); they were clamped "
                "— the gate below says whether it matters"
            )

    def graph(self, kept: list[str]) -> Path:
        return self.typed


class Int8Graph:
    """A Q/DQ INT8 graph of one profile, quantized from a float source (the export: post-training; or the QAT
    model's): `graph(kept)` with the named nodes left in float, `rank()` the nodes by their effect on the output,
    `facts` the calibration record for the manifest."""

    def __init__(
        self, ctx: _Context, fmt: EngineFormat, work: Path, source: _FloatSource, qat_record: dict | None = None
    ):

        self.ctx, self.work, self.source = ctx, work, source
        self.tag = source.tag
        self.label = " (QAT)" if qat_record is not None else ""
        self.recipe = recipe = int8.recipe_for(fmt.int8_profile)
        self.prepared = int8.preprocess_for_quantization(source.onnx, work / f"{source.tag}prepared.onnx")
        chosen = ctx.calibration_slices()
        ids = calibration.slice_ids(chosen)
        key = calibration.cache_key(source.sha256, ids, ctx.opts.calib_method, recipe.symmetric_activations)
        self.cache = ctx.folder / "calibration" / f"{source.tag}{key}.json"
        self.reader = calibration.make_reader(chosen, ctx.img_size, ctx.normalization)
        cache_was_there = self.cache.is_file()
        calibration_facts = {
            "recipe": recipe.to_json(),
            "split": "val",
            "method": ctx.opts.calib_method,
            "samples": len(chosen),
            "tumor_samples": int(chosen.tumor_slices().sum()),
            "patients": sorted(set(chosen.patients.tolist())),
            "slice_list_sha256": calibration.slice_list_hash(ids),
            "cache": str(self.cache.relative_to(ctx.folder)),
            "cache_reused": cache_was_there,
        }
        if source.ranges is not None:
            calibration_facts["qat_ranges"] = self.take_qat_ranges(cache_was_there)
        self.facts = {"calibration": calibration_facts, **({"qat": qat_record} if qat_record is not None else {})}

    def take_qat_ranges(self, cache_was_there: bool) -> str:
        """ONNX Runtime calibrates every tensor, then the convolution inputs take the ranges QAT trained with."""

        source, tag = self.source, self.tag
        ranges = qat.conv_input_ranges(self.prepared, source.model, source.ranges)
        if not cache_was_there:
            raw = self.work / f"{tag}calibrated.json"
            calibrated = self.work / f"{tag}calibration.onnx"
            int8.quantize(self.prepared, calibrated, self.recipe, self.reader, self.ctx.opts.calib_method, raw)
            qat.override_cache(raw, self.cache, ranges, self.recipe.symmetric_activations)
        return f"{len(ranges)} convolution input(s) take the range QAT trained with; the other tensors are calibrated on these slices"

    def graph(self, kept: list[str]) -> Path:

        target = self.work / f"{self.tag}qdq-{len(kept)}.onnx"
        return int8.quantize(
            self.prepared, target, self.recipe, self.reader, self.ctx.opts.calib_method, self.cache, kept
        )

    def rank(self) -> tuple[list[tuple[str, float]], dict]:

        # Always the plain Q/DQ graph of the first build, not a backend's optimized engine (ONNX Runtime fuses
        # Q/DQ pairs into QLinear ops), so every quantized node can be put back in float on its own.
        batch, patients = self.ctx.ranking_batch()
        first = self.work / f"{self.tag}qdq-0.onnx"
        ranked, how = rank_by_output_effect(self.prepared, first, batch, self.ctx.opts.threads)
        return ranked, {**how, "patients": patients}


def graph_sources(ctx: _Context, fmt: EngineFormat, work: Path) -> list[Callable[[], FloatGraph | Int8Graph]]:
    """The graphs one engine may be built from, in the order they are tried, each made only when its turn comes.
    Float precisions: one. INT8: post-training, then (--qat auto) quantization-aware; --qat off / always: one of them."""
    if fmt.precision != "int8":
        return [lambda: FloatGraph(ctx, fmt, work)]
    post_training = functools.partial(Int8Graph, ctx, fmt, work, ctx.ptq)

    def quantization_aware() -> Int8Graph:
        qat_model = ctx.qat_model()
        return Int8Graph(ctx, fmt, work, qat_model.source, qat_model.record)

    mode = "off" if ctx.opts.qat_epochs == 0 else ctx.opts.qat
    return {"off": [post_training], "auto": [post_training, quantization_aware], "always": [quantization_aware]}[mode]


def build_one(ctx: _Context, fmt: EngineFormat) -> dict:
    """Build, gate and (if it passes, or --force) write one engine with its manifest."""
    fmt.require_available()
    with temporary_folder(ctx.folder) as tmp:
        return _EngineBuild(ctx, fmt, Path(tmp)).run()


class _EngineBuild:
    """One engine: its graph sources tried in turn — each one but the last as it comes (fully quantized), the last
    searched with nodes put back in float while the gate fails — then the passing engine installed with its manifest."""

    def __init__(self, ctx: _Context, fmt: EngineFormat, work: Path):
        self.ctx, self.fmt, self.work = ctx, fmt, work
        self.label = f"{ctx.ckpt['model']['name']} {fmt.name}"
        self.target = ctx.folder / fmt.filename()
        self.graphs: dict[Path, Path] = {}  # candidate engine -> the graph it was built from
        self.backend_facts: dict = {}
        self.extra: dict = {}
        self.started = time.perf_counter()

    def run(self) -> dict:
        path, gate = self.search()
        if not gate.passed and not self.ctx.opts.force:
            raise self.gate_failed(gate)
        manifest = self.install(path, gate)
        logger.info(
            f"built {self.target} ({manifest['build_seconds']:.1f} s, "
            f"gate {'passed' if gate.passed else 'FAILED (forced)'})"
        )
        return {**manifest, "engine": str(self.target)}

    def search(self):
        opts = self.ctx.opts
        sources = graph_sources(self.ctx, self.fmt, self.work)
        asks_probe = self.fmt.precision == "int8" and opts.worth_searching is not None and not opts.force
        probe = self.worth_searching if asks_probe else None  # asked once, of the first fully quantized engine
        for turn, make_source in enumerate(sources):
            last = turn == len(sources) - 1
            if turn:
                self.stop_if_out_of_time()
            source = make_source()
            label = self.label + (source.label or ("" if last else " (post-training)"))
            path, gate = gate_with_fallback(
                self.ctx.judge_for(self.fmt),
                functools.partial(self.build, source),
                self.run_engine,
                source.rank if last else None,
                label,
                out_of_time=self.out_of_time,
                worth_searching=probe,
            )
            probe = None
            if gate.not_searched:
                raise self.cannot_win(gate)
            self.extra.update(source.facts)
            if gate.passed or last:
                return path, gate
            self.extra["post_training_gate"] = gate.summary()
            logger.info(
                f"{self.label}: post-training INT8 failed its gate; quantization-aware fine-tuning "
                f"({opts.qat_epochs} epoch(s), --qat off to skip)"
            )
        raise AssertionError("graph_sources returned no source")

    def build(self, source, kept: list[str]) -> Path:
        candidate = self.work / f"engine-{source.tag}{len(kept)}{self.fmt.suffix}"
        self.graphs[candidate] = source.graph(kept)
        target = self.ctx.build_target(self.fmt)
        self.backend_facts.update(self.fmt.module.build(self.graphs[candidate], self.fmt, candidate, target))
        return candidate

    def run_engine(self, path: Path):
        return self.ctx.run_engine(path, self.fmt, self.backend_facts)

    def out_of_time(self) -> bool:
        deadline = self.ctx.opts.deadline
        return deadline is not None and time.monotonic() > deadline

    def stop_if_out_of_time(self) -> None:
        if self.out_of_time():
            raise SearchStopped(
                f"{self.label}: --budget-minutes ran out before quantization-aware fine-tuning (post-training INT8 "
                "failed its gate); no engine written: rerun with a larger --budget-minutes to continue"
            )

    def worth_searching(self, path: Path) -> str | None:
        ctx = self.ctx
        opened = functools.partial(ctx.open_candidate, path, self.fmt, self.backend_facts)
        return ctx.opts.worth_searching(opened, ctx.val_batch)

    def cannot_win(self, gate) -> CannotWin:
        return CannotWin(
            f"{self.label}: not searched — {gate.not_searched}; it failed the accuracy gate fully quantized "
            f"({'; '.join(gate.failures())}); no engine written",
            gate=self.ctx.gate_record(gate),
        )

    def gate_failed(self, gate) -> GateFailed:
        what_next = (
            "(try more --qat-epochs, --calib-method, or --force to keep it marked as failed)"
            if self.fmt.precision == "int8"
            else "(--force keeps it, marked as failed)"
        )
        return GateFailed(
            f"{self.label}: failed the accuracy gate on {len(gate.per_patient)} val patients "
            f"({'; '.join(gate.failures())}) even with {len(gate.nodes_kept_in_float)} node(s) kept in float; "
            f"no engine written {what_next}",
            gate=self.ctx.gate_record(gate),
        )

    def install(self, path: Path, gate) -> dict:
        """The engine and its manifest into place atomically; an INT8 engine that is not itself the plain Q/DQ graph
        gets that graph beside it (the portable twin OpenVINO, TensorRT's parser and ONNX Runtime anywhere read)."""
        twin = None
        engine_sha = sha256_file(path)
        if self.fmt.precision == "int8":
            plain = self.graphs[path]
            if sha256_file(plain) == engine_sha:
                note = "the engine is itself the plain Q/DQ graph"
                self.extra["portable_qdq"] = {"file": self.target.name, "sha256": engine_sha, "note": note}
            else:
                twin = self.target.with_name(f"{self.target.stem}.qdq.onnx")
                note = (
                    "plain Q/DQ ONNX before the runtime's optimization: for OpenVINO, TensorRT, ONNX Runtime elsewhere"
                )
                self.extra["portable_qdq"] = {"file": twin.name, "sha256": sha256_file(plain), "note": note}
        seconds = time.perf_counter() - self.started
        manifest = {
            **_manifest(self.ctx, self.fmt, gate, seconds, self.extra),
            **self.backend_facts,
            "sha256": engine_sha,
        }
        install_engine(path, self.target, manifest, [(self.graphs[path], twin)] if twin is not None else [])
        return manifest


def _manifest(ctx: _Context, fmt: EngineFormat, gate, seconds: float, extra: dict) -> dict:
    return {
        "engine": fmt.filename(),
        "backend": fmt.backend,
        "backend_version": fmt.available()[1],
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
        "postprocess": PostProcess.from_json(ctx.ckpt.get("postprocess")).to_json(),
        "split": ctx.ckpt["split"],
        "data_root": ctx.ckpt.get("data_root"),
        "pruned": bool(ctx.ckpt.get("pruning")),
        "pruning": ctx.ckpt.get("pruning", []),
        "gate": ctx.gate_record(gate),
        "forced": not gate.passed,
        "build_seconds": round(seconds, 2),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }


@dataclass
class BuildReport:
    engines: list[dict] = field(default_factory=list)
    failed: list[GateFailed] = field(
        default_factory=list
    )  # gate failures, each with its gate record; the other engines were still built

    @property
    def failures(self) -> list[str]:
        return [str(exc) for exc in self.failed]


def validate(opts: BuildOptions) -> None:
    """Every option checked before any work: a bad flag is exit 2, never a failed gate (exit 3)."""

    opts.criteria.validate()
    if opts.calib_samples < 1:
        raise LggError(f"--calib-samples must be at least 1, got {opts.calib_samples}")
    if opts.calib_method not in METHODS:
        raise LggError(f"unknown --calib-method {opts.calib_method!r}: choose {', '.join(METHODS)}")
    lo, opt, hi = opts.batch
    if not 1 <= lo <= opt <= hi:
        raise LggError(f"batch profile must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch, got {opts.batch}")
    if opts.qat not in ("auto", "always", "off"):
        raise LggError(
            f"unknown --qat {opts.qat!r}: choose auto (when post-training INT8 fails its gate), always or off"
        )
    if opts.qat_epochs < 0:
        raise LggError(f"--qat-epochs must be 0 (no quantization-aware fine-tuning) or more, got {opts.qat_epochs}")
    if opts.qat == "always" and opts.qat_epochs == 0:
        raise LggError("--qat always needs --qat-epochs of 1 or more")
    if opts.qat != "off" and opts.qat_epochs > 0:
        from lggdeploy.engines.precision.qat import QatRecipe

        QatRecipe(epochs=opts.qat_epochs, lr=opts.qat_lr).validate()
    if opts.workspace_gib <= 0:
        raise LggError(f"--workspace-gib must be positive, got {opts.workspace_gib}")
    RunOptions(threads=opts.threads).cpu_threads()
    ensure_folder(opts.out_dir)


def build_engines(checkpoints: list[Path], opts: BuildOptions) -> BuildReport:
    """Every requested format for every checkpoint. Unavailable backends fail before any work is done;
    an engine that fails its gate is reported and the rest of the matrix is still built."""
    validate(opts)
    formats = select_formats(opts.backend, opts.precision, opts.int8_profile)
    for fmt in formats:
        fmt.require_available()
    for fmt in list(formats):
        usable, why = fmt.usable()
        if not usable:
            if opts.precision != "all":
                raise BackendUnavailable(why)
            logger.warning(f"skipped {why}")
            formats.remove(fmt)
    report = BuildReport()
    for checkpoint in checkpoints:
        ctx = _Context(Path(checkpoint), opts)
        for fmt in formats:
            try:
                report.engines.append(build_one(ctx, fmt))
            except SearchStopped:
                raise  # the budget is spent: nothing more is built
            except GateFailed as exc:
                logger.error(f"{'cannot win' if isinstance(exc, CannotWin) else 'gate failed'}: {exc}")
                report.failed.append(exc)
    return report

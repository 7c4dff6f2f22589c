"""`lggdeploy bench`: latency beside per-patient Dice for every engine, against the PyTorch FP32 reference.

Honest timing on a noisy shared CPU: inputs preprocessed and preloaded (disk and preprocessing stay out of model
latency; end-to-end time per image is reported separately), warm-up first, the same thread count for ONNX
Runtime and PyTorch (`--threads`), ONNX Runtime threads that do not spin after a run (so one engine's idle
threads do not eat the next one's measurement), engines interleaved in a freshly shuffled (seeded) order every
round so machine drift hits all alike, medians with IQR, p99 only from 100 runs, and an A/A row — the reference
timed twice as two entries — whose ratio is the run's noise floor (a warning when it exceeds 10 %).
An engine with NaN/Inf outputs is flagged and not scored; an engine whose backend is missing is listed
with the reason. The reference is the checkpoint the engines were built from (sha256 checked).
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lggdeploy.backends.base import RunOptions
from lggdeploy.bench.options import BenchOptions  # noqa: F401 (the documented import path)
from lggdeploy.bench.stats import latency_summary, paired_summary
from lggdeploy.common.errors import LggError
from lggdeploy.common.files import sha256_file
from lggdeploy.common.machine import machine_info
from lggdeploy.common.progress import progress_bar
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset, resolve_data_root
from lggdeploy.data.split import Split, load_split
from lggdeploy.data.transforms import Normalization, preprocess
from lggdeploy.engines.formats import discover, format_of, manifest_path, open_engine, read_manifest
from lggdeploy.models.torch_runner import load
from lggdeploy.postprocess import PostProcess
from lggdeploy.runtime.segmenter import stored_postprocess
from lggdeploy.scoring import NonFiniteOutput, score_runner, segment

logger = logging.getLogger(__name__)


@dataclass
class Entry:
    model: str
    backend: str
    precision: str
    int8_profile: str | None
    path: Path
    checkpoint: Path
    group: str  # checkpoint sha256: the reference this entry is compared with
    manifest: dict = field(default_factory=dict)
    pruned: bool = False
    device: str = "cpu"  # torch rows only: the CPU FP32 row is the reference; CUDA rows are extra
    status: str = "ok"
    reason: str = ""
    runner: object = None
    memory_mb: float | None = None
    accuracy: dict | None = None
    latency: dict = field(default_factory=dict)
    end_to_end_ms_per_image: dict = field(
        default_factory=dict
    )  # batch size -> ms per image, uint8 slices in, masks out
    twin_of: Entry | None = None  # the A/A entry: the reference timed a second time, as its own entry

    @property
    def label(self) -> str:
        device = f"({self.device})" if self.backend == "torch" and self.device != "cpu" else None
        return " ".join(
            p
            for p in (
                self.model,
                self.backend,
                self.precision,
                self.int8_profile,
                device,
                "A/A" if self.twin_of else None,
            )
            if p
        )

    @property
    def preprocessing(self) -> tuple[Normalization, int]:
        """The manifest's normalization and input size."""
        return Normalization.from_json(self.manifest["normalization"], origin=str(self.path)), self.manifest["img_size"]

    @property
    def postprocess(self) -> PostProcess:
        """The post-processing the engine's manifest stores (the runtime's reading of it, with its error line)."""
        return stored_postprocess(self.path, self.manifest)

    @property
    def is_reference(self) -> bool:
        return self.backend == "torch" and self.precision == "fp32" and self.device == "cpu" and self.twin_of is None


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def _entries(opts: BenchOptions) -> list[Entry]:
    """Every engine under --engines-dir, each checkpoint's PyTorch FP32 reference before its engines, with the A/A
    twin (the reference timed again as its own entry) and, on a CUDA machine, PyTorch FP32/FP16 on the GPU."""
    engines = discover(opts.engines_dir)
    if not engines:
        raise LggError(
            f"no engines with manifests under {opts.engines_dir}: build some with `lggdeploy build CHECKPOINT`"
        )
    entries: list[Entry] = []
    references: dict[str, Entry] = {}
    for path in engines:
        manifest = read_manifest(path)
        group, checkpoint = manifest["checkpoint_sha256"], Path(manifest["checkpoint"])
        if group not in references:
            references[group] = reference = _reference_entry(path, manifest)
            if _cuda_available():  # PyTorch on the GPU, FP32 and FP16 autocast, beside the CPU reference
                entries += [_torch_entry(reference, precision=p, device="cuda", pruned=False) for p in ("fp32", "fp16")]
        entry = Entry(manifest["model"]["name"], manifest["backend"], manifest["precision"], manifest.get("int8_profile"),
                      path, checkpoint, group, manifest, pruned=bool(manifest.get("pruned")))  # fmt: skip
        entries.append(entry)
    ordered = []  # each checkpoint's reference first, its A/A twin, then its engines
    for group, reference in references.items():
        ordered += [reference, _torch_entry(reference, twin_of=reference)]
        ordered += [e for e in entries if e.group == group]
    return ordered


def _torch_entry(reference: Entry, **changes) -> Entry:
    """Another PyTorch row of `reference`'s checkpoint (the A/A twin, a GPU row): the same model and manifest, with
    results of its own (not dataclasses.replace, which would share the latency dicts)."""
    same = {k: getattr(reference, k) for k in ("model", "backend", "precision", "int8_profile", "path", "checkpoint")}
    return Entry(
        **{**same, "group": reference.group, "manifest": reference.manifest, "pruned": reference.pruned, **changes}
    )


def _reference_entry(path: Path, manifest) -> Entry:
    """The checkpoint an engine was built from, as the PyTorch FP32 reference (hashed once per checkpoint)."""
    group, checkpoint = manifest["checkpoint_sha256"], Path(manifest["checkpoint"])
    actual = sha256_file(checkpoint) if checkpoint.is_file() else group
    if actual != group:
        raise LggError(
            f"{checkpoint} is not the checkpoint {path.name} was built from: its sha256 is {actual[:12]}…, "
            f"{manifest_path(path)} records {group[:12]}…; restore that checkpoint or rebuild the engines from this one"
        )
    model, pruned = manifest["model"]["name"], bool(manifest.get("pruned"))
    return Entry(model, "torch", "fp32", None, checkpoint, checkpoint, group, manifest, pruned=pruned)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _open(entry: Entry, opts: BenchOptions) -> None:
    """Load the runner (or mark the entry unavailable / failed, with the reason)."""
    before = _rss_mb()
    if entry.twin_of is not None:  # the same model, timed as a second entry
        entry.status, entry.reason, entry.runner = entry.twin_of.status, entry.twin_of.reason, entry.twin_of.runner
        return
    try:
        if entry.backend == "torch":
            ok, reason = torch_available()
            if not ok:
                entry.status, entry.reason = "unavailable", reason
                return
            if not entry.checkpoint.is_file():
                entry.status, entry.reason = "missing", f"checkpoint {entry.checkpoint} not found"
                return
            entry.runner = load_torch_runner(entry.checkpoint, entry.device, autocast_fp16=entry.precision == "fp16")
        else:
            ok, reason = format_of(entry.manifest, entry.path).available()
            if not ok:
                entry.status, entry.reason = "unavailable", reason
                return
            entry.runner = open_engine(entry.path, entry.manifest, RunOptions(threads=opts.threads, spin=False))
    except LggError as exc:
        entry.status, entry.reason = "error", str(exc)
        return
    entry.memory_mb = _rss_mb() - before


def _slices_for(entry: Entry, opts: BenchOptions, cache: dict):

    split = (
        load_split(opts.split_file)
        if opts.split_file
        else Split.from_json(entry.manifest["split"], origin=f"{entry.path} manifest")
    )
    data = resolve_data_root(opts.data, entry.manifest.get("data_root"), f"bench's accuracy columns ({entry.path})")
    if ("dataset", str(data)) not in cache:  # scan each data folder once, not once per engine
        cache[("dataset", str(data))] = load_dataset(data)
    dataset = cache[("dataset", str(data))]
    patients = dataset.patient_ids if opts.split == "all" else split.patients(opts.split)
    key = (str(data), tuple(patients))
    if key not in cache:
        cache[key] = load_slices(dataset, patients)
    return cache[key]


def torch_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed (pip install 'lggdeploy[train]')"
    return True, f"torch {torch.__version__}"


def load_torch_runner(checkpoint: Path, device: str, autocast_fp16: bool = False):

    return load(checkpoint, device=device, autocast_fp16=autocast_fp16)


def validate(opts: BenchOptions) -> None:
    """Every option checked before the scoring and timing start."""
    if not opts.batch_sizes or any(b < 1 for b in opts.batch_sizes):
        raise LggError(f"--batch-sizes must be positive integers, got {opts.batch_sizes}")
    if opts.iters < 1:
        raise LggError(f"--iters must be at least 1, got {opts.iters}")
    if opts.warmup < 0:
        raise LggError(f"--warmup must be 0 or more, got {opts.warmup}")
    if opts.seconds is not None and opts.seconds <= 0:
        raise LggError(f"--seconds must be positive, got {opts.seconds}")
    RunOptions(threads=opts.threads).cpu_threads()


def interleaved_times(
    calls: list, rounds: int, rng: np.random.Generator, after_round=None, stop_after_seconds: float | None = None
) -> list[list[float]]:
    """Seconds of each call per round, the calls timed in a fresh shuffled order every round, so that the shared
    host's drift hits them alike. `stop_after_seconds`: stop after a round once that much time has passed (3 rounds
    at least)."""
    times: list[list[float]] = [[] for _ in calls]
    started = time.perf_counter()
    for round_ in range(rounds):
        for index in rng.permutation(len(calls)):
            t0 = time.perf_counter()
            calls[index]()
            times[index].append(time.perf_counter() - t0)
        if after_round is not None:
            after_round()
        if stop_after_seconds and round_ >= 2 and time.perf_counter() - started > stop_after_seconds:
            break
    return times


def run_bench(opts: BenchOptions) -> dict:
    """Score every entry on the split, time them interleaved at each batch size, then end to end; the results."""

    validate(opts)
    threads = RunOptions(threads=opts.threads).cpu_threads()
    _torch_threads(threads)
    entries = _entries(opts)
    inputs, raw = _score(entries, opts)
    active = [e for e in entries if e.status == "ok"]
    _time_interleaved(active, inputs, opts)
    _time_end_to_end(active, raw, opts)
    for e in entries:
        if e.runner is not None and e.twin_of is None:
            e.runner.close()
    return _results(entries, opts, machine_info(), threads)


def _score(entries: list[Entry], opts: BenchOptions) -> tuple[dict, dict]:
    """Open and score each entry (per-patient accuracy); the preprocessed timing batches per checkpoint and batch
    size, and the raw uint8 slices per checkpoint for the end-to-end timing."""
    slice_cache: dict = {}
    inputs: dict[tuple[str, int], np.ndarray] = {}
    raw: dict[str, np.ndarray] = {}
    for entry in entries:
        _open(entry, opts)
        if entry.status != "ok":
            logger.warning(f"{entry.label}: {entry.status} ({entry.reason})")
            continue
        slices = _slices_for(entry, opts, slice_cache)
        if entry.twin_of is not None:
            entry.accuracy = entry.twin_of.accuracy
            continue
        norm, size = entry.preprocessing
        try:
            entry.accuracy = score_runner(
                entry.runner, slices, size, norm, threshold=entry.manifest["threshold"],
                description=f"scoring {entry.label}", postprocess=entry.postprocess,
            )  # fmt: skip
        except NonFiniteOutput as exc:
            entry.status, entry.reason = "non-finite", str(exc)
            continue
        raw[entry.group] = slices.images
        for b in opts.batch_sizes:
            inputs[(entry.group, b)] = preprocess(slices.images[np.arange(b) % len(slices)], size, norm)
    return inputs, raw


def _time_interleaved(active: list[Entry], inputs: dict, opts: BenchOptions) -> None:
    """Per batch size: warm-up, then rounds in which every engine runs once, in a freshly shuffled order."""
    order_rng = np.random.default_rng(opts.seed)
    with progress_bar() as bar:
        for b in opts.batch_sizes:
            for e in active:
                for _ in range(opts.warmup):
                    e.runner.infer(inputs[(e.group, b)])
            task = bar.add_task(f"timing batch {b}", total=opts.iters, info=f"{len(active)} engines interleaved")
            calls = [functools.partial(e.runner.infer, inputs[(e.group, b)]) for e in active]
            times = interleaved_times(calls, opts.iters, order_rng, lambda: bar.advance(task), opts.seconds)
            for e, seconds in zip(active, times):
                e.latency[b] = latency_summary(seconds, b)


def _time_end_to_end(active: list[Entry], raw: dict, opts: BenchOptions) -> None:
    """At every batch size: uint8 slices in, resize + normalize, infer, masks at native size out, and the engine's
    post-processing on the batch as one volume (a patient's series is post-processed once per call); median of 5."""
    for e in active:
        if e.twin_of is not None:
            e.end_to_end_ms_per_image = e.twin_of.end_to_end_ms_per_image
            continue
        (norm, size), postprocess = e.preprocessing, e.postprocess
        for b in opts.batch_sizes:
            batch = raw[e.group][np.arange(b) % len(raw[e.group])]
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                segment(e.runner, batch, size, norm, e.manifest["threshold"], postprocess, batch_size=b)
                runs.append(time.perf_counter() - t0)
            e.end_to_end_ms_per_image[b] = float(np.median(runs) * 1000 / b)


def _torch_threads(threads: int) -> None:
    """PyTorch computes with as many threads as ONNX Runtime is given, so the reference is timed alike."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


ACCURACY_FIGURES = (
    "mean_patient_dice",
    "median_patient_dice",
    "global_dice",
    "mean_patient_iou",
    "pixel_accuracy",
    "slice_mean_dice_study_style",
)


def _results(entries: list[Entry], opts: BenchOptions, machine: dict, threads: int) -> dict:
    refs = {e.group: e for e in entries if e.is_reference}
    rows, noise = [], []
    for e in entries:
        row = _row(e, refs.get(e.group), opts)
        if e.twin_of is not None:
            noise.extend({"model": e.model, "batch": b, "ratio": r} for b, r in row.get("speedup", {}).items())
        rows.append(row)
    worst = max((abs(n["ratio"] - 1) for n in noise), default=None)
    if worst is not None and worst > opts.noise_warning:
        logger.warning(
            f"the A/A row (the reference timed twice) differs from itself by {worst:.0%}: this machine was noisy "
            f"during the run; speed-ups within ±{worst:.0%} of each other are not differences"
        )
    return {
        "format": "lggdeploy-bench",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "options": {
            "split": opts.split,
            "batch_sizes": list(opts.batch_sizes),
            "iters": opts.iters,
            "warmup": opts.warmup,
            "threads": threads,
            "order_seed": opts.seed,
        },
        "noise_floor": {
            "aa_ratios": noise,
            "worst_deviation": worst,
            "warning": worst is not None and worst > opts.noise_warning,
        },
        "machine": machine,
        "rows": rows,
    }


def _row(e: Entry, ref: Entry | None, opts: BenchOptions) -> dict:
    """One entry's row: what it is, its latency, and — when scored — its accuracy, ΔDice against the reference's
    patients (paired) and its speed-up over the reference's median latency."""
    row = {
        "model": e.model,
        "aa": e.twin_of is not None,
        "backend": e.backend if e.device == "cpu" else f"{e.backend} ({e.device})",
        "precision": e.precision,
        "int8_profile": e.int8_profile,
        "pruned": e.pruned,
        "engine": str(e.path),
        "status": e.status,
        "reason": e.reason,
        "file_mb": round(e.path.stat().st_size / 2**20, 2) if e.path.is_file() else None,
        "memory_mb": round(e.memory_mb, 1) if e.memory_mb is not None else None,
        "latency": {str(b): s for b, s in e.latency.items()},
        "end_to_end_ms_per_image": {str(b): v for b, v in e.end_to_end_ms_per_image.items()},
        "gate": e.manifest.get("gate") if e.backend != "torch" else None,
    }
    if not e.accuracy:
        return row
    aggregates = e.accuracy["aggregates"]
    row.update({k: aggregates[k] for k in ACCURACY_FIGURES})
    row["per_patient"] = e.accuracy["per_patient"]
    row["patients"] = aggregates["patients"]
    row["patients_missed"] = aggregates["patients_missed"]
    row["postprocess"] = e.postprocess.describe()
    if ref is not None and ref.accuracy and not e.is_reference:
        ref_dice = {r["patient"]: r["dice"] for r in ref.accuracy["per_patient"]}
        diffs = {
            r["patient"]: 100 * (r["dice"] - ref_dice[r["patient"]])
            for r in e.accuracy["per_patient"]
            if r["patient"] in ref_dice
        }
        row["delta_dice_points"] = paired_summary(diffs, reps=opts.bootstrap_reps)
    if ref is not None and ref.latency and e.latency:
        row["speedup"] = {
            str(b): ref.latency[b]["p50_ms"] / e.latency[b]["p50_ms"] for b in e.latency if b in ref.latency
        }
    return row

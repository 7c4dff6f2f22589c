"""`lggdeploy optimize`: the fastest engine that keeps accuracy, found by walking a ladder of candidates.

The ladder, cheapest first, for the checkpoint and for each pruning ratio (pruned, then fine-tuned with
distillation from the unpruned model):

    onnxruntime fp32, openvino fp32, openvino bf16 (AVX512-BF16/AMX CPUs), onnxruntime int8 (cpu profile),
    openvino int8 (openvino profile: Q/DQ on convolution inputs) — INT8 with quantization-aware fine-tuning when
    post-training fails. Each rung is the backend's default engine format for that precision (formats.py).

Every candidate is built by `build` behind the accuracy gate. The unpruned model's engines are judged for fidelity
to it (agreement and per-patient drops). A pruned, fine-tuned model is a new model, judged as one (gate.py): its
FP32 engine on labels against the unpruned FP32 model (mean and worst per-patient drop, no val patient missed;
agreement recorded, not judged), its BF16 / INT8 engines twice — for fidelity against the *pruned* FP32 model, and on
labels against the unpruned one (mean drop), so that pruning and quantization spend one budget (--max-drop). The rule
of each verdict is in ladder.json and optimize.md. A pruning ratio whose FP32 engine already fails is not quantized. Everything that passed is then timed side by side in one `bench` run (engines
interleaved, the PyTorch reference and its A/A row included), and the Pareto front of latency against val
per-patient Dice is written with the chosen engine — the fastest that passed at `--batch` — and a manifest
saying how it was found. An INT8 rung that fails its gate fully quantized is searched (nodes kept in float, QAT) only
if it could still win: a speed probe times it at `--batch` beside every engine that has passed so far, interleaved, and
when it is already PROBE_MARGIN× slower than the fastest of them the search — which only adds float work — is not run
("cannot win"; the rung is then missing from the front, which holds only engines that passed; --search-all searches
it anyway, and a rerun with it searches the rungs an earlier run gave up; a rerun reuses the verdict only while the
engine that beat it passes in that run, else it probes again).

Resumable: engines, pruned checkpoints and gate verdicts live under --out; a second run reuses what the
first built (a failed candidate is not rebuilt either) and only re-times. A verdict is reused only under the gate
criteria (and, for INT8, the calibration and QAT settings) it was reached with: a rerun asking for others judges
that rung again — an FP32/BF16 rung from its stored per-patient rows (`_rejudged`), an INT8 rung by building it again.
Verdicts reached before pruned models had their own rule (judged for fidelity to the unpruned model) are judged again
the same way: a pruned FP32 rung from its stored rows, a pruned BF16 / INT8 rung by building it again (its fidelity to
the pruned model was never measured).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lggdeploy.backends.base import RunOptions
from lggdeploy.bench.labels import engine_name
from lggdeploy.common.errors import CannotWin, GateFailed, LggError, SearchStopped
from lggdeploy.common.files import atomic_path, ensure_folder, sha256_file, write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_line
from lggdeploy.engines.export import EXPORT_GRAPH
from lggdeploy.engines.formats import open_engine, select_formats
from lggdeploy.engines.precision.criteria import (
    FIDELITY,
    LABELS,
    LABELS_TOTAL,
    RETRAINED_QUANTIZED,
    RULES,
    GateCriteria,
    rule_for,
)
from lggdeploy.optimize_options import LADDER, OptimizeOptions, cpu_ladder  # noqa: F401 (documented import paths)

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    model: str  # "unpruned" or "pruned 30%"
    checkpoint: str
    backend: str
    precision: str
    status: str = (
        "pending"  # passed | failed gate | cannot win | skipped | unavailable | not tried (budget) | stopped (budget)
    )
    reason: str = ""
    engine: str | None = None
    val_dice: float | None = None
    val_drop_points: float | None = None
    nodes_kept_in_float: int | None = None
    qat: bool = False
    build_seconds: float | None = None
    latency_ms_per_image: dict = field(default_factory=dict)
    speedup_vs_pytorch: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    engine_format: str = ""  # e.g. openvino-int8-openvino: a rung whose default format changed is built again
    judged_with: dict = field(default_factory=dict)  # the gate criteria (and INT8 build settings) of its verdict
    gate: dict = field(
        default_factory=dict
    )  # the verdict's figures, per patient too (a failed rung writes no engine to hold them)
    beaten_by: str = (
        ""  # cannot win: the key of the passed engine the speed probe found faster (the verdict holds while it passes)
    )

    def __post_init__(self) -> None:
        self.engine_format = self.engine_format or format_name(self.backend, self.precision)

    @property
    def key(self) -> str:
        return candidate_key(asdict(self))


SETTLED = ("passed", "failed gate", "cannot win")  # verdicts a rerun reuses under the same criteria
PATHS_RELATIVE = "relative to this folder"  # ladder.json's paths inside --out: the folder can be moved or copied


def _stored(candidate: dict, out: Path) -> dict:
    """A candidate as ladder.json keeps it: its checkpoint and engine relative to --out when they lie inside it."""
    root = out.resolve()
    stored = dict(candidate)
    for field_name in ("checkpoint", "engine"):
        if stored.get(field_name):
            path = Path(stored[field_name]).resolve()
            stored[field_name] = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    return stored


def _loaded(candidate: dict, out: Path, relative_to_out: bool) -> dict:
    """The inverse of _stored: absolute paths. Ladders written before PATHS_RELATIVE hold paths relative to the
    directory optimize ran in, which is taken to be this one."""
    loaded = dict(candidate)
    for field_name in ("checkpoint", "engine"):
        if loaded.get(field_name):
            path = Path(loaded[field_name])
            loaded[field_name] = str((out / path if relative_to_out and not path.is_absolute() else path).resolve())
    return loaded


def format_name(backend: str, precision: str) -> str:

    return select_formats(backend, precision)[0].name


def candidate_key(candidate: dict) -> str:
    """Which saved candidate a rung reuses: same model ("unpruned" or "pruned 30%": a ladder belongs to one
    checkpoint, checked by its sha256, and a ratio's pruned checkpoint lives in --out), same engine format. A ladder
    saved before formats were recorded names it by its engine file; a rung of it that wrote none is built again."""
    fmt = candidate.get("engine_format")
    if not fmt:
        fmt = (
            Path(candidate["engine"]).name.rsplit(".", 1)[0]
            if candidate.get("engine")
            else f"{candidate['backend']}-{candidate['precision']}?"
        )
    return f"{candidate['model']}|{fmt}"


def engine_label(candidate: dict) -> str:
    """'openvino int8 (openvino profile)': bench's label of the rung's engine format."""

    parts = (candidate.get("engine_format") or "").split("-")
    return engine_name(
        {
            "backend": candidate["backend"],
            "precision": candidate["precision"],
            "int8_profile": parts[2] if len(parts) == 3 else None,
        }
    )


def _available(backend: str, precision: str) -> tuple[bool, str]:

    return select_formats(backend, precision)[0].usable()


def _pruned(checkpoint: Path, ratio: float, opts: OptimizeOptions) -> Path:
    """The pruned, fine-tuned checkpoint of one ratio (reused when a previous run made it)."""
    from lggdeploy.models.prune import prune_checkpoint

    folder = _pruned_folder(opts, ratio)
    if (folder / "best.pt").is_file() and (
        folder / "done.json"
    ).is_file():  # its fine-tuning was checked by check_pruned_models
        logger.info(f"optimize: reusing {folder / 'best.pt'}")
        return folder / "best.pt"
    if folder.exists():
        shutil.rmtree(folder)  # a run killed while pruning: start that ratio again
    path = prune_checkpoint(
        checkpoint,
        ratio,
        folder,
        1,
        opts.prune_epochs,
        opts.data,
        opts.prune_lr,
        distill=opts.distill,
        distill_weight=opts.distill_weight,
    )
    write_json_atomic(folder / "done.json", {"ratio": ratio, "sha256": sha256_file(path), "finetune": _finetune(opts)})
    return path


def _pruned_folder(opts: OptimizeOptions, ratio: float) -> Path:
    return opts.out / "pruned" / f"ratio{int(round(ratio * 100))}"


def _finetune(opts: OptimizeOptions) -> dict:
    return {
        "epochs": opts.prune_epochs,
        "lr": opts.prune_lr,
        "distill": opts.distill,
        "distill_weight": opts.distill_weight if opts.distill else None,
    }


def _finetune_flags(finetune: dict) -> str:
    distill = f"--distill --distill-weight {finetune['distill_weight']:g}" if finetune["distill"] else "--no-distill"
    return f"--prune-epochs {finetune['epochs']} --prune-lr {finetune['lr']:g} {distill}"


def judged_with(opts: OptimizeOptions, precision: str, pruned: bool = False) -> dict:
    """What a rung's verdict depends on besides the model and the engine format: the rule (a pruned model is judged as
    the new model it is), the gate's criteria, and for INT8 the calibration and quantization-aware settings (a stricter
    gate, more calibration slices or QAT may change it)."""
    settings = {
        "rule": rule_for(precision, retrained=pruned),
        "max_drop": opts.max_drop,
        "max_patient_drop": opts.max_patient_drop,
        "min_agreement": opts.min_agreement,
    }
    if precision == "int8":
        settings |= {"calib_samples": opts.calib_samples, "qat": opts.qat, "qat_epochs": opts.qat_epochs}
    return settings


def _flags(settings: dict) -> str:
    rule = f"the {settings['rule']} rule, " if "rule" in settings else ""
    return rule + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if k != "rule")


def _with_rule(settings: dict) -> dict:
    """A stored judged_with; one saved before rules were recorded was reached by the fidelity rule (every rung then)."""
    return {"rule": FIDELITY, **settings}


def check_pruned_models(opts: OptimizeOptions) -> None:
    """Before anything is built or ladder.json rewritten: a pruned model of an earlier run that was fine-tuned otherwise
    than this run asks is neither reused nor replaced (nor are its rungs' verdicts). Runs from before this record
    existed left no fine-tuning settings: their models are reused as they are."""
    for ratio in opts.prune_ratios:
        done = _pruned_folder(opts, ratio) / "done.json"
        made = json.loads(done.read_text()).get("finetune") if done.is_file() else None
        if made is not None and "distill_weight" not in made:  # recorded before the weight was a choice: it was 0.5
            made["distill_weight"] = 0.5 if made["distill"] else None
        if made is not None and made != _finetune(opts):
            raise LggError(
                f"{done.parent} was fine-tuned with {_finetune_flags(made)}; this run asks for {_finetune_flags(_finetune(opts))}: "
                "give the same options to resume, or choose another --out"
            )


def _build(
    checkpoint: Path,
    reference: Path,
    backend: str,
    precision: str,
    opts: OptimizeOptions,
    deadline: float | None = None,
    worth_searching=None,
) -> dict:
    from lggdeploy.engines.build import BuildOptions, build_engines

    report = build_engines(
        [checkpoint],
        BuildOptions(
            out_dir=opts.out / "engines",
            data=opts.data,
            backend=backend,
            precision=precision,
            calib_samples=opts.calib_samples,
            max_drop=opts.max_drop,
            max_patient_drop=opts.max_patient_drop,
            min_agreement=opts.min_agreement,
            threads=opts.threads,
            qat=opts.qat,
            qat_epochs=opts.qat_epochs,
            reference=None if checkpoint == reference else reference,
            deadline=deadline,
            worth_searching=worth_searching,
        ),
    )
    if report.failed:
        raise report.failed[0]
    return report.engines[0]


PROBE_ROUNDS = 5
PROBE_MARGIN = 1.10  # a failing INT8 engine this much slower than the fastest passed one is not searched: well above the A/A noise of 1-3 %


def probe_verdict(probe_ms: float, passed_ms: dict[str, float], batch: int) -> str | None:
    """Why a fully quantized engine at `probe_ms` cannot be the fastest, given the passed engines' ms per image; None when it might."""
    if not passed_ms:
        return None
    label, best = min(passed_ms.items(), key=lambda item: item[1])
    if probe_ms < best * PROBE_MARGIN:
        return None
    return (
        f"fully quantized it ran at {probe_ms:.1f} ms/image at batch {batch}, {probe_ms / best:.2f}× the time of {label}, which passed "
        f"({best:.1f} ms; {PROBE_ROUNDS} interleaved rounds): keeping nodes in float or QAT only adds float work, so it cannot be the fastest"
    )


def speed_probe(passed: list[Candidate], opts: OptimizeOptions, probed: Candidate):
    """build's `worth_searching` hook for the INT8 rung `probed`: the failing engine timed beside every engine that passed
    so far; when it cannot win, `probed.beaten_by` names the fastest of them (a rerun reuses the verdict only while that
    engine passes)."""
    if not passed:
        return None

    def worth_searching(open_candidate, val_batch) -> str | None:
        import numpy as np

        from lggdeploy.bench.run import interleaved_times

        x = val_batch(opts.batch)
        runners = []
        try:
            runners.append(open_candidate())
            runners += [open_engine(c.engine, options=RunOptions(threads=opts.threads)) for c in passed]
            for runner in runners:  # warm-up
                runner.infer(x)
            seconds = interleaved_times(
                [functools.partial(r.infer, x) for r in runners], PROBE_ROUNDS, np.random.default_rng(0)
            )
        finally:
            for runner in runners:
                runner.close()
        ms = [float(np.median(s)) * 1000 / len(x) for s in seconds]
        verdict = probe_verdict(
            ms[0], {f"{c.model} {engine_label(asdict(c))}": m for c, m in zip(passed, ms[1:])}, len(x)
        )
        if verdict:
            probed.beaten_by = min(zip(passed, ms[1:]), key=lambda pair: pair[1])[0].key
        return verdict

    return worth_searching


def _record(candidate: Candidate, engine: dict) -> None:
    gate = engine["gate"]
    candidate.status, candidate.engine = "passed", str(Path(engine["engine"]).resolve())
    candidate.val_dice, candidate.val_drop_points = (
        gate["engine_dice"],
        gate.get("total_drop_points", gate["drop_points"]),
    )
    candidate.nodes_kept_in_float = len(gate["nodes_kept_in_float"])
    candidate.qat = bool(engine.get("qat"))
    candidate.build_seconds = engine.get("build_seconds")
    candidate.gate = gate_summary(gate)


GATE_FIELDS = (
    "rule",
    "reference",
    "labels_reference",
    "total_drop_points",
    "criteria",
    "fp32_dice",
    "engine_dice",
    "drop_points",
    "worst_patient",
    "worst_patient_drop_points",
    "min_agreement",
    "min_agreement_patient",
    "passed",
    "failures",
)
PATIENT_FIELDS = ("patient", "fp32_dice", "engine_dice", "drop_points", "agreement", "fp32_detected", "engine_detected")


def gate_summary(gate: dict | None) -> dict:
    """What ladder.json keeps of a gate record: the verdict, its figures and the per-patient rows (not the fallback
    ranking); a retrained model's quantized rung keeps its second verdict (against the unpruned model) the same way."""
    if not gate:
        return {}
    return {
        **{k: gate.get(k) for k in GATE_FIELDS},
        "per_patient": [{k: row.get(k) for k in PATIENT_FIELDS} for row in gate.get("per_patient", [])],
        "labels": gate_summary(gate.get("labels")) or None,
    }


def _rejudged(previous: dict, settings: dict, precision: str) -> dict | None:
    """A stored verdict judged again under other gate criteria from its per-patient rows, without a rebuild; None when
    that needs a rebuild. Only a rung built without a search can be: FP32, FP16 and BF16 engines are the same engine
    under any criteria, while an INT8 rung's fallback and QAT depend on them (and its calibration on the engine). A rung
    that now passes is reused only if it passed before (a failed rung wrote no engine); one that now fails is settled."""
    result = _stored_result(previous, settings, precision)
    if result is None:
        return None
    failures = result.failures()
    if not failures and not (previous["status"] == "passed" and Path(previous["engine"] or "").is_file()):
        return None
    rejudged = dict(
        previous,
        judged_with=settings,
        gate={
            **previous["gate"],
            "rule": result.rule_name,
            "total_drop_points": result.total_drop_points,
            "criteria": result.criteria.to_json(),
            "passed": not failures,
            "failures": failures,
        },
    )
    logger.info(
        f"optimize: {engine_label(previous)} of {previous['model']}, judged with {_flags(previous['judged_with'])}, "
        f"judged again from its stored per-patient rows with {_flags(settings)}: {'passed' if not failures else 'failed'}"
    )
    rejudged["reason"] = "; ".join([*failures, f"judged again from stored rows with {_flags(settings)}"])
    if failures:
        rejudged.update(status="failed gate", engine=None)
    return rejudged


def _stored_result(previous: dict, settings: dict, precision: str):
    """The GateResult that a stored verdict's rows give under `settings` (rule and criteria), or None when its rows
    cannot: an INT8 rung, rows without agreement, or rows measured against another model than the rule asks (a pruned
    model's BF16 rung judged for fidelity to the unpruned model before the rules: its fidelity to the pruned one was
    never measured)."""
    from lggdeploy.engines.precision.gate import GateResult

    gate = previous.get("gate") or {}
    rows = gate.get("per_patient")
    if precision == "int8" or not rows or any(row.get("agreement") is None for row in rows):
        return None
    rule, before = settings["rule"], _with_rule(previous["judged_with"])["rule"]
    criteria = GateCriteria(settings["max_drop"], settings["max_patient_drop"], settings["min_agreement"])
    if rule == RETRAINED_QUANTIZED:
        labels_rows = (gate.get("labels") or {}).get("per_patient")
        if before != rule or not labels_rows:
            return None
        result = GateResult(criteria, rows, False)
        result.labels = GateResult(criteria, labels_rows, False, LABELS_TOTAL)
        return result
    if rule == LABELS and before not in (LABELS, FIDELITY):
        return None
    return GateResult(criteria, rows, False, rule)  # a pruned FP32 rung's rows were always against the unpruned model


def walk_ladder(checkpoint: Path, checkpoint_sha256: str, opts: OptimizeOptions, state: dict) -> list[Candidate]:
    """Build (or reuse) every candidate; `state` is the saved ladder of a previous run, updated as we go."""
    return _Ladder(checkpoint, checkpoint_sha256, opts, state).walk()


class _Ladder:
    """One walk of the ladder: for the unpruned model and each pruning ratio, every (backend, precision) rung in turn,
    each judged, reused from a previous run, or skipped with its reason; ladder.json saved after every rung."""

    def __init__(self, checkpoint: Path, checkpoint_sha256: str, opts: OptimizeOptions, state: dict):
        self.checkpoint, self.checkpoint_sha256, self.opts, self.state = checkpoint, checkpoint_sha256, opts, state
        self.deadline = None if opts.budget_minutes is None else time.monotonic() + opts.budget_minutes * 60
        self.candidates: list[Candidate] = []
        self.failed_ratio = None  # the smallest pruning ratio whose FP32 engine failed the gate

    def walk(self) -> list[Candidate]:
        for ratio in (None, *sorted(self.opts.prune_ratios)):
            name = "unpruned" if ratio is None else f"pruned {int(round(ratio * 100))}%"
            if ratio is not None and not self.worth_pruning(name):
                continue
            path = self.checkpoint if ratio is None else _pruned(self.checkpoint, ratio, self.opts)
            self.climb(name, path, ratio)
        return self.candidates

    def worth_pruning(self, name: str) -> bool:
        """Not when a smaller ratio already failed at FP32 (a larger one on the same fine-tuning budget loses more),
        nor past the budget: its rungs are listed with the reason."""
        if self.failed_ratio is not None:
            reason = f"pruning {int(round(self.failed_ratio * 100))}% already fails the gate at FP32"
            self.candidates.extend(Candidate(name, "", b, p, "skipped", reason) for b, p in self.opts.ladder)
        elif self.over_budget():
            self.candidates.extend(Candidate(name, "", b, p, "not tried (budget)") for b, p in self.opts.ladder)
        else:
            return True
        self.save()
        return False

    def climb(self, name: str, path: Path, ratio: float | None) -> None:
        fp32_failed = False
        for backend, precision in self.opts.ladder:
            candidate = Candidate(name, str(Path(path).resolve()), backend, precision)
            self.candidates.append(candidate)
            self.judge(candidate, path, fp32_failed, pruned=ratio is not None)
            if precision == "fp32" and candidate.status == "failed gate":
                fp32_failed = True  # every backend's FP32 engine runs the same model: one failing FP32 settles it
                if ratio is not None:
                    self.failed_ratio = ratio
            self.save()

    def judge(self, candidate: Candidate, path: Path, fp32_failed: bool, pruned: bool = False) -> None:
        opts, precision = self.opts, candidate.precision
        candidate.judged_with = judged_with(opts, precision, pruned)
        previous = self.previous_verdict(candidate)
        ok, reason = _available(candidate.backend, precision)
        if not ok:
            candidate.status, candidate.reason = "unavailable", reason
        elif fp32_failed:
            candidate.status = "skipped"
            candidate.reason = "its FP32 engine already fails the gate against the unpruned model"
        elif self.reusable(previous):
            for key, value in previous.items():
                setattr(candidate, key, value)
            stored = previous.get("judged_with")  # None: a ladder from before the record
            candidate.judged_with = _with_rule(stored) if stored else {}
            if not candidate.reason.endswith("(reused)"):
                candidate.reason = (candidate.reason + " (reused)").strip()
        elif self.over_budget():
            candidate.status, candidate.reason = "not tried (budget)", f"--budget-minutes {opts.budget_minutes} spent"
        else:
            self.build(candidate, path)

    def previous_verdict(self, candidate: Candidate) -> dict | None:
        """The previous run's verdict on this rung; one reached under other criteria is judged again from its stored
        rows where that is possible (else None: built again)."""
        previous = self.state.get(candidate.key)
        if not (previous and previous["status"] in SETTLED and previous.get("judged_with")):
            return previous
        if _with_rule(previous["judged_with"]) == candidate.judged_with:
            return previous
        rejudged = _rejudged(previous, candidate.judged_with, candidate.precision)
        if rejudged is None:
            logger.info(
                f"optimize: {candidate.model} {engine_label(previous)} was judged with "
                f"{_flags(previous['judged_with'])}; judging it again with {_flags(candidate.judged_with)}"
            )
        return rejudged

    def build(self, candidate: Candidate, path: Path) -> None:
        opts = self.opts
        probe = None
        if candidate.precision == "int8" and not opts.search_all:
            probe = speed_probe([c for c in self.candidates if c.status == "passed"], opts, candidate)
        try:
            built = _build(
                path,
                self.checkpoint,
                candidate.backend,
                candidate.precision,
                opts,
                self.deadline,
                worth_searching=probe,
            )
            _record(candidate, built)
        except SearchStopped as exc:  # not "failed gate": a later run with more time searches again
            candidate.status, candidate.reason = "stopped (budget)", str(exc)
        except CannotWin as exc:
            candidate.status, candidate.reason, candidate.gate = "cannot win", str(exc), gate_summary(exc.gate)
        except GateFailed as exc:
            candidate.status, candidate.reason, candidate.gate = "failed gate", str(exc), gate_summary(exc.gate)

    def reusable(self, previous: dict | None) -> bool:
        """A settled verdict a rerun takes as it is: a pass whose engine is still there, a failed gate, and a
        cannot-win while the engine that beat it passes in this run (never under --search-all)."""
        if not previous or previous["status"] not in SETTLED:
            return False
        if previous["status"] == "passed":
            return Path(previous["engine"] or "").is_file()
        if previous["status"] == "cannot win":
            passed = {c.key for c in self.candidates if c.status == "passed"}
            return not self.opts.search_all and previous.get("beaten_by") in passed
        return True

    def over_budget(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def save(self) -> None:
        write_json_atomic(
            self.opts.out / "ladder.json",
            {
                "checkpoint": str(self.checkpoint),
                "checkpoint_sha256": self.checkpoint_sha256,
                "export_graph": EXPORT_GRAPH,
                "paths": PATHS_RELATIVE,
                "candidates": [_stored(asdict(c), self.opts.out) for c in self.candidates],
            },
        )


def pareto_front(candidates: list[Candidate], batch: int) -> list[Candidate]:
    """Passed candidates not beaten by another at once in latency (batch `batch`) and val Dice."""
    timed = [c for c in candidates if c.status == "passed" and str(batch) in c.latency_ms_per_image]
    front = []
    for c in timed:
        beaten = any(
            o is not c
            and o.latency_ms_per_image[str(batch)] <= c.latency_ms_per_image[str(batch)]
            and o.val_dice >= c.val_dice
            and (o.latency_ms_per_image[str(batch)] < c.latency_ms_per_image[str(batch)] or o.val_dice > c.val_dice)
            for o in timed
        )
        if not beaten:
            front.append(c)
    return sorted(front, key=lambda c: c.latency_ms_per_image[str(batch)])


def _time(candidates: list[Candidate], checkpoint: Path, opts: OptimizeOptions) -> tuple[dict, dict]:
    """One bench run over every engine that passed (and the PyTorch references, A/A row): latency side by side, and
    each engine's test Dice with its drop against the unpruned PyTorch FP32 model on the same test patients. Returns
    the bench results and that model's PyTorch row ({} when it was not timed)."""
    from lggdeploy.bench.run import BenchOptions, run_bench

    engines = opts.out / "engines"
    results = run_bench(
        BenchOptions(
            engines_dir=engines,
            data=opts.data,
            split="test",
            batch_sizes=opts.batch_sizes,
            iters=opts.iters,
            threads=opts.threads,
        )
    )
    by_engine = {str(Path(r["engine"]).resolve()): r for r in results["rows"] if not r["aa"]}
    torch_row = _pytorch_row(results, checkpoint) or {}
    reference = {p["patient"]: p["dice"] for p in torch_row.get("per_patient") or []}
    for c in candidates:
        row = by_engine.get(str(Path(c.engine).resolve())) if c.engine else None
        if row and row["status"] == "ok":
            c.latency_ms_per_image = _ms_per_image(row)
            c.test = {
                "mean_patient_dice": row.get("mean_patient_dice"),
                "patients": row.get("patients"),
                "patients_missed": row.get("patients_missed"),
                **drop_on_test(reference, {p["patient"]: p["dice"] for p in row.get("per_patient") or []}),
            }
    return results, torch_row


def drop_on_test(reference: dict[str, float], engine: dict[str, float]) -> dict:
    """Mean and worst per-patient Dice drop (points) of an engine against the reference on the patients both scored."""
    drops = {p: 100 * (reference[p] - engine[p]) for p in engine if p in reference}
    if not drops:
        return {}
    worst = max(drops, key=drops.get)
    return {
        "drop_points": sum(drops.values()) / len(drops),
        "worst_patient": worst,
        "worst_patient_drop_points": drops[worst],
    }


def _pytorch_row(results: dict, checkpoint: Path) -> dict | None:
    """The unpruned model's PyTorch eager FP32 reference row of a bench run."""
    return next(
        (
            r
            for r in results["rows"]
            if r["status"] == "ok"
            and r["backend"] == "torch"
            and r["precision"] == "fp32"
            and not r["aa"]
            and Path(r["engine"]).resolve() == checkpoint.resolve()
        ),
        None,
    )


def _ms_per_image(row: dict) -> dict[str, float]:
    """A bench row's median ms per image, per batch size ({} for no row)."""
    return {b: s["p50_ms"] / int(b) for b, s in row.get("latency", {}).items()}


def optimize(checkpoint: Path, opts: OptimizeOptions) -> dict:
    """The fastest engine that keeps accuracy: walk the ladder (resuming --out's), time what passed side by side,
    choose, write optimize.json / optimize.md / the plot / chosen/."""
    from lggdeploy.models.checkpoint import load_checkpoint

    opts.validate()
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    ensure_folder(opts.out)
    checkpoint_sha256 = sha256_file(checkpoint)
    state = _previous_ladder(checkpoint, checkpoint_sha256, opts)
    started = time.perf_counter()
    check_pruned_models(opts)
    candidates = walk_ladder(checkpoint, checkpoint_sha256, opts, state)
    if not any(c.status == "passed" for c in candidates):
        raise GateFailed(f"no candidate kept accuracy within {opts.max_drop} points; see {opts.out / 'ladder.json'}")
    results, torch_row = _time(candidates, checkpoint, opts)
    torch_ms = _ms_per_image(torch_row)
    for c in candidates:
        c.speedup_vs_pytorch = {k: torch_ms[k] / v for k, v in c.latency_ms_per_image.items() if k in torch_ms}
    front = pareto_front(candidates, opts.batch)
    b = str(opts.batch)
    chosen = min(
        (c for c in candidates if c.status == "passed" and b in c.latency_ms_per_image),
        key=lambda c: c.latency_ms_per_image[b],
    )
    summary = {
        "format": "lggdeploy-optimize",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": checkpoint_sha256,
        "model": ckpt["model"]["name"],
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "criteria": {
            **GateCriteria(opts.max_drop, opts.max_patient_drop, opts.min_agreement).to_json(),
            "against": "the unpruned PyTorch FP32 model, val split",
            "rules": {rule: RULES[rule] for rule in sorted({c.judged_with.get("rule", FIDELITY) for c in candidates})},
        },
        "candidates": [asdict(c) for c in candidates],
        "front": [c.key for c in front],
        "chosen": asdict(chosen),
        "chosen_vs_onnxruntime_fp32": _vs_onnxruntime_fp32(candidates, chosen),
        "pytorch_fp32_ms_per_image": torch_ms,
        "pytorch_fp32_test": {k: torch_row.get(k) for k in ("mean_patient_dice", "patients")},
        "noise_floor": results["noise_floor"],
        "machine": results["machine"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    _write_outputs(summary, candidates, front, chosen, opts)
    return summary


def _previous_ladder(checkpoint: Path, checkpoint_sha256: str, opts: OptimizeOptions) -> dict:
    """The verdicts of a previous run in --out, by candidate key ({} for a new run, or engines of an older export
    form, which are rebuilt; pruned checkpoints are still reused). Another checkpoint's run there is refused."""
    ladder_file = opts.out / "ladder.json"
    if not ladder_file.is_file():
        return {}
    saved = json.loads(ladder_file.read_text())
    if saved.get("checkpoint_sha256"):
        same = saved["checkpoint_sha256"] == checkpoint_sha256
    else:
        same = saved.get("checkpoint") == str(checkpoint)
    if not same:
        other = saved.get("checkpoint")
        if other == str(checkpoint):
            other = "another version of it (its sha256 differs)"
        raise LggError(f"{opts.out} holds the optimization of {other}, not {checkpoint}: choose another --out")
    if saved.get("export_graph", 1) != EXPORT_GRAPH:
        logger.info(f"{ladder_file}: its engines come from an older ONNX export form; building them again")
        return {}
    loaded = [_loaded(c, opts.out, saved.get("paths") == PATHS_RELATIVE) for c in saved["candidates"]]
    return {candidate_key(c): c for c in loaded}


def _vs_onnxruntime_fp32(candidates: list[Candidate], chosen: Candidate) -> dict | None:
    """The chosen engine's speed-up over the unpruned ONNX Runtime FP32 engine, per batch size (None if untimed)."""
    ort = next(
        (
            c
            for c in candidates
            if c.model == "unpruned" and c.backend == "onnxruntime" and c.precision == "fp32" and c.latency_ms_per_image
        ),
        None,
    )
    if ort is None:
        return None
    timed = ort.latency_ms_per_image
    return {k: timed[k] / v for k, v in chosen.latency_ms_per_image.items() if k in timed}


def _write_outputs(
    summary: dict, candidates: list[Candidate], front: list[Candidate], chosen: Candidate, opts: OptimizeOptions
) -> None:
    from lggdeploy.engines.formats import read_manifest, write_manifest

    stored = {
        "candidates": [_stored(c, opts.out) for c in summary["candidates"]],
        "chosen": _stored(summary["chosen"], opts.out),
        "paths": PATHS_RELATIVE,
    }
    write_json_atomic(opts.out / "optimize.json", summary | stored)  # as ladder.json: paths inside --out relative to it
    write_text_atomic(opts.out / "optimize.md", markdown(summary))
    _plot(candidates, front, chosen, opts)
    folder = ensure_folder(opts.out / "chosen")
    for old in folder.iterdir():
        old.unlink()
    engine = Path(chosen.engine)
    manifest = read_manifest(engine)
    target = folder / engine.name
    shutil.copyfile(engine, target)
    twin = (manifest.get("portable_qdq") or {}).get("file")
    if twin and twin != engine.name and (engine.parent / twin).is_file():
        shutil.copyfile(engine.parent / twin, folder / twin)
    optimize_record = {
        "found_by": "lggdeploy optimize: fastest candidate that passed its gate (rule in judged_with)",
        "batch": opts.batch,
        "latency_ms_per_image": chosen.latency_ms_per_image,
        "speedup_vs_pytorch": summary["chosen"]["speedup_vs_pytorch"],
        "speedup_vs_onnxruntime_fp32": summary["chosen_vs_onnxruntime_fp32"],
        "candidates": len(candidates),
        "judged_with": chosen.judged_with,  # the criteria of the choice (the build's gate record above may be another run's)
        "report": "../optimize.json",  # relative to this folder
    }
    write_manifest(target, manifest.with_details(optimize=optimize_record))


def _fmt(value, digits=2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _test_cell(test: dict) -> str:
    return (
        f"{_fmt(test.get('mean_patient_dice'), 4)} ({test.get('patients')})"
        if test.get("mean_patient_dice") is not None
        else "—"
    )


def markdown(summary: dict) -> str:
    """optimize.md: one row per rung (the reference first), why a rung did not pass below it, then the choice."""
    b_list = [str(b) for b in summary["options"]["batch_sizes"]]
    head = ["model", "engine", "rule", "status", "val Dice/patient", "val drop (pts)", "nodes in float", "QAT"]
    head += [f"ms/img b{b}" for b in b_list] + [f"× PyTorch b{b}" for b in b_list]
    head += ["test Dice/patient (n)", "test drop (pts): mean, worst patient"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    torch_ms = summary["pytorch_fp32_ms_per_image"]
    reference = ["unpruned", "PyTorch eager FP32 [reference]", "—", "timed", "—", "—", "—", "—"]
    reference += [_fmt(torch_ms.get(b)) for b in b_list] + ["1.00" for _ in b_list]
    reference += [_test_cell(summary.get("pytorch_fp32_test") or {}), "—"]
    lines.append("| " + " | ".join(reference) + " |")
    notes: list[str] = []  # why a rung did not pass, in full below the table (a table cell would cut it)
    for c in summary["candidates"]:
        lines.append("| " + " | ".join(_candidate_cells(c, summary, b_list, notes)) + " |")
    if notes:
        lines += [""] + [f"{note}  " for note in notes]
    return "\n".join(lines + [""] + _choice_notes(summary)) + "\n"


def _candidate_cells(c: dict, summary: dict, b_list: list[str], notes: list[str]) -> list[str]:
    key = candidate_key(c)
    mark = (
        " **[chosen]**" if key == candidate_key(summary["chosen"]) else (" [front]" if key in summary["front"] else "")
    )
    test = c["test"] or {}
    status = c["status"]
    if c["status"] != "passed" and c["reason"]:
        # the gate's own lines, not its message's head
        failures = (c.get("gate") or {}).get("failures") if c["status"] == "failed gate" else None
        why = c["reason"]
        if failures:
            why = "; ".join(failures) + (" (reused)" if c["reason"].endswith("(reused)") else "")
        notes.append(f"[{len(notes) + 1}] {c['model']}, {engine_label(c)}: {why}")
        status += f" [{len(notes)}]"
    cells = [
        c["model"],
        f"{engine_label(c)}{mark}",
        _with_rule(c.get("judged_with") or {})["rule"],
        status,
        _fmt(c["val_dice"], 4),
        _fmt(c["val_drop_points"]),
        "—" if c["nodes_kept_in_float"] is None else str(c["nodes_kept_in_float"]),
        "yes" if c["qat"] else "",
    ]
    cells += [_fmt(c["latency_ms_per_image"].get(b)) for b in b_list]
    cells += [_fmt(c["speedup_vs_pytorch"].get(b)) for b in b_list]
    cells.append(_test_cell(test))
    if "drop_points" in test:
        cells.append(f"{test['drop_points']:.2f}, {test['worst_patient_drop_points']:.2f} ({test['worst_patient']})")
    else:
        cells.append("—")
    return cells


def _choice_notes(summary: dict) -> list[str]:
    noise, chosen, criteria = summary["noise_floor"], summary["chosen"], summary["criteria"]
    cpu = summary["machine"].get("cpu", {})
    versus = summary["chosen_vs_onnxruntime_fp32"]
    worst = noise["worst_deviation"]
    return [
        f"Chosen: {chosen['model']} {engine_label(chosen)} — fastest candidate at batch {summary['options']['batch']} "
        f"that passed its gate (mean val per-patient Dice drop ≤ {criteria['max_mean_drop_points']} points, worst "
        f"patient ≤ {criteria['max_patient_drop_points']}, mask agreement ≥ {criteria['min_agreement']}, "
        f"{criteria['against']}; val drop in the table: against the unpruned model).",
        *(f"Rule {rule}: {text}." for rule, text in (criteria.get("rules") or {}).items()),
        "Speed-ups vs ONNX Runtime FP32 (unpruned): "
        + (", ".join(f"b{b} {v:.2f}×" for b, v in versus.items()) if versus else "—"),
        "A/A noise floor (the PyTorch reference timed twice): worst deviation "
        f"{_fmt(worst * 100 if worst is not None else None, 1)} %"
        + (" — WARNING: noisy run" if noise["warning"] else ""),
        f"Latency: medians over {summary['options']['iters']} interleaved rounds; machine: {cpu_line(cpu)}; "
        f"{summary['created']}. Test Dice: the test split (n patients in brackets; the choice uses val only); "
        "test drop: against the unpruned PyTorch FP32 model on the same test patients, mean and worst patient, no "
        "interval (`lggdeploy bench` gives the paired one where n allows).",
    ]


def _plot(candidates: list[Candidate], front: list[Candidate], chosen: Candidate, opts: OptimizeOptions) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return

    b = str(opts.batch)
    timed = [c for c in candidates if c.status == "passed" and b in c.latency_ms_per_image]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in timed:
        ax.scatter(
            c.latency_ms_per_image[b],
            c.val_dice,
            marker="o" if c.model == "unpruned" else "s",
            color="tab:red" if c is chosen else "tab:blue",
        )
        ax.annotate(
            f"{c.model}\n{engine_label(asdict(c))}",
            (c.latency_ms_per_image[b], c.val_dice),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    if front:
        ax.plot(
            [c.latency_ms_per_image[b] for c in front],
            [c.val_dice for c in front],
            "--",
            color="gray",
            label="Pareto front",
        )
    ax.set_xlabel(f"ms per image, batch {b}")
    ax.set_ylabel("val mean per-patient Dice")
    ax.set_title("optimize: candidates that passed the gate (red: chosen)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(opts.out / "front.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

"""The `lggdeploy` command line: parses options, calls the library, prints. No logic lives here."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape as rich_escape
from typer.core import TyperGroup

from lggdeploy.backends.base import describe_backends
from lggdeploy.bench.options import DEFAULTS as BENCH
from lggdeploy.bench.options import HELP as BENCH_HELP
from lggdeploy.common.errors import GateFailed, LggError
from lggdeploy.common.options import check_options
from lggdeploy.engines.options import DEFAULTS as BUILD
from lggdeploy.engines.options import HELP as BUILD_HELP
from lggdeploy.engines.precision.criteria import DEFAULT_CRITERIA as CRITERIA
from lggdeploy.engines.precision.criteria import HELP as GATE_HELP
from lggdeploy.models.config import option_help
from lggdeploy.optimize_options import DEFAULTS as OPTIMIZE
from lggdeploy.optimize_options import HELP as OPTIMIZE_HELP
from lggdeploy.serve.server import DEFAULTS as SERVE
from lggdeploy.serve.server import HELP as SERVE_HELP


class OneLineErrors(TyperGroup):
    """A command line the parser refuses (a wrong type, an unknown option, a missing argument) is one line on stderr
    and exit 2, like every other user mistake; `--help` and a bare `lggdeploy` still print the help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from typer._click import exceptions

        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except exceptions.NoArgsIsHelpError as exc:
            exc.show()
            rv = 0
        except exceptions.ClickException as exc:
            where = exc.ctx.command_path if getattr(exc, "ctx", None) else "lggdeploy"
            sys.stderr.write(f"error: {exc.format_message()} (`{where} --help` lists the options)\n")
            if not standalone_mode:
                raise
            sys.exit(exc.exit_code)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    cls=OneLineErrors,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Brain-MRI LGG segmentation: data, training, evaluation.",
)
data_app = typer.Typer(no_args_is_help=True, help="Check, describe, synthesize and split kaggle_3m-layout data.")
app.add_typer(data_app, name="data")
# Wide enough for the metric tables when output goes to a file or CI log (rich would assume 80 columns).
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


# The gate's flags, shared by build and optimize; their defaults live in engines/precision/criteria.py.
MaxDrop = Annotated[float, typer.Option(help=GATE_HELP["max_drop"])]
MaxPatientDrop = Annotated[float, typer.Option(help=GATE_HELP["max_patient_drop"])]
MinAgreement = Annotated[float, typer.Option(help=GATE_HELP["min_agreement"])]

SPLIT_COLUMNS = [
    ("split", "split"),
    ("patients", "patients"),
    ("slices", "slices"),
    ("tumor_slices", "tumor slices"),
    ("tumor_fraction", "tumor fraction"),
]


class _ToConsole(logging.Handler):
    """The library logs; the CLI shows its INFO and above on stderr, through the console the progress bars draw on
    (so a line never tears a bar), warnings and errors marked."""

    MARKS = {logging.WARNING: ("warning: ", "yellow"), logging.ERROR: ("error: ", "red")}

    def emit(self, record: logging.LogRecord) -> None:
        from rich.text import Text

        from lggdeploy.common.progress import console

        mark, style = self.MARKS.get(min(record.levelno, logging.ERROR), ("", ""))
        line = Text(mark, style=style) + Text(record.getMessage()) if mark else Text(record.getMessage())
        console.print(line, highlight=False, soft_wrap=True)


def show_library_log() -> None:
    """Once per process: lggdeploy's log records (INFO and above) reach the terminal."""
    library = logging.getLogger("lggdeploy")
    if not any(isinstance(h, _ToConsole) for h in library.handlers):
        library.addHandler(_ToConsole())
        library.setLevel(logging.INFO)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` runs: temporary files and build folders go."""


def _terminate(signum, frame):
    raise Terminated()


def friendly(func):
    """A user's mistake becomes one line on stderr and exit code 2; Ctrl-C exits 130 and SIGTERM 143, without a
    traceback and without leftovers (temporary files are removed on the way out)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        show_library_log()
        for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is shown escaped, never a traceback
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(errors="backslashreplace")
        previous = (
            signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
        )
        try:
            kwargs = check_options(func.__name__, kwargs)  # every numeric option's range, before any work
            return func(*args, **kwargs)
        except LggError as exc:
            # escaped: a message may hold brackets (pip install 'lggdeploy[qat]') that rich would take for markup
            err.print(f"[red]error:[/] {rich_escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted: files already written are intact (they are replaced atomically)")
            raise typer.Exit(130) from None
        except Terminated:
            err.print("terminated: files already written are intact (they are replaced atomically)")
            raise typer.Exit(143) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def print_machine_text(text: str) -> None:
    """CSV, markdown and JSON go to stdout as they are: never wrapped or styled like the screen tables."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


@data_app.command("check")
@friendly
def data_check(folder: Path = typer.Argument(..., help="kaggle_3m folder (one sub-folder per patient)")):
    """Validate every file; list all problems, each with its file. Exit 1 if anything is wrong."""
    from lggdeploy.common.progress import progress_bar
    from lggdeploy.data.kaggle import check_dataset, scan

    dataset, _ = scan(folder)
    with progress_bar() as bar:
        task = bar.add_task("checking", total=dataset.num_slices, info="")
        dataset, problems = check_dataset(folder, on_file=lambda: bar.advance(task))
    for problem in problems:
        out.print(str(problem), highlight=False, soft_wrap=True)
    if problems:
        err.print(f"[red]{len(problems)} problem(s)[/] in {folder}")
        raise typer.Exit(1)
    out.print(f"ok: {len(dataset.patients)} patients, {dataset.num_slices} slices, every file valid")


@data_app.command("info")
@friendly
def data_info(
    folder: Path = typer.Argument(..., help="kaggle_3m folder"),
    split_file: Path | None = typer.Option(
        None, "--split-file", help="split JSON (default: the split `data split` would make with --seed)"
    ),
    seed: int = typer.Option(0, help="seed of the default split"),
):
    """Patients, slices and tumor fraction per split."""
    from lggdeploy.common.tables import rich_table
    from lggdeploy.data.kaggle import load_dataset
    from lggdeploy.data.split import load_split, make_split

    dataset = load_dataset(folder)
    split = load_split(split_file) if split_file else make_split(dataset, seed=seed)
    split.check_against(dataset, origin=str(split_file or "split"))
    if not split.tumor_slices:
        split.with_counts(dataset)
    out.print(
        rich_table(
            split.summary_rows(),
            SPLIT_COLUMNS,
            title=f"{folder}: {len(dataset.patients)} patients, {dataset.num_slices} slices",
        )
    )


@data_app.command("synth")
@friendly
def data_synth(
    folder: Path = typer.Argument(..., help="new folder for the phantom set"),
    patients: int = typer.Option(8, help="number of phantom patients"),
    min_slices: int = typer.Option(16, help="fewest slices per patient"),
    max_slices: int = typer.Option(24, help="most slices per patient"),
    seed: int = typer.Option(0),
):
    """Write synthetic phantom patients in the kaggle_3m layout."""
    from lggdeploy.common.progress import progress_bar
    from lggdeploy.data.phantom import check_target, synthesize

    check_target(folder, patients, (min_slices, max_slices))
    with progress_bar() as bar:
        task = bar.add_task("synthesizing", total=patients, info="")
        ids = synthesize(
            folder,
            patients=patients,
            slices=(min_slices, max_slices),
            seed=seed,
            on_patient=lambda pid: bar.advance(task),
        )
    out.print(f"wrote {len(ids)} phantom patients to {folder}")


@data_app.command("split")
@friendly
def data_split(
    folder: Path = typer.Argument(..., help="kaggle_3m folder"),
    output: Path | None = typer.Option(
        None, "-o", "--out", help="split JSON to write (default split.json; with --folds a folder, default folds/)"
    ),
    seed: int = typer.Option(0),
    ratios: str = typer.Option("0.7,0.15,0.15", help="train,val,test fractions of patients"),
    folds: int | None = typer.Option(
        None,
        help="K-fold cross-validation instead: K split files fold-k-of-K.json in the folder --out "
        "(default folds/); every patient is tested once, val is the --ratios val share",
    ),
):
    """Patient-level train/val/test split, deterministic from --seed, written as JSON (or K of them with --folds)."""
    from lggdeploy.common.tables import rich_table
    from lggdeploy.data.kaggle import load_dataset
    from lggdeploy.data.split import make_folds, make_split, save_folds, save_split

    parts = ratios  # parsed and range-checked by check_options
    if len(parts) != 3:
        raise LggError(f"--ratios {','.join(map(str, parts))}: give exactly three fractions (train,val,test)")
    if folds is not None:
        target = output or Path("folds")
        splits = make_folds(load_dataset(folder), folds=folds, seed=seed, val_ratio=parts[1])
        rows = []
        for split, path in zip(splits, save_folds(splits, target)):
            rows += [{**row, "split": f"{path.name} {row['split']}"} for row in split.summary_rows()]
        out.print(
            rich_table(rows, SPLIT_COLUMNS, title=f"{folds} folds written to {target}/ (every patient tested once)")
        )
        return
    output = output or Path("split.json")
    split = make_split(load_dataset(folder), seed=seed, ratios=parts)
    save_split(split, output)
    out.print(rich_table(split.summary_rows(), SPLIT_COLUMNS, title=f"split written to {output}"))


@app.command("presets")
def presets():
    """The model presets of the study."""
    from lggdeploy.common.tables import rich_table
    from lggdeploy.models.presets import PRESETS

    rows = [
        {
            "name": s.name,
            "arch": s.arch,
            "encoder": s.encoder,
            "weights": s.encoder_weights or "random",
            "study": s.study_test_dice,
        }
        for s in PRESETS.values()
    ]
    cols = [
        ("name", "preset"),
        ("arch", "architecture"),
        ("encoder", "encoder"),
        ("weights", "default encoder weights"),
        ("study", "study test Dice (per-slice)"),
    ]
    out.print(rich_table(rows, cols))


def _flag(table: dict, name: str, kind, *decls: str):
    """An option whose help lives beside its default (engines/options.py, bench/options.py, optimize_options.py)."""
    return Annotated[kind, typer.Option(*decls, help=table[name])]


def _train_option(name: str, kind, *decls: str):
    """A train option whose help (and default shown) is TrainConfig's: one home for each (models/config.py)."""
    return Annotated[kind, typer.Option(*decls, help=option_help(name))]


@app.command("train")
@friendly
def train_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="preset (pspnet-scratch, pspnet-resnext50, unet-effb7) or ARCH:ENCODER")],
    data: Annotated[Path, typer.Option("--data", help="kaggle_3m folder")],
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="run folder (default runs/<model>)")] = None,
    epochs: _train_option("epochs", int | None) = None,
    batch_size: _train_option("batch_size", int | None) = None,
    lr: _train_option("lr", float | None) = None,
    img_size: _train_option("img_size", int | None) = None,
    seed: _train_option("seed", int | None) = None,
    device: _train_option("device", str) = "auto",
    split_file: _train_option("split_file", Path | None) = None,
    encoder_weights: _train_option("encoder_weights", str | None) = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from last.pt, with its own settings")] = False,
    augment: _train_option("augment", bool | None, "--augment/--no-augment") = None,
    precision: _train_option("precision", str | None) = None,
    loss: _train_option("loss", str | None) = None,
    tumor_fraction: _train_option("tumor_fraction", float | None) = None,
    warmup_epochs: _train_option("warmup_epochs", float | None) = None,
    ema: _train_option("ema_decay", float | None, "--ema") = None,
    tune_threshold: _train_option("tune_threshold", bool | None, "--tune-threshold/--no-tune-threshold") = None,
    threshold: _train_option("threshold", float | None) = None,
    budget_minutes: _train_option("budget_minutes", float | None) = None,
    missing_modality: _train_option("missing_modality", float | None) = None,
    normalization: _train_option("normalization", str | None) = None,
    bn_momentum: _train_option("bn_momentum", float | None) = None,
    crop_size: _train_option("crop_size", int | None) = None,
    aux_weight: _train_option("aux_weight", float | None) = None,
    postprocess: _train_option("postprocess", str | None) = None,
):  # fmt: skip
    """Train a model; keeps best.pt (validation per-patient Dice) and last.pt."""
    from lggdeploy.models.train import TrainConfig, train

    cfg = TrainConfig.from_flags(
        model, data, out_dir, device, resume,
        epochs=epochs, batch_size=batch_size, lr=lr, img_size=img_size, seed=seed, split_file=split_file,
        encoder_weights=encoder_weights, augment=augment, precision=precision, loss=loss,
        tumor_fraction=tumor_fraction, warmup_epochs=warmup_epochs, ema_decay=ema, tune_threshold=tune_threshold,
        threshold=threshold, budget_minutes=budget_minutes, postprocess=postprocess,
        missing_modality=missing_modality, normalization=normalization, bn_momentum=bn_momentum,
        crop_size=crop_size, aux_weight=aux_weight,
    )  # fmt: skip
    out.print(_train_summary(train(cfg)))


def _train_summary(result) -> str:
    from lggdeploy.postprocess import PostProcess

    best = result.best
    line = f"best epoch {best['epoch']}: validation mean per-patient Dice {best['val_mean_patient_dice']:.4f}"
    if "threshold" in best:
        line += f" (threshold tuned to {best['threshold']}: {best['val_mean_patient_dice_tuned_threshold']:.4f})"
    if "val_mean_patient_dice_postprocessed" in best:
        rule = PostProcess.from_json(best["postprocess"]).describe()
        line += f" (post-processing {rule}: {best['val_mean_patient_dice_postprocessed']:.4f})"
    return (
        line
        + f" ({result.seconds:.0f} s); checkpoint {result.best_path}, curves {result.best_path.parent / 'curves.png'}"
    )


@app.command("eval")
@friendly
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="checkpoint from `lggdeploy train`"),
    data: Path = typer.Option(..., "--data", help="kaggle_3m folder"),
    split: str = typer.Option("test", help="test, val, train or all"),
    split_file: Path | None = typer.Option(None, help="split JSON (default: the one embedded in the checkpoint)"),
    json_out: Path | None = typer.Option(None, "--out", "-o", help="summary JSON (default: next to the checkpoint)"),
    batch_size: int = typer.Option(16),
    device: str = typer.Option("cpu"),
):
    """Per-patient and aggregate metrics; writes a JSON with one row per patient."""
    from lggdeploy.common.files import check_writable, write_json_atomic
    from lggdeploy.common.tables import PATIENT_COLUMNS, columns_present, metrics_table, rich_table
    from lggdeploy.metrics import METRIC_LABELS
    from lggdeploy.models.evaluate import default_eval_path, evaluate_checkpoint
    from lggdeploy.postprocess import PostProcess

    target = check_writable(json_out or default_eval_path(checkpoint, split))  # before the long work
    summary = evaluate_checkpoint(
        checkpoint, data, split=split, split_file=split_file, batch_size=batch_size, device=device
    )
    path = write_json_atomic(target, summary)
    out.print(
        rich_table(
            summary["per_patient"], columns_present(summary["per_patient"], PATIENT_COLUMNS), title="per patient"
        )
    )
    out.print(metrics_table(summary, METRIC_LABELS, title=f"{summary['meta']['model']} on {split} split"))
    meta = summary["meta"]
    out.print(
        f"decision threshold {meta['threshold']} ({meta['threshold_origin']}); post-processing: "
        f"{PostProcess.from_json(meta['postprocess']).describe()} ({meta['postprocess_origin']}); per-patient rows and aggregates written to {path}"
    )


@app.command("prune")
@friendly
def prune_cmd(
    checkpoint: Path = typer.Argument(..., help="checkpoint to prune (a pruned one works too: the recipe accumulates)"),
    ratio: float = typer.Option(..., help="fraction of channels to remove, in (0, 1)"),
    steps: int = typer.Option(1, help="prune in K steps, fine-tuning between them"),
    finetune_epochs: int = typer.Option(0, help="epochs of fine-tuning on the train split (spread over the steps)"),
    data: Path | None = typer.Option(
        None, "--data", help="kaggle_3m folder for fine-tuning (default: the checkpoint's)"
    ),
    out_dir: Path | None = typer.Option(
        None, "--out", "-o", help="run folder for the pruned checkpoint (default: <run>-pruned<ratio%>)"
    ),
    lr: float = typer.Option(1e-4, help="fine-tuning learning rate"),
    batch_size: int = typer.Option(8),
    device: str = typer.Option("auto"),
    distill: bool = typer.Option(
        True,
        "--distill/--no-distill",
        help="fine-tune against the unpruned model's outputs (soft targets) beside the labels",
    ),
    distill_weight: float = typer.Option(
        0.5, help="the teacher's share of the fine-tuning loss, in (0, 1]; the labels' Dice + BCE get the rest"
    ),
):
    """Structured channel pruning (Torch-Pruning, DepGraph) with optional fine-tuning; writes an ordinary checkpoint."""
    from lggdeploy.models.checkpoint import load_checkpoint
    from lggdeploy.models.prune import prune_checkpoint

    path = prune_checkpoint(
        checkpoint, ratio, out_dir, steps, finetune_epochs, data, lr, batch_size, device, distill, distill_weight
    )
    recipe = load_checkpoint(path)["pruning"][-1]
    tuned = recipe["finetune"][-1]["best"]["val_mean_patient_dice"] if recipe["finetune"] else None
    out.print(
        f"wrote {path}: params {recipe['params_before'] / 1e6:.2f}M -> {recipe['params_after'] / 1e6:.2f}M, "
        f"MACs {recipe['macs_before'] / 1e9:.2f}G -> {recipe['macs_after'] / 1e9:.2f}G"
        + (f"; val per-patient Dice after fine-tuning {tuned:.4f}" if tuned is not None else "; not fine-tuned")
    )


@app.command("export")
@friendly
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="checkpoint from `lggdeploy train`"),
    out_dir: Path = typer.Option(Path("engines"), "--out", "-o", help="engines folder"),
    data: Path | None = typer.Option(
        None, "--data", help="kaggle_3m folder for the parity check (default: the checkpoint's)"
    ),
    opset: int = typer.Option(18),
):
    """Export to ONNX (dynamic batch, single file) and check parity with PyTorch on real slices."""
    from lggdeploy.engines.export import export_checkpoint

    path, record = export_checkpoint(checkpoint, out_dir, data, opset)
    parity = record["parity"]
    out.print(
        f"wrote {path} (opset {record['opset']}); parity on {parity['slices']} slices: max |logit diff| {parity['max_abs_logit_diff']:.2e}, masks agree on {parity['mask_agreement']:.4%}"
    )


@app.command("build")
@friendly
def build_cmd(
    checkpoints: Annotated[list[Path], typer.Argument(help="one or more checkpoints, or one bundle from `lggdeploy pack` (build on this device)")],
    precision: _flag(BUILD_HELP, "precision", str) = BUILD.precision,
    backend: Annotated[str, typer.Option(help=f"the backend: {describe_backends()}")] = BUILD.backend,
    int8_profile: _flag(BUILD_HELP, "int8_profile", str | None) = BUILD.int8_profile,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="engines folder")] = BUILD.out_dir,
    data: _flag(BUILD_HELP, "data", Path | None, "--data") = BUILD.data,
    calib_samples: _flag(BUILD_HELP, "calib_samples", int) = BUILD.calib_samples,
    calib_method: _flag(BUILD_HELP, "calib_method", str) = BUILD.calib_method,
    max_drop: MaxDrop = CRITERIA.max_drop,
    max_patient_drop: MaxPatientDrop = CRITERIA.max_patient_drop,
    min_agreement: MinAgreement = CRITERIA.min_agreement,
    force: _flag(BUILD_HELP, "force", bool, "--force") = BUILD.force,
    min_batch: Annotated[int, typer.Option(help="smallest batch of the engine's profile")] = BUILD.batch[0],
    opt_batch: Annotated[int, typer.Option(help="batch the engine is tuned for")] = BUILD.batch[1],
    max_batch: Annotated[int, typer.Option(help="largest batch of the engine's profile")] = BUILD.batch[2],
    workspace_gib: _flag(BUILD_HELP, "workspace_gib", float) = BUILD.workspace_gib,
    trusted_key: Annotated[Path | None, typer.Option("--trusted-key", help="from a bundle: the public key it must be signed with (refused unread otherwise)")] = None,
    threads: _flag(BUILD_HELP, "threads", int | None) = BUILD.threads,
    qat: _flag(BUILD_HELP, "qat", str) = BUILD.qat,
    qat_epochs: _flag(BUILD_HELP, "qat_epochs", int) = BUILD.qat_epochs,
    qat_lr: _flag(BUILD_HELP, "qat_lr", float) = BUILD.qat_lr,
    reference: _flag(BUILD_HELP, "reference", Path | None, "--reference") = BUILD.reference,
):  # fmt: skip
    """Build engines behind the accuracy gate; --precision all builds the whole matrix. From a bundle: build on this
    device from the bundle's graphs, verified on its verification set (the device's gate)."""
    from lggdeploy.runtime.device_build import bundle_among

    bundle = bundle_among(checkpoints)
    if bundle is None and trusted_key is not None:
        raise LggError("--trusted-key checks a bundle's signature: give it with a bundle, not with checkpoints")
    if bundle is not None:
        from lggdeploy.runtime.device_build import build_from_bundle

        built = build_from_bundle(
            bundle,
            backend=backend,
            precision=precision,
            int8_profile=int8_profile,
            out_dir=out_dir,
            batch=(min_batch, opt_batch, max_batch),
            workspace_gib=workspace_gib,
            threads=threads,
            force=force,
            trusted_key=trusted_key,
        )
        out.print(_device_build_table(built))
        return
    from lggdeploy.engines.build import BuildOptions, build_engines

    opts = BuildOptions(
        out_dir=out_dir,
        data=data,
        backend=backend,
        precision=precision,
        int8_profile=int8_profile,
        calib_samples=calib_samples,
        calib_method=calib_method,
        max_drop=max_drop,
        max_patient_drop=max_patient_drop,
        min_agreement=min_agreement,
        force=force,
        batch=(min_batch, opt_batch, max_batch),
        workspace_gib=workspace_gib,
        threads=threads,
        qat=qat,
        qat_epochs=qat_epochs,
        qat_lr=qat_lr,
        reference=reference,
    )
    report = build_engines(checkpoints, opts)
    if report.engines:
        out.print(_build_table(report.engines))
    if report.failures:
        raise GateFailed(
            f"{len(report.failures)} engine(s) failed the accuracy gate and were not written (see above); "
            f"{len(report.engines)} built"
        )


def _build_table(engines: list[dict]):
    from lggdeploy.common.tables import rich_table

    rows = [
        {
            "engine": "/".join(Path(r["engine"]).parts[-2:]),
            "n": r["gate"]["patients"],
            "fp32": r["gate"]["fp32_dice"],
            "engine_dice": r["gate"]["engine_dice"],
            "drop": r["gate"]["drop_points"],
            "worst": f"{r['gate']['worst_patient_drop_points']:.2f} ({r['gate']['worst_patient']})",
            "agreement": r["gate"]["min_agreement"],
            "kept": len(r["gate"]["nodes_kept_in_float"]),
            "qat": f"{r['qat']['epochs']} ep" if r.get("qat") else "",
            "gate": ("passed" if r["gate"]["passed"] else "FAILED (forced)")
            + (" [FP32 predicts no tumor]" if r["gate"]["reference_predicts_no_tumor"] else ""),
            "seconds": r["build_seconds"],
            "rule": r["gate"].get("rule", "fidelity"),
            "total": r["gate"].get("total_drop_points", r["gate"]["drop_points"]),
        }
        for r in engines
    ]
    retrained = [("rule", "rule"), ("total", "drop vs unpruned")] if any(r["rule"] != "fidelity" for r in rows) else []
    cols = [
        ("engine", "engine"),
        ("n", "val patients"),
        ("fp32", "FP32 Dice/patient"),
        ("engine_dice", "engine Dice/patient"),
        ("drop", "mean drop (points)"),
        ("worst", "worst patient drop"),
        ("agreement", "least mask agreement"),
        ("kept", "nodes kept in float"),
        ("qat", "QAT"),
        *retrained,
        ("gate", "gate"),
        ("seconds", "build s"),
    ]
    title = "engines (gate: paired per-patient Dice and mask agreement with the FP32 model, val split)"
    if retrained:
        title += "; a retrained model's FP32 on labels against the unpruned model (docs: engines)"
    return rich_table(rows, cols, title=title)


def _device_build_table(built):
    from lggdeploy.common.tables import rich_table

    rows = [
        {
            "engine": "/".join(b.engine.parts[-2:]),
            "source": b.source,
            "slices": len(b.report.per_slice_agreement),
            "overall": b.report.overall_agreement,
            "least": min(b.report.per_slice_agreement),
            "verified": "passed" if b.report.passed else "FAILED (forced)",
        }
        for b in built
    ]
    cols = [
        ("engine", "engine"),
        ("source", "built from"),
        ("slices", "verification slices"),
        ("overall", "mask agreement"),
        ("least", "least slice agreement"),
        ("verified", "verification"),
    ]
    return rich_table(rows, cols, title="built on this device from the bundle")


@app.command("optimize")
@friendly
def optimize_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="the trained (unpruned) checkpoint")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="ladder, engines, report and the chosen engine (a second run resumes here)")] = OPTIMIZE.out,
    data: _flag(OPTIMIZE_HELP, "data", Path | None, "--data") = OPTIMIZE.data,
    max_drop: MaxDrop = CRITERIA.max_drop,
    max_patient_drop: MaxPatientDrop = CRITERIA.max_patient_drop,
    min_agreement: MinAgreement = CRITERIA.min_agreement,
    budget_minutes: _flag(OPTIMIZE_HELP, "budget_minutes", float | None) = OPTIMIZE.budget_minutes,
    prune_ratios: _flag(OPTIMIZE_HELP, "prune_ratios", str) = ",".join(map(str, OPTIMIZE.prune_ratios)),
    prune_epochs: _flag(OPTIMIZE_HELP, "prune_epochs", int) = OPTIMIZE.prune_epochs,
    prune_lr: _flag(OPTIMIZE_HELP, "prune_lr", float) = OPTIMIZE.prune_lr,
    distill: _flag(OPTIMIZE_HELP, "distill", bool, "--distill/--no-distill") = OPTIMIZE.distill,
    distill_weight: _flag(OPTIMIZE_HELP, "distill_weight", float) = OPTIMIZE.distill_weight,
    qat: _flag(OPTIMIZE_HELP, "qat", str) = OPTIMIZE.qat,
    qat_epochs: _flag(OPTIMIZE_HELP, "qat_epochs", int) = OPTIMIZE.qat_epochs,
    calib_samples: _flag(OPTIMIZE_HELP, "calib_samples", int) = OPTIMIZE.calib_samples,
    batch: _flag(OPTIMIZE_HELP, "batch", int) = OPTIMIZE.batch,
    batch_sizes: _flag(OPTIMIZE_HELP, "batch_sizes", str) = ",".join(map(str, OPTIMIZE.batch_sizes)),
    iters: _flag(OPTIMIZE_HELP, "iters", int) = OPTIMIZE.iters,
    threads: _flag(OPTIMIZE_HELP, "threads", int | None) = OPTIMIZE.threads,
    search_all: _flag(OPTIMIZE_HELP, "search_all", bool, "--search-all") = OPTIMIZE.search_all,
):  # fmt: skip
    """The fastest engine that keeps accuracy: precision x pruning x CPU backend, gated, timed side by side."""
    from lggdeploy.optimize import OptimizeOptions, optimize

    opts = OptimizeOptions(
        out=out_dir,
        data=data,
        max_drop=max_drop,
        max_patient_drop=max_patient_drop,
        min_agreement=min_agreement,
        budget_minutes=budget_minutes,
        prune_ratios=prune_ratios,  # parsed and range-checked by check_options
        prune_epochs=prune_epochs,
        prune_lr=prune_lr,
        distill=distill,
        distill_weight=distill_weight,
        qat=qat,
        qat_epochs=qat_epochs,
        calib_samples=calib_samples,
        batch=batch,
        batch_sizes=batch_sizes,
        iters=iters,
        threads=threads,
        search_all=search_all,
    )
    summary = optimize(checkpoint, opts)
    print_machine_text((out_dir / "optimize.md").read_text())  # markdown as written: "[chosen]" is not console markup
    chosen = summary["chosen"]
    out.print(f"chosen: {chosen['engine']} -> {out_dir / 'chosen'}")


@app.command("bench")
@friendly
def bench_cmd(
    engines_dir: Annotated[Path, typer.Argument(help="folder with engines and their manifests")] = BENCH.engines_dir,
    data: _flag(BENCH_HELP, "data", Path | None, "--data") = BENCH.data,
    split: _flag(BENCH_HELP, "split", str) = BENCH.split,
    split_file: _flag(BENCH_HELP, "split_file", Path | None) = BENCH.split_file,
    batch_sizes: _flag(BENCH_HELP, "batch_sizes", str) = ",".join(map(str, BENCH.batch_sizes)),
    iters: _flag(BENCH_HELP, "iters", int) = BENCH.iters,
    seconds: _flag(BENCH_HELP, "seconds", float | None) = BENCH.seconds,
    warmup: _flag(BENCH_HELP, "warmup", int) = BENCH.warmup,
    threads: _flag(BENCH_HELP, "threads", int | None) = BENCH.threads,
    fmt: Annotated[str, typer.Option("--format", help="table, md, csv or json on screen")] = "table",
    wide: Annotated[bool, typer.Option("--wide", help="every column on screen (latency spread, end-to-end, IoU, per-slice Dice, ...); the files always hold them all")] = False,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="write bench.json/md/csv and the plots here")] = None,
):  # fmt: skip
    """Latency beside per-patient Dice/IoU/accuracy for every engine, with the PyTorch FP32 reference."""
    from lggdeploy.bench.report import OUTPUT_FORMATS, csv_text, markdown, rich_table, write_all
    from lggdeploy.bench.run import BenchOptions, run_bench
    from lggdeploy.common.files import ensure_folder

    if fmt not in OUTPUT_FORMATS:
        raise LggError(f"--format {fmt!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    sizes = batch_sizes  # parsed and range-checked by check_options
    if out_dir:
        ensure_folder(out_dir)  # before the scoring and timing, not after
    results = run_bench(
        BenchOptions(
            engines_dir=engines_dir,
            data=data,
            split=split,
            split_file=split_file,
            batch_sizes=sizes,
            iters=iters,
            seconds=seconds,
            warmup=warmup,
            threads=threads,
        )
    )
    if fmt == "table":
        out.print(rich_table(results, wide=wide))
    elif fmt == "md":
        print_machine_text(markdown(results))
    elif fmt == "csv":
        print_machine_text(csv_text(results))
    else:
        import json

        print_machine_text(json.dumps(results, indent=2))
    if out_dir:
        written = write_all(results, out_dir)
        err.print("written: " + ", ".join(str(p) for p in written))


@app.command("predict")
@friendly
def predict_cmd(
    engine: Path = typer.Argument(..., help="an engine built by `lggdeploy build` (its .json manifest beside it)"),
    source: Path = typer.Argument(
        ...,
        help="one slice .tif, a patient folder or a kaggle_3m root; or a DICOM folder (any names, nested), a NIfTI "
        "file or a folder of NIfTI files (extra lggdeploy[dicom])",
    ),
    out_dir: Path = typer.Option(Path("predictions"), "--out", "-o"),
    threshold: float | None = typer.Option(None, help="probability threshold (default: the engine's manifest)"),
    postprocess: str | None = typer.Option(
        None,
        help="post-processing of each patient's volume: the engine's stored one (default), none, largest "
        "(largest 3-D component only), N (3-D components under N voxels removed), N,F (also those under F x the largest) "
        "or N,F,Q (then those of mean probability under Q, the most confident kept); +crf after any but largest: then "
        "the outlines redrawn by a dense CRF (needs lggdeploy[outline])",
    ),
    spacing: float | None = typer.Option(None, help="TIFF input: in-plane pixel spacing in mm, for tumor areas in mm²"),
    flair: str | None = typer.Option(
        None, help="DICOM/NIfTI: the FLAIR series (SeriesInstanceUID, series number or path)"
    ),
    pre: str | None = typer.Option(None, help="DICOM/NIfTI: the pre-contrast T1 series (UID, number or path)"),
    post: str | None = typer.Option(None, help="DICOM/NIfTI: the post-contrast T1 series (UID, number or path)"),
    resample: bool = typer.Option(False, help="DICOM/NIfTI: resample T1 series onto FLAIR's grid when they differ"),
    intensity: str = typer.Option(
        "auto", help="DICOM/NIfTI: scanner units to 8 bits from the series' window / cal range (auto), window or minmax"
    ),
    threads: int | None = typer.Option(None),
):
    """Masks and per-patient tumor volumes: TIFF masks and overlays for TIFF input; DICOM SEG, NIfTI mask, overlays
    and case.json for DICOM or NIfTI input. No torch needed."""
    from lggdeploy.postprocess import PostProcess
    from lggdeploy.runtime import Segmenter
    from lggdeploy.scanner.series import is_scanner_input

    try:
        rule = PostProcess.parse(postprocess) if postprocess is not None else None
    except ValueError as exc:
        raise LggError(f"--postprocess: {exc}") from None
    if is_scanner_input(source):
        if spacing is not None:
            raise LggError("--spacing is for TIFF input: DICOM and NIfTI carry their own geometry")
        return _predict_scanner(
            engine, source, out_dir, threshold, rule, threads, flair, pre, post, resample, intensity
        )
    scanner_flags = {"--flair": flair, "--pre": pre, "--post": post, "--resample": resample or None}
    given = [flag for flag, value in scanner_flags.items() if value] + (["--intensity"] if intensity != "auto" else [])
    if given:
        raise LggError(f"{', '.join(given)}: for DICOM or NIfTI input; {source} holds TIFF slices")
    from lggdeploy.runtime.predict import predict_paths

    with Segmenter.load(engine, threshold=threshold, threads=threads, postprocess=rule) as segmenter:
        report = predict_paths(segmenter, source, out_dir, spacing_mm=spacing)
    for row in report.rows:
        dice = f", Dice {row['dice']:.4f}" if row["dice"] is not None else ""
        out.print(
            f"{row['patient']}: {row['slices']} slices, tumor in {row['tumor_slices']}, {row['tumor_pixels']} pixels{dice}"
        )
    if report.rows:
        out.print(f"wrote {report.written} masks and overlays, and {out_dir / 'patients.csv'}")
    else:
        out.print("no slice could be predicted: nothing was written")
    if report.problems:
        for problem in report.problems:
            err.print(f"[red]skipped:[/] {rich_escape(problem)}", highlight=False, soft_wrap=True)
        raise LggError(f"{len(report.problems)} file(s) could not be read (listed above); the others were written")


def _predict_scanner(engine, source, out_dir, threshold, rule, threads, flair, pre, post, resample, intensity):
    """DICOM / NIfTI input: the plan (series, roles, why) printed first, then each case's outputs."""
    from lggdeploy.common.tables import rich_table
    from lggdeploy.runtime import Segmenter
    from lggdeploy.scanner.case import RoleChoice, plan_rows
    from lggdeploy.scanner.predict import predict_cases, prepare

    cases = prepare(source, out_dir, RoleChoice(flair=flair, pre=pre, post=post), intensity)
    columns = [("case", "case"), ("series", "series"), ("uid", "UID"), ("slices", "slices"), ("grid", "grid")]
    out.print(rich_table(plan_rows(cases), columns + [("role", "role"), ("why", "why")], title="series found"))
    for case in cases:
        for note in case.notes:
            out.print(f"{case.name}: {rich_escape(note)}", highlight=False)
    with Segmenter.load(engine, threshold=threshold, threads=threads, postprocess=rule) as segmenter:
        records = predict_cases(segmenter, cases, out_dir, resample, intensity)
    for r in records:
        written = ", ".join(v for v in r["outputs"].values() if v)
        out.print(
            f"{r['case']}: tumor in {r['tumor']['slices']} of {r['grid']['shape'][0]} slices, "
            f"{r['tumor']['volume_ml']:.2f} ml — {written}"
        )
    out.print(f"wrote {out_dir / 'cases.csv'}")


@app.command("serve")
@friendly
def serve_cmd(
    engine: Path = typer.Argument(..., help="an engine built by `lggdeploy build`, or an `lggdeploy optimize` folder"),
    http_port: int = typer.Option(SERVE.http_port, help=SERVE_HELP["http_port"]),
    grpc_port: int = typer.Option(SERVE.grpc_port, help=SERVE_HELP["grpc_port"]),
    metrics_port: int = typer.Option(SERVE.metrics_port, help=SERVE_HELP["metrics_port"]),
    max_batch: int = typer.Option(SERVE.max_batch, help=SERVE_HELP["max_batch"]),
    max_queue_delay_us: int = typer.Option(SERVE.max_queue_delay_us, help=SERVE_HELP["max_queue_delay_us"]),
    instances: int = typer.Option(SERVE.instances, help=SERVE_HELP["instances"]),
    threads: int | None = typer.Option(None, help=SERVE_HELP["threads"]),
    probabilities: bool = typer.Option(False, "--probabilities", help=SERVE_HELP["probabilities"]),
):
    """Serve an engine on Triton Inference Server (extra lggdeploy[serve]): <preset>-slice, -volume and -info models."""
    from lggdeploy.serve.server import ServeOptions, serve

    opts = ServeOptions(
        http_port,
        grpc_port,
        metrics_port,
        max_batch,
        max_queue_delay_us,
        instances,
        threads,
        probabilities=probabilities,
    )
    serve(engine, opts, on_ready=lambda: err.print(f"ready: http://localhost:{http_port}/v2/health/ready"))


@app.command("triton-repo")
@friendly
def triton_repo_cmd(
    engines: list[Path] = typer.Argument(..., help="engines built by `lggdeploy build` (their manifests beside them)"),
    out_dir: Path = typer.Option(Path("model_repository"), "-o", "--out", help="a new folder for the repository"),
    max_batch: int = typer.Option(SERVE.max_batch, help=SERVE_HELP["max_batch"]),
    max_queue_delay_us: int = typer.Option(SERVE.max_queue_delay_us, help=SERVE_HELP["max_queue_delay_us"]),
):
    """A model repository for a stock Triton server: the engine on Triton's own backend, pre/post Python models and an
    ensemble (`<preset>-slice`), and a `<preset>-volume` model."""
    from lggdeploy.serve.repository import write_repository

    names = write_repository(engines, out_dir, max_batch, max_queue_delay_us)
    out.print(f"wrote {out_dir}: {', '.join(names)} (see {out_dir / 'README.md'})")


@app.command("pack")
@friendly
def pack_cmd(
    engines: list[Path] = typer.Argument(..., help="engines of one model (their manifests beside them)"),
    output: Path = typer.Option(Path("scanner-bundle.tar.gz"), "-o", "--out", help="bundle to write"),
    samples: int = typer.Option(16, help="verification slices from the val patients (tumor and tumor-free)"),
    samples_from: Path | None = typer.Option(
        None,
        "--samples-from",
        help="take the verification slices from these scanner patients instead: a DICOM folder or NIfTI files "
        "(extra lggdeploy[dicom]; read as predict reads them)",
    ),
    data: Path | None = typer.Option(
        None, "--data", help="kaggle_3m folder with the val patients (default: the engines')"
    ),
    sign: Path | None = typer.Option(
        None, "--sign", help="private key from `lggdeploy keygen`: sign the bundle, so a device can check who made it"
    ),
):
    """One self-contained bundle for an edge scanner: engines, ONNX, calibration, a verification set, checksums, README."""
    import json
    import tarfile

    from lggdeploy.engines.pack import pack

    if samples_from is not None and data is not None:
        raise LggError("--samples-from and --data both choose where the verification slices come from: give one")
    path = pack(engines, output, samples, data, sign, samples_from)
    with tarfile.open(path, "r:gz") as tar:
        description = json.load(tar.extractfile("bundle.json"))
    held = description["verification"]["slices"]
    signed = (
        f"signed (key {_key_id_of(sign)})" if sign else "unsigned (pass --sign KEY so devices can check its origin)"
    )
    out.print(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB): {len(description['engines'])} engine(s), {held} "
        f"verification slices, {signed}; on the device: lggdeploy verify {path.name}"
        + (f" --trusted-key {Path(sign).with_suffix('.pub').name}" if sign else "")
    )


def _key_id_of(private_key_path: Path) -> str:
    from lggdeploy.common import signing

    return signing.key_id(signing.load_private_key(private_key_path).public_key())


@app.command("keygen")
@friendly
def keygen_cmd(
    out_dir: Path = typer.Option(Path("."), "-o", "--out", help="folder for NAME.key (private, 0600) and NAME.pub"),
    name: str = typer.Option("lggdeploy-signing", help="file name of the pair"),
):
    """An Ed25519 key pair for signing bundles: keep the .key where bundles are packed, give devices the .pub."""
    from lggdeploy.common import signing

    private, public = signing.keygen(out_dir, name)
    out.print(
        f"wrote {private} (private: keep it off the devices, never in a bundle) and {public} (give it to the devices: "
        f"`lggdeploy verify BUNDLE --trusted-key {public.name}`); key id {signing.key_id(signing.load_public_key(public))}"
    )


@app.command("verify")
@friendly
def verify_cmd(
    bundle: Path = typer.Argument(..., help="a bundle from `lggdeploy pack`"),
    engine: Path | None = typer.Option(
        None,
        "--engine",
        help="an engine built on this device (its manifest beside it); default: every engine of the bundle usable here",
    ),
    min_agreement: float | None = typer.Option(
        None,
        help="a stricter agreement threshold than the bundle's (Dice of masks vs the FP32 model's); never a looser one",
    ),
    trusted_key: Path | None = typer.Option(
        None, "--trusted-key", help="public key (.pub) the bundle must be signed with; refused unread otherwise"
    ),
    threads: int | None = typer.Option(None),
):
    """Signature (with --trusted-key), checksums, then each engine on this device against the FP32 model's masks;
    exit 3 when one disagrees. No torch."""
    from lggdeploy.common.tables import rich_table
    from lggdeploy.runtime.verify import check_bundle_args, verify_bundle

    check_bundle_args(bundle, min_agreement)
    reports = verify_bundle(bundle, engine, threads, min_agreement, trusted_key)
    columns = [
        ("patient", "patient"),
        ("agreement", "mask agreement with FP32"),
        ("logit_sqnr_db", "logit SQNR dB"),
        ("fp32_dice", "FP32 Dice"),
        ("engine_dice", "engine Dice"),
    ]
    for report in reports:
        out.print(rich_table(report.per_patient, columns, title=f"verify {Path(report.engine).name}"))
        out.print(
            f"overall agreement {report.overall_agreement:.4f}, logit SQNR {report.logit_sqnr_db:.1f} dB, "
            f"{len(report.per_slice_agreement)} slices, least slice agreement {min(report.per_slice_agreement):.4f}; "
            f"threshold {report.min_agreement}"
        )
    out.print(f"authenticity: {reports[0].authenticity}")
    failed = [r for r in reports if not r.passed]
    if failed:
        for report in failed:
            err.print(f"[red]FAILED:[/] {Path(report.engine).name}: " + "; ".join(report.failures))
        raise typer.Exit(3)
    out.print(
        f"[green]verified[/]: {len(reports)} engine(s) on this device produce the masks the validated model produced"
    )


@app.command("doctor")
def doctor_cmd():
    """Which backends are usable here and why not; CPU ISA, GPU, library versions."""
    from lggdeploy.common.machine import cpu_line
    from lggdeploy.common.tables import rich_table
    from lggdeploy.doctor import report

    info = report()
    out.print(
        rich_table(
            info["backends"],
            [
                ("backend", "backend"),
                ("usable", "usable"),
                ("formats", "engine formats"),
                ("detail", "detail / reason"),
            ],
            title="backends",
        )
    )
    cpu = info["machine"]["cpu"]
    out.print(f"CPU: {cpu_line(cpu)}; INT8 cpu profile here: {info['int8_cpu_recipe']}")
    gpus = info["machine"]["gpus"]
    out.print(
        "GPU: "
        + (
            ", ".join(f"{g['name']} (compute capability {g['compute_capability']})" for g in gpus)
            if gpus
            else "none visible"
        )
    )
    out.print("libraries: " + ", ".join(f"{k} {v}" for k, v in info["machine"]["libraries"].items() if v))


@app.command("demo")
@friendly
def demo_cmd(
    out_dir: Path = typer.Option(Path("demo"), "--out", "-o"),
    patients: int = typer.Option(10, help="phantom patients to synthesize"),
    seed: int = typer.Option(0),
):
    """The main job on the embedded phantom set: train the three presets briefly, evaluate, print the table."""
    from lggdeploy.bench.report import rich_table as bench_table
    from lggdeploy.common.tables import rich_table
    from lggdeploy.demo import COLUMNS, WEIGHTS_NOTE, needs_weights_note, run_demo

    results = run_demo(out_dir, patients=patients, seed=seed)
    out.print(
        rich_table(
            results["rows"], COLUMNS, title="training: phantom test split (per-patient Dice is the primary metric)"
        )
    )
    if needs_weights_note(results["rows"]):
        out.print(WEIGHTS_NOTE)
    out.print(bench_table(results["bench"]))
    out.print(
        f"results: {out_dir / 'results.md'} (both tables), {out_dir / 'bench'} (bench.json/md/csv, speed_accuracy.png, speedup.png); "
        f"checkpoints, curves and per-patient JSON under {out_dir / 'runs'}; engines and manifests under {out_dir / 'engines'}.\n"
        "The same on the real data (the recipe measured in docs/training.md): "
        "lggdeploy train --model pspnet-scratch --data /path/to/kaggle_3m --budget-minutes 30 && "
        "lggdeploy build runs/pspnet-scratch/best.pt --precision all && lggdeploy bench engines --data /path/to/kaggle_3m --out results"
    )


def main() -> None:
    from lggdeploy.common.machine import keep_freed_memory

    keep_freed_memory()  # no mmap/munmap churn per batch (see its docstring: most of eval's system time)
    app()


if __name__ == "__main__":
    main()

"""The `lggdeploy` command line: parses options, calls the library, prints. No logic lives here."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lggdeploy.errors import LggError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, help="Brain-MRI LGG segmentation: data, training, evaluation.")
data_app = typer.Typer(no_args_is_help=True, help="Check, describe, synthesize and split kaggle_3m-layout data.")
app.add_typer(data_app, name="data")
out = Console()
err = Console(stderr=True)


def friendly(func):
    """A user's mistake becomes one line on stderr and exit code 2; Ctrl-C exits 130 without a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LggError as exc:
            err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted: checkpoints already written are intact (files are replaced atomically)")
            raise typer.Exit(130) from None

    return wrapper


@data_app.command("check")
@friendly
def data_check(folder: Path = typer.Argument(..., help="kaggle_3m folder (one sub-folder per patient)")):
    """Validate every file; list all problems, each with its file. Exit 1 if anything is wrong."""
    from lggdeploy.data.kaggle import check_dataset, scan
    from lggdeploy.progress import progress_bar

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
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="split JSON (default: the split `data split` would make with --seed)"),
    seed: int = typer.Option(0, help="seed of the default split"),
):
    """Patients, slices and tumor fraction per split."""
    from lggdeploy.data.kaggle import load_dataset
    from lggdeploy.data.split import load_split, make_split
    from lggdeploy.reporting import split_table

    dataset = load_dataset(folder)
    split = load_split(split_file) if split_file else make_split(dataset, seed=seed)
    split.check_against(dataset, origin=str(split_file or "split"))
    if not split.tumor_slices:
        split.with_counts(dataset)
    out.print(split_table(split, title=f"{folder}: {len(dataset.patients)} patients, {dataset.num_slices} slices"))


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
    from lggdeploy.data.phantom import synthesize
    from lggdeploy.progress import progress_bar

    with progress_bar() as bar:
        task = bar.add_task("synthesizing", total=patients, info="")
        ids = synthesize(folder, patients=patients, slices=(min_slices, max_slices), seed=seed, on_patient=lambda pid: bar.advance(task))
    out.print(f"wrote {len(ids)} phantom patients to {folder}")


@data_app.command("split")
@friendly
def data_split(
    folder: Path = typer.Argument(..., help="kaggle_3m folder"),
    output: Path = typer.Option(Path("split.json"), "-o", "--out", help="split JSON to write"),
    seed: int = typer.Option(0),
    ratios: str = typer.Option("0.7,0.15,0.15", help="train,val,test fractions of patients"),
):
    """Patient-level train/val/test split, deterministic from --seed, written as JSON."""
    from lggdeploy.data.kaggle import load_dataset
    from lggdeploy.data.split import make_split, save_split
    from lggdeploy.reporting import split_table

    try:
        parts = tuple(float(r) for r in ratios.split(","))
    except ValueError:
        raise LggError(f"--ratios {ratios!r}: give three comma-separated fractions, e.g. 0.7,0.15,0.15") from None
    if len(parts) != 3:
        raise LggError(f"--ratios {ratios!r}: give exactly three fractions (train,val,test)")
    split = make_split(load_dataset(folder), seed=seed, ratios=parts)
    save_split(split, output)
    out.print(split_table(split, title=f"split written to {output}"))


@app.command("presets")
def presets():
    """The model presets of the study."""
    from lggdeploy.presets import PRESETS
    from lggdeploy.reporting import comparison_table

    rows = [{"name": s.name, "arch": s.arch, "encoder": s.encoder, "weights": s.encoder_weights or "random", "study": s.study_test_dice} for s in PRESETS.values()]
    cols = [("name", "preset"), ("arch", "architecture"), ("encoder", "encoder"), ("weights", "default encoder weights"), ("study", "study test Dice (per-slice)")]
    out.print(comparison_table(rows, cols))


@app.command("train")
@friendly
def train_cmd(
    model: str = typer.Option(..., "--model", "-m", help="preset (pspnet-scratch, pspnet-resnext50, unet-effb7) or ARCH:ENCODER"),
    data: Path = typer.Option(..., "--data", help="kaggle_3m folder"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (default runs/<model>)"),
    epochs: int = typer.Option(10),
    batch_size: int = typer.Option(8),
    lr: float = typer.Option(3e-4),
    img_size: int = typer.Option(256, help="model input size (slices are 256x256; metrics are always at 256)"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    split_file: Optional[Path] = typer.Option(None, help="split JSON (default: a new seeded split saved in the run folder)"),
    encoder_weights: Optional[str] = typer.Option(None, help="imagenet, random, or PATH to a local encoder state dict (default: the preset's)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from last.pt"),
    augment: bool = typer.Option(True, "--augment/--no-augment"),
):
    """Train a model; keeps best.pt (validation per-patient Dice) and last.pt."""
    from lggdeploy.train import TrainConfig, train

    cfg = TrainConfig(
        model=model, data=data, out=out_dir or Path("runs") / model.replace(":", "-"), epochs=epochs, batch_size=batch_size,
        lr=lr, img_size=img_size, seed=seed, device=device, split_file=split_file, encoder_weights=encoder_weights,
        resume=resume, augment=augment,
    )
    result = train(cfg)
    best = result.best
    out.print(
        f"best epoch {best['epoch']}: validation mean per-patient Dice {best['val_mean_patient_dice']:.4f} "
        f"({result.seconds:.0f} s); checkpoint {result.best_path}, curves {result.best_path.parent / 'curves.png'}"
    )


@app.command("eval")
@friendly
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="checkpoint from `lggdeploy train`"),
    data: Path = typer.Option(..., "--data", help="kaggle_3m folder"),
    split: str = typer.Option("test", help="test, val, train or all"),
    split_file: Optional[Path] = typer.Option(None, help="split JSON (default: the one embedded in the checkpoint)"),
    json_out: Optional[Path] = typer.Option(None, "--out", "-o", help="summary JSON (default: next to the checkpoint)"),
    batch_size: int = typer.Option(16),
    device: str = typer.Option("cpu"),
):
    """Per-patient and aggregate metrics; writes a JSON with one row per patient."""
    from lggdeploy.evaluate import default_eval_path, evaluate_checkpoint
    from lggdeploy.fileio import write_json_atomic
    from lggdeploy.reporting import metrics_table, patients_table

    summary = evaluate_checkpoint(checkpoint, data, split=split, split_file=split_file, batch_size=batch_size, device=device)
    path = write_json_atomic(json_out or default_eval_path(checkpoint, split), summary)
    out.print(patients_table(summary))
    out.print(metrics_table(summary, title=f"{summary['meta']['model']} on {split} split"))
    out.print(f"per-patient rows and aggregates written to {path}")


@app.command("demo")
@friendly
def demo_cmd(
    out_dir: Path = typer.Option(Path("demo"), "--out", "-o"),
    patients: int = typer.Option(10, help="phantom patients to synthesize"),
    seed: int = typer.Option(0),
):
    """The main job on the embedded phantom set: train the three presets briefly, evaluate, print the table."""
    from lggdeploy.demo import COLUMNS, run_demo
    from lggdeploy.reporting import comparison_table

    results = run_demo(out_dir, patients=patients, seed=seed)
    out.print(comparison_table(results["rows"], COLUMNS, title="lggdeploy demo: phantom test split (per-patient Dice is the primary metric)"))
    out.print(
        f"results: {out_dir / 'results.md'}, {out_dir / 'results.json'}; runs, curves and per-patient JSON under {out_dir / 'runs'}.\n"
        "Transfer presets trained from random init (ImageNet weights cannot be downloaded offline).\n"
        "On the real data: lggdeploy train --model pspnet-scratch --data /path/to/kaggle_3m, then lggdeploy eval runs/pspnet-scratch/best.pt --data /path/to/kaggle_3m"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()

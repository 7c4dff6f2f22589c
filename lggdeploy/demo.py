"""The main job on the embedded default: phantom set -> split -> train the three presets -> evaluate ->
export -> FP32/FP16/INT8 ONNX Runtime engines behind the accuracy gate -> bench -> table and plots.

Runs with no data and no network, so no ImageNet weights. So that the rows tell the presets apart and the demo walks
the transfer path: pspnet-resnext50 starts from the encoder pspnet-scratch just trained (same architecture, loaded
through `--encoder-weights FILE`, the local-weights path), a stand-in for ImageNet weights and labelled as such;
unet-effb7 (another encoder) starts from random init, labelled too. With real weights: `lggdeploy train
--encoder-weights imagenet|FILE`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lggdeploy.bench.report import write_all
from lggdeploy.bench.run import BenchOptions, run_bench
from lggdeploy.common.errors import LggError
from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.tables import markdown_table
from lggdeploy.data.kaggle import check_dataset, raise_for_problems
from lggdeploy.data.phantom import synthesize
from lggdeploy.data.split import make_split, save_split
from lggdeploy.engines.build import BuildOptions, build_engines
from lggdeploy.models.evaluate import evaluate_checkpoint
from lggdeploy.models.presets import PRESETS
from lggdeploy.models.train import TrainConfig, train

# Small enough for 2 CPU cores in minutes; EfficientNet-B7 costs ~6x PSPNet per step, so it gets fewer epochs.
DEMO_EPOCHS = {"pspnet-scratch": 8, "pspnet-resnext50": 8, "unet-effb7": 4}
DEMO_IMG_SIZE = 128
COLUMNS = [
    ("model", "model"),
    ("encoder_weights", "encoder weights"),
    ("epochs", "epochs"),
    ("train_seconds", "train s"),
    ("val_mean_patient_dice", "val Dice/patient"),
    ("mean_patient_dice", "test Dice/patient mean"),
    ("median_patient_dice", "median"),
    ("global_dice", "global Dice"),
    ("mean_patient_iou", "IoU/patient"),
    ("pixel_accuracy", "pixel acc."),
    ("slice_mean_dice_study_style", "per-slice Dice (study style)"),
]


DEMO_ENTRIES = {"phantom", "split.json", "runs", "engines", "bench", "results.md", "results.json"}


def check_demo_folder(out: Path) -> None:
    """--out must be new, empty, or an earlier demo's folder: never a data set or other work to write into."""
    if out.exists() and not out.is_dir():
        raise LggError(f"--out {out} is a file; choose a new or empty folder for the demo")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES and not p.name.startswith("."))
        if foreign:
            raise LggError(
                f"--out {out} already holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which the demo "
                "did not write (a data set?); choose a new or empty folder"
            )


def run_demo(
    out: str | os.PathLike = "demo",
    patients: int = 10,
    seed: int = 0,
    presets: list[str] | None = None,
    epochs: dict | None = None,
    engines: bool = True,
    bench_iters: int = 10,
) -> dict:
    out = Path(out)
    check_demo_folder(out)
    data = out / "phantom"
    if not data.exists():
        synthesize(data, patients=patients, seed=seed)
    _, problems = check_dataset(data)
    raise_for_problems(data, problems)
    split = make_split(check_dataset(data)[0], seed=seed)
    split_file = save_split(split, out / "split.json")
    runs = out / "runs"
    if runs.exists():  # the demo's own output from an earlier run: start over
        shutil.rmtree(runs)

    rows = []
    for name in presets or list(PRESETS):
        n_epochs = (epochs or DEMO_EPOCHS).get(name, 4)
        weights, label = _demo_encoder(name, runs)
        result = train(
            TrainConfig(
                model=name,
                data=data,
                out=runs / name,
                epochs=n_epochs,
                batch_size=8,
                img_size=DEMO_IMG_SIZE,
                seed=seed,
                split_file=split_file,
                encoder_weights=weights,
            )
        )
        summary = evaluate_checkpoint(result.best_path, data, split="test")
        write_json_atomic(runs / name / "eval_test.json", summary)
        rows.append(
            {
                "model": name,
                "encoder_weights": label,
                "epochs": n_epochs,
                "train_seconds": round(result.seconds, 1),
                "val_mean_patient_dice": result.best["val_mean_patient_dice"],
                **summary["aggregates"],
            }
        )
    results = {"data": str(data), "split": split.to_json(), "img_size": DEMO_IMG_SIZE, "rows": rows}
    text = "# lggdeploy demo (phantom data)\n\n## Training (test split of the phantom set)\n\n" + markdown_table(
        rows, COLUMNS
    )
    if needs_weights_note(rows):
        text += f"\n\\{WEIGHTS_NOTE}\n"  # escaped: a leading * would start a list
    if engines:
        results["bench"] = _engines_and_bench(out, data, [runs / r["model"] / "best.pt" for r in rows], bench_iters)
        from lggdeploy.bench.report import markdown

        text += "\n## Engines: speed and accuracy (`lggdeploy bench`)\n\n" + markdown(results["bench"])
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", text)
    return results


WEIGHTS_NOTE = (
    "* no ImageNet weights offline: pspnet-resnext50 starts from pspnet-scratch's encoder (a stand-in, via the "
    "local-weights path), unet-effb7 from random init."
)


def needs_weights_note(rows: list[dict]) -> bool:
    """Whether a row's encoder-weights label carries the * that WEIGHTS_NOTE explains."""
    return any(str(row.get("encoder_weights", "")).endswith("*") for row in rows)


TRANSFER_FROM = {"pspnet-resnext50": "pspnet-scratch"}  # a transfer preset -> the demo model whose encoder it reuses


def _demo_encoder(name: str, runs: Path) -> tuple[str, str]:
    """(encoder_weights, the table's label) of a preset in the demo; a label with * is explained by WEIGHTS_NOTE."""
    source = TRANSFER_FROM.get(name)
    if source is not None and (runs / source / "best.pt").is_file():
        return str(runs / source / "best.pt"), f"{source}*"
    return "random", "random" if PRESETS[name].encoder_weights is None else "random*"


def _engines_and_bench(out: Path, data: Path, checkpoints: list[Path], iters: int) -> dict:

    engines = out / "engines"
    if engines.exists():  # the demo's own engines from an earlier run
        shutil.rmtree(engines)
    build_engines(
        checkpoints, BuildOptions(out_dir=engines, data=data, precision="all", calib_samples=16)
    )  # gate failures are printed; bench shows what was built
    results = run_bench(BenchOptions(engines_dir=engines, data=data, split="test", batch_sizes=(1, 8), iters=iters))
    write_all(results, out / "bench")
    return results

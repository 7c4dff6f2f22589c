"""The recipe ablation: each finished training run scored the same way on its val and test patients.

usage: .venv/bin/python benchmarks/report_recipe.py --data DATA --out OUT LABEL=RUN_DIR[:last] [...]
(`:last` scores the run's last.pt — the raw weights of its final epoch — instead of best.pt.)

For every run: best.pt's selection epoch and weights (EMA or raw), the threshold it stores (or, for a run trained
without tuning, the threshold the same tuning picks on its val patients afterwards), and on the test patients the
mean per-patient Dice at 0.5 and at the tuned threshold, with and without the largest 3-D component, and the
patients missed. Validation noise: the mean absolute change of val Dice from one epoch to the next over the second
half of the run (kept weights, and raw weights where an EMA ran beside them). Writes OUT/ablation.json and
OUT/README.md (the per-patient test tables; the narrative is added by hand).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from lggdeploy.bench.stats import paired_summary
from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_line, machine_info
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.transforms import native_logits
from lggdeploy.engines.precision.gate import run_on_slices
from lggdeploy.metrics import confusion_counts, summarize
from lggdeploy.models import threshold as thresholds
from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of, split_of
from lggdeploy.models.torch_runner import TorchRunner
from lggdeploy.postprocess import CONFIDENCE_FLOOR, LARGEST, PostProcess
from lggdeploy.scoring import add_largest_component


def logits_of(ckpt: dict, slices) -> np.ndarray:
    """The model's logits on `slices` (model resolution), through the gate's own batch loop."""
    runner = TorchRunner(model_from_checkpoint(ckpt).eval(), "cpu")
    return run_on_slices(runner, slices, ckpt["img_size"], normalization_of(ckpt), 0.5, "report").logits


def score(native: np.ndarray, slices, threshold: float) -> dict:
    predicted = native > np.float32(np.log(threshold / (1 - threshold)))
    return add_largest_component(
        summarize(confusion_counts(predicted, slices.masks), slices.patients), predicted, slices
    )


def delivered(ckpt: dict) -> PostProcess:
    """A finished run's stored rule with training's second step on top, the mean-probability floor (a stored
    "largest" keeps no size step): what training delivers since the floor, for runs trained before it."""
    stored = PostProcess.from_json(ckpt.get("postprocess"))
    base = stored if stored.min_component_voxels != LARGEST else PostProcess()
    return replace(base, min_mean_probability=CONFIDENCE_FLOOR)


def finished_runs_parser() -> argparse.ArgumentParser:
    """The options of the reports that score finished runs: LABEL=RUN_DIR ..., --data, --out, --exclude, --parts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--exclude", type=Path, help="a split file whose test patients are never scored")
    parser.add_argument("--parts", default="val,test", help="which of each run's split parts to score")
    return parser


def score_rules(ckpt: dict, slices, rules) -> dict:
    """rule -> {patient: Dice} for each rule of `rules(stored post-processing, threshold)`: a function of one
    patient's thresholded (slices, H, W) mask volume and its foreground probabilities, giving the final masks."""
    logits = logits_of(ckpt, slices)  # (slices, H, W) at the model's resolution (256: native)
    threshold = float(ckpt["threshold"])
    predicted = logits > np.float32(np.log(threshold / (1 - threshold)))
    prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    out: dict = {}
    for name, rule in rules(PostProcess.from_json(ckpt.get("postprocess")), threshold).items():
        masks = np.array(predicted, copy=True)
        for pid in dict.fromkeys(slices.patients.tolist()):
            sel = slices.patients == pid
            masks[sel] = rule(predicted[sel], prob[sel])
        summary = summarize(confusion_counts(masks, slices.masks), slices.patients)
        out[name] = {r["patient"]: r["dice"] for r in summary["per_patient"]}
    return out


def scored_runs(items: list[str], data: Path, exclude: Path | None, score, parts=("val", "test")) -> dict:
    """label -> {"run", "model", "patients", "dice": score(ckpt, slices)} for each LABEL=RUN_DIR, on the run's `parts`
    patients minus the test patients of the split file `exclude` (the hold-out patients no choice may look at)."""
    dataset = load_dataset(data)
    excluded = set(json.loads(exclude.read_text())["test"]) if exclude else set()
    runs: dict = {}
    for label, run, ckpt in best_runs(items):
        split = split_of(ckpt)
        patients = [p for part in parts for p in getattr(split, part) if p not in excluded]
        if patients:
            dice = score(ckpt, load_slices(dataset, patients))
            runs[label] = {"run": run, "model": ckpt["model"]["name"], "patients": patients, "dice": dice}
    return runs


def pooled_against(runs: dict, name: str, base: str) -> dict:
    """Rule `name` minus rule `base` per patient-run (runs: label -> {"dice": {rule: {patient: Dice}}}), averaged per
    distinct patient, then paired_summary over patients; "lost": patient-runs `base` finds (Dice >= 0.05) that
    `name` misses."""
    by_patient: dict[str, list[float]] = {}
    lost = []
    for label, r in runs.items():
        for pid, reference in r["dice"][base].items():
            by_patient.setdefault(pid, []).append(r["dice"][name][pid] - reference)
            if reference >= 0.05 and r["dice"][name][pid] < 0.05:
                lost.append(f"{pid} ({label})")
    return {"lost": lost, "difference": paired_summary({p: float(np.mean(v)) for p, v in sorted(by_patient.items())})}


def pooled_table(pooled: dict, label: str, extra: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Markdown rows of `pooled_against` results: name -> pooled; `extra`: column -> {name: cell}, after the name."""
    extra = extra or {}
    head = [label, *extra, "patients", "difference", "95 % CI", "lost"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, p in pooled.items():
        d = p["difference"]
        ci = f"{100 * d['ci95'][0]:+.2f} to {100 * d['ci95'][1]:+.2f}" if d["ci95"] else "no interval"
        cells = [n, *(column[n] for column in extra.values()), str(d["n"]), f"{100 * d['mean']:+.2f}", ci]
        lines.append("| " + " | ".join([*cells, str(len(p["lost"]))]) + " |")
    return lines


def write_report(out: Path, stem: str, payload: dict, lines: list[str]) -> None:
    """OUT/STEM.json (the payload and the machine) and OUT/STEM.md (the lines and the machine's line)."""
    machine = machine_info()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{stem}.json", {**payload, "machine": machine})
    write_markdown(out / f"{stem}.md", lines, machine)


def rule_table_head(names: list[str], model_column: bool = False) -> list[str]:
    """The header and separator of the table that `rule_rows` fills (the same `model_column`)."""
    lead = ["run", "model", "n"] if model_column else ["run", "n"]
    return ["| " + " | ".join(lead + names) + " |", "|" + "---|" * (len(lead) + len(names))]


def rule_rows(runs: dict, names: list[str], found_by: str, digits: int = 3, model_column: bool = False) -> list[str]:
    """Markdown rows of a post-processing comparison on finished runs: one per run, then the patient-runs pooled.

    runs: label -> {"patients", "model", "dice": {rule: {patient: Dice}}}. Each cell is the mean per-patient Dice
    [missed / lost]: lost counts patients that rule `found_by` finds (Dice >= 0.05) and this rule misses."""
    totals = {n: {"dice": [], "missed": 0, "lost": 0} for n in names}
    lines = []
    for label, r in runs.items():
        cells = []
        found = {p for p, d in r["dice"][found_by].items() if d >= 0.05}
        for n in names:
            per = r["dice"][n]
            missed = sum(d < 0.05 for d in per.values())
            lost = sum(per[p] < 0.05 for p in found)
            totals[n]["dice"] += list(per.values())
            totals[n]["missed"] += missed
            totals[n]["lost"] += lost
            cells.append(f"{np.mean(list(per.values())):.{digits}f} [{missed}/{lost}]")
        lead = f"| {label} | {r['model']} |" if model_column else f"| {label} |"
        lines.append(f"{lead} {len(r['patients'])} | " + " | ".join(cells) + " |")
    pooled = " | ".join(f"**{np.mean(t['dice']):.{digits}f}** [{t['missed']}/{t['lost']}]" for t in totals.values())
    models = sorted({r["model"] for r in runs.values()})
    lead = f"| **all {', '.join(models)}** | |" if model_column else "| **all (patient-runs)** |"
    lines.append(f"{lead} {len(totals[names[0]]['dice'])} | {pooled} |")
    return lines


def best_runs(items: list[str]):
    """(label, run folder, its best.pt) for each LABEL=RUN_DIR argument of the run reports."""
    for item in items:
        label, run = item.split("=", 1)
        yield label, run, load_checkpoint(Path(run) / "best.pt")


def split_parts(dataset, ckpt: dict) -> dict:
    """The slices of the checkpoint's val and test patients, by part."""
    split = split_of(ckpt)
    return {part: load_slices(dataset, getattr(split, part)) for part in ("val", "test")}


def dice_record(predicted: np.ndarray, slices) -> dict:
    """Mean per-patient Dice, patients missed and the per-patient Dice of native-size masks."""
    summary = summarize(confusion_counts(predicted, slices.masks), slices.patients)
    return {
        "dice": summary["aggregates"]["mean_patient_dice"],
        "missed": summary["aggregates"]["patients_missed"],
        "per_patient": {r["patient"]: r["dice"] for r in summary["per_patient"]},
    }


def epoch_noise(history: list[dict], key: str) -> float | None:
    values = [row[key] for row in history if key in row]
    tail = values[len(values) // 2 :]
    return float(np.mean(np.abs(np.diff(tail)))) if len(tail) > 1 else None


def write_markdown(path: Path, lines: list[str], machine: dict) -> None:
    """The report's markdown with the machine line at its foot, written and printed."""
    lines = [*lines, "", f"Machine: {cpu_line(machine['cpu'])}; {dt.date.today().isoformat()}."]
    write_text_atomic(path, "\n".join(lines) + "\n")
    print("\n".join(lines))


def parse_run_args() -> argparse.Namespace:
    """LABEL=RUN_DIR ... --data DATA --out OUT: the command line of the recipe reports."""
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def main() -> None:
    args = parse_run_args()
    dataset = load_dataset(args.data)
    rows, per_patient = [], {}
    for item in args.runs:
        label, run = item.split("=", 1)
        which = "best.pt"
        if run.endswith(":last"):  # the raw weights of the final epoch (last.pt), scored like any best.pt
            run, which = run.removesuffix(":last"), "last.pt"
        run = Path(run)
        ckpt = load_checkpoint(run / which)
        if which == "last.pt":
            ckpt = {k: v for k, v in ckpt.items() if k not in ("threshold_tuning",)}
            ckpt["best"] = {
                "epoch": ckpt["epoch"],
                "val_mean_patient_dice": ckpt["history"][-1].get(
                    "val_mean_patient_dice_raw_weights", ckpt["history"][-1]["val_mean_patient_dice"]
                ),
            }
            ckpt["weights"] = "raw (last.pt)"
        history = json.loads((run / "history.json").read_text())
        split = split_of(ckpt)
        val, test = load_slices(dataset, split.val), load_slices(dataset, split.test)
        if "threshold_tuning" in ckpt:
            tuning, tuned_when = ckpt["threshold_tuning"], "in training"
        else:
            tuning, tuned_when = (
                thresholds.tune(logits_of(ckpt, val), val.masks, val.patients, default=ckpt["threshold"]),
                "afterwards (same rule)",
            )
        test_native = native_logits(logits_of(ckpt, test), 256)
        at_half, at_tuned = score(test_native, test, 0.5), score(test_native, test, tuning["threshold"])
        cfg = ckpt.get("train_config", {})
        seconds = [r["seconds"] for r in history]
        rows.append(
            {
                "label": label,
                "run": str(run),
                "recipe": {
                    k: cfg.get(k)
                    for k in (
                        "loss",
                        "tumor_fraction",
                        "warmup_epochs",
                        "ema_decay",
                        "tune_threshold",
                        "epochs",
                        "budget_minutes",
                    )
                },
                "epochs": len(history),
                "median_epoch_seconds": float(np.median(seconds)),
                "train_minutes": round(sum(seconds) / 60, 1),
                "best_epoch": ckpt["best"]["epoch"],
                "weights": ckpt.get("weights", "raw"),
                "val_patients": len(split.val),
                "test_patients": len(split.test),
                "val_dice_at_selection": ckpt["best"]["val_mean_patient_dice"],
                "val_epoch_noise": epoch_noise(history, "val_mean_patient_dice"),
                "val_epoch_noise_raw_weights": epoch_noise(history, "val_mean_patient_dice_raw_weights"),
                "threshold": tuning["threshold"],
                "threshold_tuned": tuned_when,
                "val_dice_tuned": tuning["val_mean_patient_dice"],
                "test_dice_at_0.5": at_half["aggregates"]["mean_patient_dice"],
                "test_dice_tuned": at_tuned["aggregates"]["mean_patient_dice"],
                "test_dice_tuned_largest_component": at_tuned["aggregates"]["mean_patient_dice_largest_component"],
                "test_median_dice_tuned": at_tuned["aggregates"]["median_patient_dice"],
                "test_missed_at_0.5": at_half["aggregates"]["patients_missed"],
                "test_missed_tuned": at_tuned["aggregates"]["patients_missed"],
                "test_global_dice_tuned": at_tuned["aggregates"]["global_dice"],
                "test_slice_mean_dice_study_style_tuned": at_tuned["aggregates"]["slice_mean_dice_study_style"],
            }
        )
        per_patient[label] = {"at_0.5": at_half["per_patient"], "tuned": at_tuned["per_patient"]}
        print(
            f"{label}: test {rows[-1]['test_dice_at_0.5']:.4f} @0.5, {rows[-1]['test_dice_tuned']:.4f} @{tuning['threshold']}"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    write_json_atomic(
        args.out / "ablation.json",
        {"date": dt.date.today().isoformat(), "machine": machine, "runs": rows, "per_patient": per_patient},
    )
    fmt = lambda v: "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [
        "| run | epochs (median s) | best epoch, weights | val Dice at selection (n=5) | val epoch-to-epoch noise (raw) | threshold | test Dice @0.5 | test Dice @tuned | + largest comp. | test missed @0.5 / tuned (n=5) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        raw = f" ({fmt(r['val_epoch_noise_raw_weights'])})" if r["val_epoch_noise_raw_weights"] is not None else ""
        lines.append(
            f"| {r['label']} | {r['epochs']} ({r['median_epoch_seconds']:.0f}) | {r['best_epoch']}, {r['weights']} | {fmt(r['val_dice_at_selection'])} | "
            f"{fmt(r['val_epoch_noise'])}{raw} | {r['threshold']} ({r['threshold_tuned']}) | {fmt(r['test_dice_at_0.5'])} | {fmt(r['test_dice_tuned'])} | "
            f"{fmt(r['test_dice_tuned_largest_component'])} | {r['test_missed_at_0.5']} / {r['test_missed_tuned']} |"
        )
    lines += ["", "Per test patient (Dice at the tuned threshold; largest component in brackets):", ""]
    labels = list(per_patient)
    lines += ["| patient | tumor slices | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for i, row in enumerate(per_patient[labels[0]]["tuned"]):
        cells = [
            f"{per_patient[label]['tuned'][i]['dice']:.3f} ({per_patient[label]['tuned'][i]['dice_largest_component']:.3f})"
            for label in labels
        ]
        lines.append(f"| {row['patient']} | {row['tumor_slices']} | " + " | ".join(cells) + " |")
    write_markdown(args.out / "ablation.md", lines, machine)


if __name__ == "__main__":
    main()

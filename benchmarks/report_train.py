"""Write a training benchmark's record (README.md, history, curves, machine info) from a finished run folder."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
from pathlib import Path

from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_line, machine_info
from lggdeploy.metrics import METRIC_LABELS
from lggdeploy.models.checkpoint import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--command", required=True)
    args = parser.parse_args()

    ckpt = load_checkpoint(args.run / "best.pt")
    history = json.loads((args.run / "history.json").read_text())
    test = json.loads((args.out / "eval_test.json").read_text())
    machine = machine_info()
    for name in ("history.csv", "history.json", "curves.png", "split.json"):
        shutil.copy(args.run / name, args.out / name)
    write_json_atomic(args.out / "machine.json", machine)

    lines = [
        f"# {ckpt['model']['name']} trained on the CPU on the shared real patients",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- command: `{args.command}`",
        f"- machine: {cpu_line(machine['cpu'])}, torch {machine['libraries']['torch']}, smp {machine['libraries']['segmentation-models-pytorch']}",
        f"- data: {ckpt['data_root']} — train {len(ckpt['split']['train'])} / val {len(ckpt['split']['val'])} / test {len(ckpt['split']['test'])} patients (split seed {ckpt['split']['seed']})",
        f"- encoder weights: {ckpt['encoder_weights']}; input {ckpt['img_size']} px; epochs {len(history)}; compute {ckpt.get('compute_precision', 'float32')}; wall time {args.seconds / 60:.1f} min",
        f"- best epoch {ckpt['best']['epoch']} by validation mean per-patient Dice",
        "",
        "## Per epoch (validation = mean per-patient Dice on the val patients)",
        "",
        "| epoch | train loss | train Dice (aug. batches) | val loss | val per-patient Dice | val per-patient IoU | val pixel acc. | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in history:
        lines.append(
            f"| {r['epoch']} | {r['train_loss']:.4f} | {r['train_dice']:.4f} | {r['val_loss']:.4f} | {r['val_mean_patient_dice']:.4f} | "
            f"{r['val_mean_patient_iou']:.4f} | {r['val_pixel_accuracy']:.4f} | {r['seconds']:.0f} |"
        )
    lines += ["", "## Test split (best checkpoint)", "", "| metric | value |", "|---|---|"]
    for key, label in METRIC_LABELS.items():
        if key not in test["aggregates"]:  # the with/without post-processing rows exist only when a rule is stored
            continue
        value = test["aggregates"][key]
        lines.append(f"| {label} | {'n/a' if value is None else f'{value:.4f}'} |")
    lines += ["", "| patient | slices | tumor slices | Dice | IoU |", "|---|---|---|---|---|"]
    for row in test["per_patient"]:
        lines.append(
            f"| {row['patient']} | {row['slices']} | {row['tumor_slices']} | {row['dice']:.4f} | {row['iou']:.4f} |"
        )
    lines += ["", "![training curves](curves.png)", ""]
    write_text_atomic(args.out / "README.md", "\n".join(lines))


if __name__ == "__main__":
    main()

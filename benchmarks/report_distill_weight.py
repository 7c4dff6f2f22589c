"""Fine-tunes of one model side by side — e.g. two distillation weights of one pruned model, or a pruned model against
the unpruned one fine-tuned the same way: the gate's per-patient rows (each fine-tuned model's FP32 engine judged
against the unpruned model on val) and val Dice by fine-tuning epoch.

usage: python benchmarks/report_distill_weight.py --gate W=manifest.json ... --history W=history.csv ... --out DIR
       [--prefix 'w='] [--name distill_weight]
(W: the column's label, after --prefix; manifest: a gate record as `build` writes it, the engine's .json; --name: the
stem of the .md / .json written)
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from lggdeploy.common.files import write_json_atomic, write_text_atomic


def pairs(values: list[str]) -> dict[str, Path]:
    return {v.split("=", 1)[0]: Path(v.split("=", 1)[1]) for v in values}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gate", nargs="+", required=True)
    parser.add_argument("--history", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--prefix",
        default="w=",
        help="what each label follows in the column heads (the labels were distillation weights)",
    )
    parser.add_argument("--name", default="distill_weight", help="stem of the files written")
    args = parser.parse_args()
    gates = {w: json.loads(p.read_text())["gate"] for w, p in pairs(args.gate).items()}
    histories = {w: list(csv.DictReader(p.open())) for w, p in pairs(args.history).items()}
    weights = list(gates)
    first = gates[weights[0]]
    n = first["patients"]
    lines = [
        f"Gate of each fine-tuned model's FP32 engine against the unpruned FP32 model, val split, n = {n} patients (no interval, no verdict from {n}). "
        f"Criteria: mean drop ≤ {first['criteria']['max_mean_drop_points']}, worst patient ≤ {first['criteria']['max_patient_drop_points']} points, "
        f"mask agreement ≥ {first['criteria']['min_agreement']}.",
        "",
        "| patient | unpruned FP32 Dice | "
        + " | ".join(f"{args.prefix}{w}: Dice / drop (pts) / agreement" for w in weights)
        + " |",
        "|---|---|" + "---|" * len(weights),
    ]
    rows = {w: {r["patient"]: r for r in g["per_patient"]} for w, g in gates.items()}
    for patient, ref in rows[weights[0]].items():
        cells = [
            f"{rows[w][patient]['engine_dice']:.4f} / {rows[w][patient]['drop_points']:+.2f} / {rows[w][patient]['agreement']:.3f}"
            for w in weights
        ]
        lines.append(f"| {patient} | {ref['fp32_dice']:.4f} | " + " | ".join(cells) + " |")
    lines.append(
        "| **mean** | "
        + f"{first['fp32_dice']:.4f} | "
        + " | ".join(
            f"{g['engine_dice']:.4f} / {g['drop_points']:+.2f} / least {g['min_agreement']:.3f}" for g in gates.values()
        )
        + " |"
    )
    lines.append(
        "| **gate** | | "
        + " | ".join("passed" if g["passed"] else "FAILED: " + "; ".join(g["failures"]) for g in gates.values())
        + " |"
    )
    lines += [
        "",
        "Val mean per-patient Dice by fine-tuning epoch (the best epoch is kept):",
        "",
        "| epoch | " + " | ".join(f"{args.prefix}{w}" for w in histories) + " |",
        "|---|" + "---|" * len(histories),
    ]
    epochs = max(len(h) for h in histories.values())
    for i in range(epochs):
        lines.append(
            f"| {i + 1} | "
            + " | ".join(
                f"{float(h[i]['val_mean_patient_dice']):.4f}" if i < len(h) else "—" for h in histories.values()
            )
            + " |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    write_json_atomic(args.out / f"{args.name}.json", {"gates": gates, "histories": histories})
    print("\n".join(lines))


if __name__ == "__main__":
    main()

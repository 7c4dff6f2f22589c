"""Figures: training curves (loss, Dice, IoU, accuracy per epoch), as in the study. Headless matplotlib."""

from __future__ import annotations

import os
from pathlib import Path

from lggdeploy.common.files import atomic_path

CURVES = (
    ("loss", "train_loss", "val_loss", "Dice + BCE loss"),
    ("Dice", "train_dice", "val_mean_patient_dice", "Dice (val: mean per-patient)"),
    ("IoU", "train_iou", "val_mean_patient_iou", "IoU (val: mean per-patient)"),
    ("accuracy", "train_accuracy", "val_pixel_accuracy", "pixel accuracy"),
)


def plot_history(history: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (name, train_key, val_key, ylabel) in zip(axes, CURVES):
        ax.plot(epochs, [row[train_key] for row in history], "o-", label="train (augmented batches)")
        ax.plot(epochs, [row[val_key] for row in history], "s-", label="validation")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)

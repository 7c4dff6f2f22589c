"""Scoring a PyTorch model (or checkpoint) on patients: per-patient rows plus aggregates."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lggdeploy.common.errors import LggError
from lggdeploy.common.progress import progress_bar
from lggdeploy.data.arrays import SliceArrays, load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.split import load_split
from lggdeploy.data.transforms import Normalization
from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of, split_of
from lggdeploy.models.torch_runner import TorchRunner, resolve_device
from lggdeploy.postprocess import PostProcess
from lggdeploy.scoring import score_runner


def score_model(
    model: nn.Module,
    slices: SliceArrays,
    img_size: int,
    normalization: Normalization,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
    description: str = "evaluating",
    threshold: float = 0.5,
    on_logits: Callable[[np.ndarray, slice], None] | None = None,
    largest_component: bool = False,
    postprocess: PostProcess | None = None,
) -> dict:
    """score_runner on a PyTorch model (put in eval mode for the pass, then restored)."""
    was_training = model.training
    try:
        return score_runner(
            TorchRunner(model, str(device)),
            slices,
            img_size,
            normalization,
            batch_size,
            threshold,
            show_progress,
            description,
            on_logits,
            largest_component,
            postprocess,
        )
    finally:
        model.train(was_training)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    split: str = "test",
    split_file: str | os.PathLike | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict:
    """The nnU-Net-style summary: one row per patient plus aggregates, with provenance."""

    if batch_size < 1:
        raise LggError(f"--batch-size must be at least 1, got {batch_size}")
    torch_device = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    dataset = load_dataset(data)
    the_split = load_split(split_file) if split_file else split_of(ckpt)
    if split == "all":
        patients = dataset.patient_ids
    else:
        the_split.check_against(dataset, origin=str(split_file or checkpoint))
        patients = the_split.patients(split)
    with progress_bar() as bar:
        task = bar.add_task("reading slices", total=sum(len(dataset.patients[p].slices) for p in patients), info="")
        slices = load_slices(dataset, patients, on_slice=lambda: bar.advance(task))
    model = model_from_checkpoint(ckpt).to(torch_device)
    postprocess = PostProcess.from_json(ckpt.get("postprocess"))
    summary = score_model(
        model,
        slices,
        ckpt["img_size"],
        normalization_of(ckpt),
        batch_size,
        torch_device,
        threshold=ckpt["threshold"],
        largest_component=True,
        postprocess=postprocess,
    )
    summary["meta"] = _meta(checkpoint, ckpt, data, split, split_file, postprocess)
    return summary


def _meta(checkpoint, ckpt: dict, data, split: str, split_file, postprocess: PostProcess) -> dict:
    """Where an evaluation's figures come from: checkpoint, data, split, threshold and post-processing."""
    return {
        "checkpoint": str(checkpoint),
        "model": ckpt["model"]["name"],
        "data": str(data),
        "split": split,
        "split_file": str(split_file) if split_file else "embedded in checkpoint",
        "threshold": ckpt["threshold"],
        "threshold_origin": (
            f"tuned on {len(ckpt['threshold_tuning']['patients'])} val patients"
            if "threshold_tuning" in ckpt
            else "the checkpoint's, not tuned"
        ),
        "postprocess": postprocess.to_json(),
        "postprocess_origin": postprocess_origin(ckpt),
        "img_size": ckpt["img_size"],
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def postprocess_origin(ckpt: dict) -> str:
    """How the checkpoint's post-processing was chosen, in words (every step of postprocess.tune)."""
    tuning = ckpt.get("postprocess_tuning")
    if tuning is None:
        return "the checkpoint's" if ckpt.get("postprocess") else "none stored in the checkpoint"
    n = len(tuning["patients"])
    if tuning.get("kept"):
        text = (
            f"{tuning['fraction_of_smallest_train_tumor']:g} x the smallest train tumor ({tuning['smallest_train_tumor_voxels']} voxels), kept because on {n} val patients "
            f"{tuning['why']} ({tuning['val_mean_patient_dice_without']:.4f} -> {tuning['val_mean_patient_dice_with']:.4f})"
        )
    else:
        text = f"size rule rejected on {n} val patients ({tuning['why']})"
    confidence = tuning.get("confidence")
    if confidence:
        floor = confidence["candidate"]["min_mean_probability"]
        verdict = "kept" if confidence["kept"] else "rejected"
        text += (
            f"; mean-probability floor {floor:g} {verdict} ({confidence['why']}: "
            f"{confidence['val_mean_patient_dice_before']:.4f} -> {confidence['val_mean_patient_dice_after']:.4f})"
        )
    outline = tuning.get("outline")
    if outline:
        text += (
            f"; outlines redrawn by a dense CRF {'kept' if outline['kept'] else 'rejected'} ({outline['why']}: "
            f"{outline['val_mean_patient_dice_before']:.4f} -> {outline['val_mean_patient_dice_after']:.4f})"
        )
    return text


def default_eval_path(checkpoint: str | os.PathLike, split: str) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_eval_{split}.json")

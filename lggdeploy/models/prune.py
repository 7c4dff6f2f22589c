"""Structured channel pruning with Torch-Pruning (DepGraph), then fine-tuning: `lggdeploy prune`.

Group magnitude importance (L2) over dependency groups, the segmentation head left intact, channel counts
rounded to multiples of 8 (kernels prefer them), optionally in K steps with fine-tuning between them.
The result is an ordinary checkpoint: it records the pruned layer shapes (plain integers) so that
`model_from_checkpoint` rebuilds the smaller network from the smp spec — export, build, bench and the
runtime accept it unchanged — plus the recipe and the params/MACs before and after. Pruning a pruned
checkpoint works and appends to the recipe.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from lggdeploy.common.errors import LggError
from lggdeploy.common.files import check_can_create
from lggdeploy.models.networks import layer_shapes

logger = logging.getLogger(__name__)


def _torch_pruning():
    try:
        import torch_pruning as tp
    except ImportError:
        raise LggError(
            "structured pruning needs Torch-Pruning: pip install 'lggdeploy[prune]' (or pip install torch-pruning)"
        ) from None
    return tp


def count_macs_params(model: nn.Module, img_size: int) -> tuple[int, int]:
    tp = _torch_pruning()
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, img_size, img_size))
    model.train(was_training)
    return int(macs), int(params)


def prune_model(model: nn.Module, img_size: int, ratio: float, steps: int = 1, between_steps=None) -> dict:
    """Prune `model` in place by `ratio` of its channels over `steps` steps; `between_steps(k)` fine-tunes."""
    tp = _torch_pruning()
    if not 0 < ratio < 1:
        raise LggError(f"--ratio must be between 0 and 1 (exclusive), got {ratio}")
    if steps < 1:
        raise LggError(f"--steps must be at least 1, got {steps}")
    model.eval()
    example = torch.zeros(2, 3, img_size, img_size)
    head = [m for m in model.segmentation_head.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    macs_before, params_before = count_macs_params(model, img_size)
    shapes_before = layer_shapes(model)
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        iterative_steps=steps,
        ignored_layers=head,
        round_to=8,
    )
    for step in range(steps):
        pruner.step()
        if between_steps is not None:
            between_steps(step)
    macs_after, params_after = count_macs_params(model, img_size)
    shapes_after = layer_shapes(model)
    changed = sorted(n for n in shapes_after if shapes_after[n] != shapes_before.get(n))
    convs = [n for n, s in shapes_before.items() if "out_channels" in s]
    grouped = [n for n in convs if shapes_before[n]["groups"] > 1]
    return {
        "method": "torch-pruning MetaPruner, GroupMagnitudeImportance(p=2), round_to=8, segmentation head ignored",
        "ratio": ratio,
        "steps": steps,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "params_before": params_before,
        "params_after": params_after,
        "layers_changed": len(changed),
        "conv_layers_unchanged": sorted(n for n in convs if n not in changed),
        "grouped_or_depthwise_convs": len(grouped),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def check_distill_weight(weight: float) -> None:
    """The teacher's share of the fine-tuning loss after pruning: `prune` and `optimize` check it before any work."""
    if not 0 < weight <= 1:
        raise LggError(
            f"--distill-weight must lie in (0, 1] (the teacher's share of the fine-tuning loss; --no-distill for none), got {weight}"
        )


def check_prune_options(
    ratio: float,
    steps: int,
    finetune_epochs: int,
    lr: float,
    batch_size: int,
    device: str,
    distill: bool,
    weight: float,
) -> None:
    """Every option of `prune` checked before any work (a NaN ratio once reached a path name and a traceback)."""
    if not (math.isfinite(ratio) and 0 < ratio < 1):
        raise LggError(f"--ratio must be between 0 and 1 (exclusive), got {ratio}")
    if steps < 1:
        raise LggError(f"--steps must be at least 1, got {steps}")
    if finetune_epochs < 0:
        raise LggError(f"--finetune-epochs must be 0 (no fine-tuning) or more, got {finetune_epochs}")
    if finetune_epochs:
        if not (math.isfinite(lr) and lr > 0):
            raise LggError(f"--lr must be a positive number, got {lr}")
        if batch_size < 2:
            raise LggError(f"--batch-size must be at least 2 (batch norm needs 2 samples), got {batch_size}")
        from lggdeploy.models.torch_runner import resolve_device

        resolve_device(device)
    if distill:
        check_distill_weight(weight)


def prune_checkpoint(
    checkpoint: str | os.PathLike,
    ratio: float,
    out: str | os.PathLike | None = None,
    steps: int = 1,
    finetune_epochs: int = 0,
    data: str | os.PathLike | None = None,
    lr: float = 1e-4,
    batch_size: int = 8,
    device: str = "auto",
    distill: bool = True,
    distill_weight: float = 0.5,
) -> Path:
    """Prune (and fine-tune) a checkpoint; returns the path of the new checkpoint (best.pt of its run folder)."""
    from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint

    check_prune_options(ratio, steps, finetune_epochs, lr, batch_size, device, distill, distill_weight)
    ckpt = load_checkpoint(checkpoint)
    parent = Path(checkpoint).parent
    out = Path(out) if out else parent.parent / f"{parent.name}-pruned{int(round(ratio * 100))}"
    if finetune_epochs:
        from lggdeploy.data.kaggle import resolve_data_root

        data = resolve_data_root(data, ckpt.get("data_root"), "fine-tuning after pruning")
    if (out / "last.pt").exists() or (out / "best.pt").exists():
        raise LggError(f"{out} already holds a checkpoint; choose another -o")
    check_can_create(out)  # before the pruning and fine-tuning work
    model = model_from_checkpoint(ckpt)
    epochs_per_step = max(1, finetune_epochs // steps) if finetune_epochs else 0
    settings = {"data": data, "lr": lr, "batch_size": batch_size, "device": device}
    tuner = _StageTuner(Path(checkpoint), ckpt, model, out, epochs_per_step, steps, settings, distill, distill_weight)
    recipe = prune_model(model, ckpt["img_size"], ratio, steps, tuner)
    recipe["finetune_epochs"] = epochs_per_step * steps
    recipe["distillation"] = (
        {"teacher": str(checkpoint), "weight": distill_weight, "targets": "the unpruned model's sigmoid outputs"}
        if distill and finetune_epochs
        else None
    )
    recipe["finetune"] = [{"step": st["step"], "best": st["best"]} for st in tuner.stages]
    logger.info(
        f"params {recipe['params_before'] / 1e6:.2f}M -> {recipe['params_after'] / 1e6:.2f}M, "
        f"MACs {recipe['macs_before'] / 1e9:.2f}G -> {recipe['macs_after'] / 1e9:.2f}G at {ckpt['img_size']} px; "
        f"{recipe['layers_changed']} layers changed"
    )
    return tuner.save(recipe, out / "best.pt", **tuner.final_scores())


class _StageTuner:
    """Called by prune_model between pruning steps: fine-tunes the pruned model for its share of the epochs
    (distilled from the unpruned checkpoint), loads the best weights back into it, and records the stage."""

    def __init__(self, checkpoint: Path, ckpt: dict, model: nn.Module, out: Path, epochs: int, steps: int,
                 settings: dict, distill: bool, distill_weight: float):  # fmt: skip
        self.checkpoint, self.ckpt, self.model, self.out = checkpoint, ckpt, model, out
        self.epochs, self.steps, self.settings = epochs, steps, settings
        self.teacher = checkpoint if distill else None
        self.distill_weight = distill_weight
        self.stages: list[dict] = []

    def save(self, recipe_entry: dict | None, path: Path, **overrides) -> Path:
        from lggdeploy.models.checkpoint import make_payload, save_checkpoint

        ckpt = self.ckpt
        pruning = list(ckpt.get("pruning", [])) + ([recipe_entry] if recipe_entry else [])
        payload = make_payload(
            self.model, ckpt, pruned=True, pruning=pruning, pruned_from=str(self.checkpoint), **overrides
        )
        return save_checkpoint(path, payload)

    def final_scores(self) -> dict:
        """best.pt's validation record: the last stage's, or none (the unpruned model's says nothing of the pruned)."""
        if not self.stages:
            note = {"epoch": None, "val_mean_patient_dice": None, "note": "pruned without fine-tuning: not validated"}
            return {"best": note, "history": []}
        return {"best": self.stages[-1]["best"], "history": [row for st in self.stages for row in st["history"]]}

    def __call__(self, step: int) -> None:
        from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint
        from lggdeploy.models.train import TrainConfig, train

        if not self.epochs:
            return
        n = len(self.stages) + 1
        start = self.save(None, self.out / f"stage{n}_start.pt")
        ckpt = self.ckpt
        result = train(
            TrainConfig(
                model=ckpt["model"]["name"],
                out=self.out / f"stage{n}",
                epochs=self.epochs,
                img_size=ckpt["img_size"],
                init_checkpoint=start,
                teacher=self.teacher,
                distill_weight=self.distill_weight,
                # the original's own missing-sequence share (0 for checkpoints from before it existed)
                missing_modality=float(ckpt.get("train_config", {}).get("missing_modality", 0.0)),
                **self.settings,
            )
        )
        tuned = model_from_checkpoint(load_checkpoint(result.best_path))
        self.model.load_state_dict(tuned.state_dict())
        self.stages.append({"step": step + 1, "history": result.history, "best": result.best})
        dice = result.best["val_mean_patient_dice"]
        logger.info(f"pruning step {step + 1}/{self.steps}: fine-tuned, val per-patient Dice {dice:.4f}")

"""Training: Dice + BCE, AdamW, warm-up + cosine schedule, AMP on CUDA / bf16 on capable CPUs, seeded, resumable,
DDP through torchrun. Recipe options (models/recipe.py): the loss's overlap term, tumor-slice oversampling, an EMA
of the weights; the decision threshold is tuned on the val patients (models/threshold.py) and stored.

Outputs in `out/`: best.pt (best validation mean per-patient Dice), last.pt (with optimizer state, for
--resume), split.json, history.csv / history.json, curves.png. Every file is written atomically, so a
Ctrl-C or a kill leaves the last good checkpoint intact.

Multi-GPU: `torchrun --nproc_per_node N -m lggdeploy.cli train ...` (WORLD_SIZE > 1 turns on
DistributedDataParallel; rank 0 validates and writes).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lggdeploy.common.errors import LggError
from lggdeploy.common.files import (
    check_can_create,
    ensure_folder,
    remove_stale_temporaries,
    write_json_atomic,
    write_text_atomic,
)
from lggdeploy.common.machine import cpu_has_amx_bf16, cpu_has_bf16
from lggdeploy.common.progress import progress_bar
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.split import load_split, make_split, save_split
from lggdeploy.data.transforms import (
    Augmentation,
    Normalization,
    masks_and_probabilities,
    random_crops,
    resize_images,
    resize_masks,
)
from lggdeploy.metrics import confusion_counts, dice_from_counts, iou_from_counts
from lggdeploy.models import threshold as threshold_tuning
from lggdeploy.models.checkpoint import load_checkpoint, make_payload, model_from_checkpoint, save_checkpoint, split_of
from lggdeploy.models.config import TrainConfig
from lggdeploy.models.curves import plot_history
from lggdeploy.models.evaluate import score_model
from lggdeploy.models.networks import build_model, count_parameters
from lggdeploy.models.presets import resolve_model
from lggdeploy.models.recipe import (
    AuxiliaryHead,
    epoch_order,
    lr_factor,
    make_ema,
    segmentation_loss,
    set_batch_norm_momentum,
)
from lggdeploy.models.torch_runner import resolve_device
from lggdeploy.outline import OutlineCRF
from lggdeploy.postprocess import PostProcess, smallest_tumor, tuned_val_dice
from lggdeploy.postprocess import tune as tune_postprocess

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "train", "Trainer"]


@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    seconds: float = 0.0


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE with logits + soft Dice over the whole batch (one pooled volume, like the per-patient metric)."""
    return segmentation_loss(logits, target, "dice")


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _history_csv(history: list[dict]) -> str:
    """The history as CSV; every column any row has (a run resumed from an older lggdeploy gains columns)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for row in history for key in row)))
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


# Fixed for the life of a run: --resume takes them from last.pt and refuses a flag that contradicts them.
FIXED_ON_RESUME = (
    "model",
    "img_size",
    "batch_size",
    "lr",
    "weight_decay",
    "seed",
    "augment",
    "encoder_weights",
    "split_file",
    "threshold",
    "precision",
    "channels_last",
    "teacher",
    "distill_weight",
    "loss",
    "tumor_fraction",
    "warmup_epochs",
    "ema_decay",
    "tune_threshold",
    "postprocess",
    "missing_modality",
    "normalization",
    "bn_momentum",
    "crop_size",
    "aux_weight",
)


def _as_config_value(key: str, value):
    return Path(value) if key == "split_file" and value is not None else value


# What a run started before the recipe options existed trained with: resuming it keeps that, not today's defaults.
LEGACY_RECIPE = {
    "loss": "dice",
    "tumor_fraction": None,
    "warmup_epochs": 0.0,
    "ema_decay": 0.0,
    "tune_threshold": False,
    "postprocess": "none",
    "missing_modality": 0.0,
    "normalization": "fixed",
    "bn_momentum": 0.0,
    "crop_size": 0,
    "aux_weight": 0.0,
}


def _postprocess_fields(
    choice: str, val_logits: list[np.ndarray], val_slices, threshold: float, train_smallest_tumor: int | None
) -> dict:
    """The checkpoint's post-processing: the user's, or (auto) the one postprocess.tune keeps on the val patients'
    masks at the stored threshold, with its record."""
    if choice != "auto":
        return {"postprocess": PostProcess.parse(choice).to_json()}
    predicted, probabilities = masks_and_probabilities(
        np.concatenate(val_logits), threshold=threshold, every_pixel=True
    )
    record = tune_postprocess(
        predicted,
        val_slices.masks,
        val_slices.patients,
        train_smallest_tumor,
        probabilities=probabilities,
        images=val_slices.images,
        outline=OutlineCRF(),
    )
    return {"postprocess": record["postprocess"], "postprocess_tuning": record}


def resume_config(cfg: TrainConfig, saved: dict, last_path: Path) -> tuple[TrainConfig, dict]:
    """The configuration a resumed run continues with: the saved one. A flag the user gave that contradicts it is
    refused; --epochs may grow the run (recorded; the learning-rate schedule keeps its original length)."""
    saved = {**LEGACY_RECIPE, **saved}
    explicit = cfg.given()
    conflicts = []
    for key in FIXED_ON_RESUME:
        if key in explicit and key in saved and str(getattr(cfg, key)) != str(saved[key]):
            conflicts.append(f"--{key.replace('_', '-')} {getattr(cfg, key)} (the run has {saved[key]})")
    if conflicts:
        raise LggError(
            f"--resume: {last_path} was started with other settings: {'; '.join(conflicts)}. Resume without these flags "
            "(the run's own settings are used), or start a new run with another --out"
        )
    merged = replace(cfg, **{k: _as_config_value(k, saved[k]) for k in FIXED_ON_RESUME if k in saved})
    if "epochs" not in explicit:
        merged = replace(merged, epochs=int(saved["epochs"]))
    changed = {"epochs": [int(saved["epochs"]), merged.epochs]} if merged.epochs != int(saved["epochs"]) else {}
    return merged, changed


def autocast_dtype(precision: str, device: torch.device):
    """The mixed-precision type training computes in, or None for FP32.

    auto: fp16 AMP on CUDA; on a CPU bf16 autocast only with AMX, FP32 otherwise — on an AVX512-BF16 CPU without AMX,
    bf16 + channels-last was measured slower than FP32 + channels-last (benchmarks/results/recipe/train_speed*.md).
    An explicit bf16 is accepted wherever the CPU has native bf16 (AVX512-BF16 or AMX)."""

    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else ("bf16" if cpu_has_amx_bf16() else "fp32")
    if precision == "fp16" and device.type != "cuda":
        raise LggError("--precision fp16 trains only on CUDA (AMP); on a CPU use bf16 (AVX512-BF16/AMX) or fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        raise LggError(
            "--precision bf16: this CPU has no AVX512-BF16 or AMX (bf16 would be emulated and slower); use fp32"
        )
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def rng_state() -> dict:
    """Every random number generator training draws from (torch CPU and CUDA, numpy, Python), weights_only-loadable."""
    import random

    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"])
    )
    random.setstate(state["python"])


def _gather_rng_states(world: int) -> list[dict]:
    """Each process's generators (DDP: one state per rank, gathered on every rank; rank 0 saves them)."""
    if world == 1:
        return [rng_state()]
    states: list = [None] * world
    torch.distributed.all_gather_object(states, rng_state())
    return states


BUDGET_REVISED_UNTIL = 0.5  # a budgeted run re-decides its length after each epoch before this share of its epochs
PARTIAL_EPOCH_MIN_SHARE = 0.25  # a budgeted run's last epoch, when shorter, holds at least this share of an epoch
RECENT_EPOCHS = 3  # past the middle, a budgeted run prices its remaining epochs by the median of this many last ones


def steps_within_budget(
    budget_s: float,
    elapsed_s: float,
    step_s: float,
    val_s: float,
    steps_per_epoch: int,
    cap: int | None,
    done: int = 1,
) -> int:
    """Training steps a budgeted run takes in all. `done` whole epochs ended `elapsed_s` after the run started; an epoch
    is `steps_per_epoch` steps of `step_s` and a validation of `val_s`. What is left of `budget_s` (3 % kept as margin
    for noise) holds as many whole epochs as fit, then a shorter last epoch of the steps that fit before its own
    validation, when they are at least PARTIAL_EPOCH_MIN_SHARE of an epoch (fewer would buy little for a
    validation). At least `done` epochs, at most `cap` epochs."""
    left = max(0.0, budget_s - elapsed_s) * 0.97
    epoch_s = max(steps_per_epoch * step_s + val_s, 1e-9)
    whole = int(left // epoch_s)
    if cap and done + whole >= cap:
        return max(done, cap) * steps_per_epoch
    partial = min(int(max(0.0, left - whole * epoch_s - val_s) // max(step_s, 1e-9)), steps_per_epoch - 1)
    if partial < PARTIAL_EPOCH_MIN_SHARE * steps_per_epoch:
        partial = 0
    return (done + whole) * steps_per_epoch + partial


def train(cfg: TrainConfig) -> TrainResult:
    """One training run (see Trainer for its phases)."""
    return Trainer(cfg).run()


class Trainer:
    """A training run as named phases (nnU-Net's shape): `run` reads as the order of a run; the state lives here.

    on_train_start: where to start from (a new run, --resume, or fine-tuning weights), the network, the data, the
    optimizer and schedule. Per epoch: on_epoch_start (the epoch's slice order), train_step per batch, on_epoch_end
    (validation, the wall-clock budget's decision after epoch 1, best.pt / last.pt / history). on_train_end: the result.
    """

    def __init__(self, cfg: TrainConfig):
        self.run_started = time.perf_counter()
        cfg.validate()
        self.cfg = cfg
        self.world, self.rank, local_rank = _distributed()
        self.device = resolve_device(cfg.device, local_rank)
        self.main = self.rank == 0
        self.out = Path(cfg.out)
        self.last_path, self.best_path = self.out / "last.pt", self.out / "best.pt"

    def run(self) -> TrainResult:
        self.on_train_start()
        with progress_bar(self.cfg.show_progress and self.main) as self.bar:
            self.epoch_task = self.bar.add_task(
                "epochs", total=None if self.budgeted else self.cfg.epochs, completed=self.epoch, info=""
            )
            while self.epoch < self.n_epochs:
                self.epoch += 1
                self.on_epoch_start()
                for step in range(self.steps_in_epoch(self.epoch)):
                    self.train_step(step)
                self.on_epoch_end()
        return self.on_train_end()

    # --- on_train_start --------------------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self.init_distributed()
        self.load_start_state()
        self.build_network()
        self.load_data()
        self.configure_optimization()
        self.restore_state()
        self.started = time.perf_counter()
        if self.main:
            logger.info(self.describe())

    def init_distributed(self) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)

    def load_start_state(self) -> None:
        """The checkpoints the run starts from: last.pt on --resume (its settings win), or --init-checkpoint's."""
        cfg, out, last_path = self.cfg, self.out, self.last_path
        self.resume_ckpt = None
        self.resumes: list[dict] = []
        if cfg.resume:
            if not last_path.is_file():
                raise LggError(f"--resume: no {last_path} to resume from; drop --resume to start a new run in {out}")
            self.resume_ckpt = load_checkpoint(last_path)
            if self.resume_ckpt["model"]["name"] != cfg.model:
                raise LggError(f"--resume: {last_path} trained {self.resume_ckpt['model']['name']}, not {cfg.model}")
            cfg, changed = resume_config(cfg, self.resume_ckpt.get("train_config", {}), last_path)
            after = {"after_epoch": int(self.resume_ckpt["epoch"]), "changed": changed}
            self.resumes = [*self.resume_ckpt.get("resumes", []), after]
            cfg.validate()
        elif self.main and last_path.exists():
            raise LggError(
                f"{out} already holds a training run (last.pt): pass --resume to continue it, or choose another --out"
            )
        if self.main and out.is_dir():
            remove_stale_temporaries(out)  # the .tmp files of a run that was killed (SIGKILL) while writing
        self.init_ckpt = init = (
            load_checkpoint(cfg.init_checkpoint) if cfg.init_checkpoint and self.resume_ckpt is None else None
        )
        if init is not None and init["img_size"] != cfg.img_size:
            raise LggError(
                f"--img-size {cfg.img_size} differs from the {init['img_size']} px the initial checkpoint was trained at"
            )
        if init is not None and "threshold" not in cfg.given() and cfg.threshold == TrainConfig.threshold:
            cfg = replace(cfg, threshold=float(init["threshold"]))  # fine-tuning keeps the threshold it starts from
        self.cfg = cfg

    def build_network(self) -> None:
        """The model (and its encoder weights) before anything is written: a bad name or weights file leaves no
        folder behind."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        self.spec = resolve_model(cfg.model)
        self.normalization = Normalization(mode=cfg.normalization)
        start_from = self.resume_ckpt if self.resume_ckpt is not None else self.init_ckpt
        if start_from is None:
            built = build_model(self.spec, cfg.encoder_weights)
            self.model = built.model
            self.weights_info = {
                "encoder_weights": built.encoder_weights,
                "encoder_weights_sha256": built.encoder_weights_sha256,
                "dropped_modules": built.dropped_modules,
            }
            return
        self.model = model_from_checkpoint(start_from).train()
        self.weights_info = {k: start_from[k] for k in CARRIED_WEIGHTS_INFO if k in start_from}
        self.normalization = Normalization.from_json(
            start_from["normalization"], origin=str(cfg.init_checkpoint or cfg.out)
        )
        if "normalization" in cfg.given() and self.normalization.mode != cfg.normalization:
            raise LggError(
                f"--normalization {cfg.normalization} differs from the {self.normalization.mode!r} normalization "
                "the checkpoint was trained with"
            )
        self.cfg = replace(cfg, normalization=self.normalization.mode)  # the record says what the run feeds the model

    def load_data(self) -> None:
        cfg = self.cfg
        if self.main:
            check_can_create(self.out)  # an unwritable --out is refused before the data are read
        dataset = load_dataset(cfg.data)
        self.split = split = self.choose_split(dataset)
        split.check_against(dataset, origin=str(cfg.split_file or "split"))
        if not split.val:
            raise LggError(
                "the split has no validation patients: training keeps the best checkpoint by validation Dice"
            )
        with progress_bar(cfg.show_progress and self.main) as bar:
            total = sum(len(dataset.patients[p].slices) for p in split.train + split.val)
            task = bar.add_task("reading slices", total=total, info="")
            self.train_slices = load_slices(dataset, split.train, on_slice=lambda: bar.advance(task))
            self.val_slices = load_slices(dataset, split.val, on_slice=lambda: bar.advance(task))
        if self.main:
            ensure_folder(self.out)
            save_split(split, self.out / "split.json")
        masks = self.train_slices.masks
        self.train_images = resize_images(self.train_slices.images, cfg.img_size)
        self.train_masks = resize_masks(masks, cfg.img_size)
        self.train_tumor = masks.reshape(len(self.train_slices), -1).any(axis=1)
        self.train_smallest_tumor = smallest_tumor(masks, self.train_slices.patients)  # bounds the post-processing
        val_masks = resize_masks(self.val_slices.masks, cfg.img_size)
        self.val_targets = torch.from_numpy(val_masks).unsqueeze(1).float()  # for the val loss, once

    def choose_split(self, dataset):
        """The run's own split on --resume, the initial checkpoint's when fine-tuning, else --split-file or a new one."""
        cfg = self.cfg
        if self.resume_ckpt is not None:
            return split_of(self.resume_ckpt)
        if self.init_ckpt is not None and not cfg.split_file:
            return split_of(self.init_ckpt)
        if cfg.split_file:
            return load_split(cfg.split_file)
        return make_split(dataset, seed=cfg.seed)

    def configure_optimization(self) -> None:
        cfg, model, device = self.cfg, self.model, self.device
        set_batch_norm_momentum(model, cfg.bn_momentum)
        model.to(device)
        self.teacher = self.load_teacher()
        self.compute_dtype = autocast_dtype(cfg.precision, device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        self.net: nn.Module = model
        if self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        # Each rank takes its own share of the same seeded permutation (what DistributedSampler does).
        n_train = len(self.train_images)
        self.per_rank = per_rank = n_train // self.world
        self.steps_per_epoch = per_rank // cfg.batch_size + (1 if per_rank % cfg.batch_size >= 2 else 0)
        if self.steps_per_epoch < 1:
            raise LggError(
                f"{n_train} training slices are too few for --batch-size {cfg.batch_size} on {self.world} process(es)"
            )
        self.ema = make_ema(model, cfg.ema_decay) if cfg.ema_decay else None
        self.aux = self.attach_auxiliary_head()  # after the EMA's copy of the model, which must not carry its hook
        parameters = [*model.parameters(), *(self.aux.parameters() if self.aux is not None else ())]
        self.optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.plan_schedule()
        warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.schedule_steps, warmup_steps)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.compute_dtype == torch.float16)
        self.augment = Augmentation(missing_modality=cfg.missing_modality)

    def attach_auxiliary_head(self) -> AuxiliaryHead | None:
        """--aux-weight: the training-only head on the encoder's stage before its last, or None."""
        cfg = self.cfg
        if not cfg.aux_weight:
            return None
        aux = AuxiliaryHead.attach(self.model, cfg.img_size).to(self.device)
        if cfg.channels_last:
            aux.to(memory_format=torch.channels_last)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            aux = nn.parallel.DistributedDataParallel(aux, device_ids=ids)
        return aux

    @property
    def aux_head(self) -> AuxiliaryHead:
        return self.aux.module if isinstance(self.aux, nn.parallel.DistributedDataParallel) else self.aux

    def load_teacher(self) -> nn.Module | None:
        """Distillation's teacher (fine-tuning a pruned model), frozen, or None."""
        cfg = self.cfg
        if cfg.teacher is None:
            return None
        teacher_ckpt = load_checkpoint(cfg.teacher)
        if teacher_ckpt["img_size"] != cfg.img_size:
            raise LggError(
                f"the teacher {cfg.teacher} works at {teacher_ckpt['img_size']} px, the run at {cfg.img_size} px: "
                "distil at the teacher's size"
            )
        teacher = model_from_checkpoint(teacher_ckpt).to(self.device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        return teacher

    def plan_schedule(self) -> None:
        """The run's length and its cosine's: the configured epochs; on --resume the length the run was started
        with (epochs added run at the final lr); with a budget, provisional until epoch 1 is timed."""
        cfg, resume = self.cfg, self.resume_ckpt
        if resume is not None:
            self.schedule_epochs = int(resume.get("schedule_epochs", resume["train_config"]["epochs"]))
        else:
            self.schedule_epochs = cfg.epochs
        self.budgeted = cfg.budget_minutes is not None and resume is None
        self.explicit_epochs = "epochs" in cfg.given()
        if self.budgeted and not self.explicit_epochs:
            self.cfg = replace(cfg, epochs=1000)  # the budget decides; 1000 is only the cap
            self.schedule_epochs = TrainConfig.epochs  # provisional cosine length for epoch 1
        self.schedule_steps = self.schedule_epochs * self.steps_per_epoch
        if resume is not None and "schedule_steps" in resume:  # a budgeted run's last epoch may be partial
            self.schedule_steps = int(resume["schedule_steps"])
        self.n_epochs = self.cfg.epochs
        self.config_record = {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items() if k != "explicit"
        }
        saved_budget = resume.get("budget") if resume is not None else None
        self.budget_record: dict | None = dict(saved_budget) if saved_budget else None

    def fix_steps(self, total: int) -> None:
        """The budget's decision, on every rank: the run's length in steps and its cosine's; the last epoch holds
        what is left over whole epochs."""
        self.schedule_steps = total
        self.n_epochs = self.schedule_epochs = -(-total // self.steps_per_epoch)
        self.config_record["epochs"] = self.n_epochs

    def steps_in_epoch(self, epoch: int) -> int:
        """An epoch's training steps: a whole epoch, but for a budgeted run's last, which may be shorter."""
        if epoch == self.schedule_epochs:
            return self.schedule_steps - (self.schedule_epochs - 1) * self.steps_per_epoch
        return self.steps_per_epoch

    def restore_state(self) -> None:
        """--resume: optimizer, schedule, scaler, EMA, history and every random generator as last.pt left them."""
        self.history: list[dict] = []
        self.best: dict = {"epoch": 0, "val_mean_patient_dice": -1.0}
        self.epoch = 0
        resume = self.resume_ckpt
        if resume is None:
            return
        self.optimizer.load_state_dict(resume["optimizer"])
        self.scheduler.load_state_dict(resume["scheduler"])
        self.scaler.load_state_dict(resume["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(resume["ema_state_dict"])
        if self.aux is not None:
            self.aux_head.load_state_dict(resume["aux_state_dict"])
        self.history = list(resume["history"])
        self.best = dict(resume["best"])
        self.epoch = int(resume["epoch"])
        states = resume.get("rng_states") or [{"torch": resume["torch_rng"], "numpy": None}]
        if states[0].get("numpy") is None:  # a checkpoint of an older lggdeploy: the CPU generator only
            torch.set_rng_state(states[0]["torch"])
        else:
            set_rng_state(states[self.rank] if self.rank < len(states) else states[0])
        if self.epoch + 1 > self.cfg.epochs:
            raise LggError(
                f"--resume: {self.last_path} already finished epoch {self.epoch} of {self.cfg.epochs}; "
                "raise --epochs to train longer"
            )

    def describe(self) -> str:
        cfg, split, dtype = self.cfg, self.split, self.compute_dtype
        compute = str(dtype).removeprefix("torch.") if dtype else "float32"
        return (
            f"{self.spec.name}: {count_parameters(self.model) / 1e6:.2f}M parameters, "
            f"encoder weights {self.weights_info['encoder_weights']}, "
            f"{len(split.train)} train / {len(split.val)} val patients "
            f"({len(self.train_images)} / {len(self.val_slices)} slices), {cfg.img_size}px"
            f"{f' (training on {cfg.crop_size}px crops)' if 0 < cfg.crop_size < cfg.img_size else ''}, device {self.device}"
            f"{f', {self.world} processes' if self.world > 1 else ''}, compute {compute}"
            f"{', channels-last' if cfg.channels_last else ''}"
        )

    # --- one epoch -------------------------------------------------------------------------------------------------

    def on_epoch_start(self) -> None:
        cfg, epoch, rank = self.cfg, self.epoch, self.rank
        self.epoch_started = time.perf_counter()
        order = epoch_order(self.train_tumor, cfg.seed * 100_003 + epoch, cfg.tumor_fraction or None)
        self.order = order[rank * self.per_rank : (rank + 1) * self.per_rank]
        self.aug_generator = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 31 + rank)
        self.net.train()
        self.losses: list[float] = []
        self.counts = np.zeros(4, np.int64)
        self.seen_tumor = self.seen = 0
        total = "?" if self.budgeted and epoch == 1 else self.n_epochs
        self.step_task = self.bar.add_task(f"epoch {epoch}/{total}", total=self.steps_in_epoch(epoch), info="")

    def train_step(self, step: int) -> None:
        cfg, device = self.cfg, self.device
        idx = self.order[step * cfg.batch_size : (step + 1) * cfg.batch_size].numpy()
        x, y = self.batch(idx)
        autocast = {"dtype": self.compute_dtype or torch.float32, "enabled": self.compute_dtype is not None}
        with torch.autocast(device.type, **autocast):
            logits = self.net(x)
        loss = segmentation_loss(logits.float(), y, cfg.loss)
        if self.aux is not None:
            with torch.autocast(device.type, **autocast):
                aux_logits = self.aux(tuple(y.shape[-2:]))
            loss = loss + cfg.aux_weight * segmentation_loss(aux_logits.float(), y, cfg.loss)
        if self.teacher is not None:
            with torch.no_grad(), torch.autocast(device.type, **autocast):
                soft = torch.sigmoid(self.teacher(x).float())
            distilled = F.binary_cross_entropy_with_logits(logits.float(), soft)
            loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * distilled
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.losses.append(loss.item())
        self.seen_tumor += int(self.train_tumor[idx].sum())
        self.seen += len(idx)
        predicted = (logits.detach() > 0).cpu().numpy()[:, 0]
        self.counts += confusion_counts(predicted, y.cpu().numpy()[:, 0] > 0.5).sum(axis=0)
        self.bar.update(self.step_task, advance=1, info=f"loss {np.mean(self.losses):.4f}")

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Training slices `idx`, augmented and normalized, on the device."""
        cfg = self.cfg
        x01 = torch.from_numpy(self.train_images[idx]).permute(0, 3, 1, 2).float().div_(255)
        y = torch.from_numpy(self.train_masks[idx]).unsqueeze(1).float()
        if cfg.augment:
            x01, y = self.augment(x01, y, self.aug_generator)
        x = self.normalization.apply_torch(x01)  # of the whole slice, as at inference, before any crop
        if cfg.crop_size:  # random_crops leaves a slice no larger than the crop as it is
            x, y = random_crops(x, y, cfg.crop_size, self.aug_generator)
        x = x.to(self.device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def on_epoch_end(self) -> None:
        self.bar.remove_task(self.step_task)
        rng_states = _gather_rng_states(self.world)  # before validation: a resumed epoch draws what this one would
        deciding = self.budget_decides_now()  # the same answer on every rank (n_epochs is shared)
        if self.main:
            row, val_logits = self.validate()
            self.history.append(row)
            if deciding:
                self.apply_budget()
            self.save_checkpoints(row, val_logits, rng_states)
            best = self.best
            self.bar.update(
                self.epoch_task,
                advance=1,
                info=f"val per-patient Dice {row['val_mean_patient_dice']:.4f} "
                f"(best {best['val_mean_patient_dice']:.4f} @ {best['epoch']})",
            )
        if self.world > 1:
            if deciding:
                decided = [self.schedule_steps]
                torch.distributed.broadcast_object_list(decided, src=0)
                self.fix_steps(int(decided[0]))
            torch.distributed.barrier()

    def budget_decides_now(self) -> bool:
        """A budgeted run decides its length after epoch 1 and revises it after every epoch before the cosine's
        middle (BUDGET_REVISED_UNTIL of its epochs): epoch 1 alone is a noisy clock on a shared machine. After the
        middle it checks, after every epoch but the last, that the planned length still fits (`past_middle`)."""
        return self.budgeted and (self.epoch == 1 or self.epoch < self.n_epochs)

    def past_middle(self) -> bool:
        """Whether the run's length is settled, so that a budget decision may only shorten it."""
        return self.epoch > 1 and self.epoch >= BUDGET_REVISED_UNTIL * self.n_epochs

    def validate(self) -> tuple[dict, list[np.ndarray]]:
        """The epoch's history row (train figures, val loss and per-patient metrics) and the val logits when the
        threshold or the post-processing is tuned on them."""
        cfg, val_slices = self.cfg, self.val_slices
        validation_started = time.perf_counter()
        val_losses: list[float] = []
        val_logits: list[np.ndarray] = []

        def add_val_loss(logits: np.ndarray, batch: slice) -> None:
            loss = segmentation_loss(torch.from_numpy(logits), self.val_targets[batch], cfg.loss)
            val_losses.append(loss.item() * len(logits))
            if cfg.tune_threshold or cfg.postprocess == "auto":
                val_logits.append(np.array(logits, np.float32, copy=True))

        val = self.score(self.kept_model, on_logits=add_val_loss)
        agg = val["aggregates"]
        tp, fp, fn, tn = self.counts
        row = {
            "epoch": self.epoch,
            "steps": len(self.losses),
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": float(np.mean(self.losses)),
            "train_tumor_slice_fraction": round(self.seen_tumor / self.seen, 4),
            "train_dice": float(dice_from_counts(tp, fp, fn)),
            "train_iou": float(iou_from_counts(tp, fp, fn)),
            "train_accuracy": float((tp + tn) / self.counts.sum()),
            "val_loss": float(np.sum(val_losses) / len(val_slices)),
            "val_mean_patient_dice": agg["mean_patient_dice"],
            "val_median_patient_dice": agg["median_patient_dice"],
            "val_mean_patient_iou": agg["mean_patient_iou"],
            "val_global_dice": agg["global_dice"],
            "val_pixel_accuracy": agg["pixel_accuracy"],
            "val_patients_missed": agg["patients_missed"],
        }
        if self.ema is not None:  # the raw weights too, to see what the EMA buys
            raw = self.score(self.model)
            row["val_mean_patient_dice_raw_weights"] = raw["aggregates"]["mean_patient_dice"]
        now = time.perf_counter()
        row["seconds"] = round(now - self.epoch_started, 2)
        row["val_seconds"] = round(now - validation_started, 2)
        return row, val_logits

    @property
    def kept_model(self) -> nn.Module:
        """The model the run keeps: the EMA of the weights when on (validated, selected and saved as best.pt)."""
        return self.ema.module if self.ema is not None else self.model

    def score(self, model: nn.Module, on_logits=None) -> dict:
        cfg = self.cfg
        return score_model(
            model, self.val_slices, cfg.img_size, self.normalization, cfg.eval_batch_size, self.device,
            show_progress=False, threshold=cfg.threshold, on_logits=on_logits,
        )  # fmt: skip

    def apply_budget(self) -> None:
        """After epoch 1 of a budgeted run, and again after each epoch before the cosine's middle: the training steps
        that end the run within --budget-minutes, from the median epoch so far (its training steps and its
        validation timed apart, so that a shorter last epoch is priced right). Past the middle, from the median of
        the last RECENT_EPOCHS epochs, and only to shorten the run: a machine that slowed down after the length was
        settled would otherwise carry the run past its budget (the cosine's tail is then re-spanned over the fewer
        steps left, a small step down in a learning rate already near its floor)."""
        cfg, epoch, per_epoch = self.cfg, self.epoch, self.steps_per_epoch
        settled = self.past_middle()
        rows = self.history[-RECENT_EPOCHS:] if settled else self.history
        elapsed = time.perf_counter() - self.run_started
        epoch_s = float(np.median([row["seconds"] for row in rows]))
        val_s = float(np.median([row["val_seconds"] for row in rows]))
        step_s = float(np.median([(row["seconds"] - row["val_seconds"]) / row["steps"] for row in rows]))
        cap = cfg.epochs if self.explicit_epochs else None
        before_steps, before = self.schedule_steps, self.length_text()
        total = steps_within_budget(cfg.budget_minutes * 60, elapsed, step_s, val_s, per_epoch, cap, done=epoch)
        if settled and total >= before_steps:
            return  # the settled length still fits
        self.fix_steps(total)
        last_steps = self.steps_in_epoch(self.n_epochs)
        decision = {
            "after_epoch": epoch,
            "median_epoch_seconds": round(epoch_s, 2),
            "median_validation_seconds": round(val_s, 2),
            "elapsed_seconds": round(elapsed, 1),
            "epochs": self.n_epochs,
            "steps": total,
            "last_epoch_steps": last_steps,
            **({"shortened_from_steps": before_steps, "recent_epochs": len(rows)} if settled else {}),
        }
        if epoch == 1:
            self.budget_record = {
                "minutes": cfg.budget_minutes,
                "epoch_1_seconds": self.history[0]["seconds"],
                "elapsed_after_epoch_1_seconds": round(elapsed, 1),
                "revised_until_share": BUDGET_REVISED_UNTIL,
                "steps_per_epoch": per_epoch,
                "decisions": [],
            }
        self.budget_record["decisions"].append(decision)
        self.budget_record.update(epochs=self.n_epochs, steps=total, last_epoch_steps=last_steps)
        self.bar.update(self.epoch_task, total=self.n_epochs)
        if epoch == 1:
            logger.info(
                f"budget {cfg.budget_minutes:g} min: epoch 1 took {epoch_s:.0f} s, so the run trains {self.length_text()}"
            )
        elif settled:
            logger.info(
                f"budget {cfg.budget_minutes:g} min: the last {len(rows)} epochs took a median {epoch_s:.0f} s, so the "
                f"run ends after {self.length_text()} instead of {before}"
            )
        elif total != before_steps:
            logger.info(
                f"budget {cfg.budget_minutes:g} min: a median epoch takes {epoch_s:.0f} s, so the run trains "
                f"{self.length_text()} instead of {before}"
            )

    def length_text(self) -> str:
        """The run's length as a log line says it: "9 epochs", or "9 epochs (the last 81 of 167 steps)"."""
        last_steps = self.steps_in_epoch(self.n_epochs)
        shorter = (
            f" (the last {last_steps} of {self.steps_per_epoch} steps)" if last_steps < self.steps_per_epoch else ""
        )
        return f"{self.n_epochs} epochs{shorter}"

    def save_checkpoints(self, row: dict, val_logits: list[np.ndarray], rng_states: list[dict]) -> None:
        """best.pt when validation improved (with the tuned threshold and post-processing), last.pt, the history
        and the curves, each written atomically."""
        fields_ = self.checkpoint_fields()
        if row["val_mean_patient_dice"] > self.best["val_mean_patient_dice"]:
            self.save_best(row, val_logits, fields_)
        state = {
            "best": self.best,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_states": rng_states,
            **({"ema_state_dict": self.ema.state_dict()} if self.ema is not None else {}),
            **({"aux_state_dict": self.aux_head.state_dict()} if self.aux is not None else {}),
        }
        save_checkpoint(
            self.last_path, {**make_payload(self.model, self.weights_info, **fields_, weights="raw"), **state}
        )
        write_json_atomic(self.out / "history.json", self.history)
        write_text_atomic(self.out / "history.csv", _history_csv(self.history))
        plot_history(self.history, self.out / "curves.png", title=f"{self.spec.name} on {Path(self.cfg.data).name}")

    def checkpoint_fields(self) -> dict:
        cfg, dtype = self.cfg, self.compute_dtype
        return dict(
            model=self.spec.to_json(),
            img_size=cfg.img_size,
            normalization=self.normalization.to_json(),
            threshold=cfg.threshold,
            split=self.split.to_json(),
            split_file=str(self.out / "split.json"),
            data_root=str(cfg.data),
            train_config=self.config_record,
            augmentation=self.augment.to_json(),
            history=self.history,
            epoch=self.epoch,
            schedule_epochs=self.schedule_epochs,
            schedule_steps=self.schedule_steps,
            resumes=self.resumes,
            budget=self.budget_record,
            compute_precision=str(dtype).removeprefix("torch.") if dtype else "float32",
        )

    def save_best(self, row: dict, val_logits: list[np.ndarray], fields_: dict) -> None:
        cfg, val_slices = self.cfg, self.val_slices
        best = {"epoch": self.epoch, **{k: v for k, v in row.items() if k.startswith("val_")}}
        kept_fields = dict(fields_, weights="ema" if self.ema is not None else "raw")
        if cfg.tune_threshold:
            logits = np.concatenate(val_logits)
            tuning = threshold_tuning.tune(logits, val_slices.masks, val_slices.patients, cfg.threshold)
            kept_fields.update(threshold=tuning["threshold"], threshold_tuning=tuning)
            best.update(
                threshold=tuning["threshold"], val_mean_patient_dice_tuned_threshold=tuning["val_mean_patient_dice"]
            )
        kept_fields.update(
            _postprocess_fields(
                cfg.postprocess, val_logits, val_slices, kept_fields["threshold"], self.train_smallest_tumor
            )
        )
        best["postprocess"] = kept_fields["postprocess"]
        tuning = kept_fields.get("postprocess_tuning")
        if tuning and tuned_val_dice(tuning) is not None:
            best["val_mean_patient_dice_postprocessed"] = tuned_val_dice(tuning)
        self.best = best
        save_checkpoint(
            self.best_path, {**make_payload(self.kept_model, self.weights_info, **kept_fields), "best": best}
        )

    def on_train_end(self) -> TrainResult:
        seconds = time.perf_counter() - self.started
        return TrainResult(self.best_path, self.last_path, self.history, self.best, seconds)


# What a run started from a checkpoint carries over from it (encoder weights' origin, pruned layer shapes, ...).
CARRIED_WEIGHTS_INFO = (
    "encoder_weights",
    "encoder_weights_sha256",
    "dropped_modules",
    "layer_shapes",
    "pruning",
    "pruned_from",
)

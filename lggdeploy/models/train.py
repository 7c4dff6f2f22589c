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
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
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
from lggdeploy.common.progress import console, progress_bar
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.split import load_split, make_split, save_split
from lggdeploy.data.transforms import (
    NORMALIZATION_MODES,
    Augmentation,
    Normalization,
    logits_to_masks,
    resize_images,
    resize_masks,
)
from lggdeploy.metrics import confusion_counts, dice_from_counts, iou_from_counts
from lggdeploy.models import threshold as threshold_tuning
from lggdeploy.models.checkpoint import load_checkpoint, make_payload, model_from_checkpoint, save_checkpoint, split_of
from lggdeploy.models.curves import plot_history
from lggdeploy.models.evaluate import score_model
from lggdeploy.models.networks import build_model, count_parameters
from lggdeploy.models.presets import resolve_model
from lggdeploy.models.recipe import epoch_order, lr_factor, make_ema, segmentation_loss, set_batch_norm_momentum
from lggdeploy.models.torch_runner import resolve_device
from lggdeploy.postprocess import PostProcess, smallest_tumor
from lggdeploy.postprocess import tune as tune_postprocess


@dataclass
class TrainConfig:
    model: str
    data: Path
    out: Path
    epochs: int = 10
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 1e-4
    img_size: int = 256
    seed: int = 0
    device: str = "auto"
    split_file: Path | None = None
    encoder_weights: str | None = None
    resume: bool = False
    augment: bool = True
    eval_batch_size: int = 16
    threshold: float = 0.5
    show_progress: bool = True
    init_checkpoint: Path | None = None  # start from these weights (and shapes: pruned models), e.g. for fine-tuning
    # The options the user gave (the CLI passes its flags); None: every field that differs from its default.
    # On --resume these are checked against the run's saved configuration.
    explicit: frozenset[str] | None = None
    precision: str = "auto"  # auto: fp16 AMP on CUDA, bf16 autocast on CPUs with AMX, else fp32
    channels_last: bool = True
    # Knowledge distillation (fine-tuning a pruned model): the teacher's sigmoid outputs are soft targets beside
    # the labels; loss = (1 - w) * (Dice + BCE on labels) + w * BCE(student logits, teacher probabilities).
    teacher: Path | None = None
    distill_weight: float = 0.5
    # The recipe (benchmarks/results/recipe/ measured these; defaults are what it showed).
    loss: str = (
        "image-dice"  # overlap term beside BCE: dice (pooled over the batch), image-dice (per tumor image), tversky
    )
    tumor_fraction: float | None = 0.5  # share of each epoch drawn from tumor slices (None or 0: as the data come)
    warmup_epochs: float = 0.5  # linear learning-rate warm-up before the cosine
    ema_decay: float = 0.0  # EMA of the weights (0: off); with it, validation, selection and best.pt use the EMA
    tune_threshold: bool = (
        False  # sweep the threshold on the val patients and store the best in best.pt (off: pooled over 21 test
    )
    # patients it did not pay, benchmarks/results/threshold/)
    missing_modality: float = 0.2  # share of training slices with pre/post-contrast replaced by FLAIR (data set's fill)
    normalization: str = "slice"  # model input: slice (each slice's tissue median to one level, then ImageNet statistics) or fixed (x / 255 as read)
    # Post-processing stored in best.pt (postprocess.py): auto (small 3-D components removed if the val patients
    # say it does not hurt), none, largest (largest 3-D component only), N voxels, or N,F (also under F x the largest).
    postprocess: str = "auto"
    # Wall-clock budget: after epoch 1 the run fixes its number of epochs (and the cosine's length) so that it ends
    # within this many minutes, counted from the start of train(); --epochs, when given, stays the upper bound.
    budget_minutes: float | None = None
    # Every batch-norm layer's running-statistics momentum while training (PyTorch's 0.1); 0 keeps each layer's own
    # (efficientnet-pytorch's 0.01 left unet-effb7's eval statistics far behind its weights: recipe.set_batch_norm_momentum).
    bn_momentum: float = 0.1

    def given(self) -> set[str]:
        """The options the user gave: `explicit` when the caller says (the CLI does), else every field off its default."""
        if self.explicit is not None:
            return set(self.explicit)
        return {f.name for f in fields(self) if getattr(self, f.name) != f.default}

    def validate(self) -> None:
        if self.epochs < 1:
            raise LggError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise LggError(f"--batch-size must be at least 2 (batch norm needs 2 samples), got {self.batch_size}")
        if self.img_size < 64 or self.img_size % 32:
            raise LggError(f"--img-size must be a multiple of 32 and at least 64, got {self.img_size}")
        if self.lr <= 0:
            raise LggError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.distill_weight <= 1:
            raise LggError(f"--distill-weight must lie between 0 and 1, got {self.distill_weight}")
        from lggdeploy.models.recipe import LOSSES

        if self.loss not in LOSSES:
            raise LggError(f"unknown --loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.tumor_fraction is not None and not 0 <= self.tumor_fraction < 1:
            raise LggError(
                f"--tumor-fraction must be 0 (slices as the data come) or a fraction below 1, got {self.tumor_fraction}"
            )
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise LggError(
                f"--warmup-epochs must be at least 0 and below --epochs ({self.epochs}), got {self.warmup_epochs}"
            )
        if not (self.ema_decay == 0 or 0.5 <= self.ema_decay < 1):
            raise LggError(f"--ema must be 0 (off) or between 0.5 and 1 (e.g. 0.99), got {self.ema_decay}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise LggError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if not 0 <= self.missing_modality <= 1:
            raise LggError(f"--missing-modality must be a share between 0 and 1, got {self.missing_modality}")
        if self.normalization not in NORMALIZATION_MODES:
            raise LggError(f"unknown --normalization {self.normalization!r}: choose {' or '.join(NORMALIZATION_MODES)}")
        if not 0 < self.threshold < 1:
            raise LggError(f"--threshold must lie strictly between 0 and 1, got {self.threshold}")
        if not 0 <= self.bn_momentum <= 1:
            raise LggError(f"--bn-momentum must lie between 0 (each layer keeps its own) and 1, got {self.bn_momentum}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise LggError(f"unknown --precision {self.precision!r}: choose auto, fp32, bf16 or fp16")
        if self.postprocess != "auto":
            try:
                PostProcess.parse(self.postprocess)
            except ValueError as exc:
                raise LggError(f"--postprocess: {exc} (or auto, the default)") from None


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
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
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
}


def _postprocess_fields(
    choice: str, val_logits: list[np.ndarray], val_slices, threshold: float, train_smallest_tumor: int | None
) -> dict:
    """The checkpoint's post-processing: the user's, or (auto) the one postprocess.tune keeps on the val patients'
    masks at the stored threshold, with its record."""
    if choice != "auto":
        return {"postprocess": PostProcess.parse(choice).to_json()}
    predicted = logits_to_masks(np.concatenate(val_logits), threshold=threshold)
    record = tune_postprocess(predicted, val_slices.masks, val_slices.patients, train_smallest_tumor)
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
    from lggdeploy.common.machine import cpu_has_amx_bf16, cpu_has_bf16

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


def epochs_within_budget(budget_s: float, elapsed_s: float, epoch_s: float, cap: int | None) -> int:
    """Epochs a budgeted run trains in all: epoch 1 took `epoch_s` and ended `elapsed_s` after the run started; the
    rest must fit in what is left of `budget_s` (3 % kept as margin for noise). At least 1, at most `cap`."""
    extra = int(max(0.0, budget_s - elapsed_s) * 0.97 // max(epoch_s, 1e-9))
    total = 1 + extra
    return max(1, min(total, cap) if cap else total)


def train(cfg: TrainConfig) -> TrainResult:
    run_started = time.perf_counter()
    cfg.validate()
    world, rank, local_rank = _distributed()
    device = resolve_device(cfg.device, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    main = rank == 0
    out = Path(cfg.out)
    last_path, best_path = out / "last.pt", out / "best.pt"

    # --- state to start from -------------------------------------------------------------------
    resume_ckpt = None
    resumes: list[dict] = []
    if cfg.resume:
        if not last_path.is_file():
            raise LggError(f"--resume: no {last_path} to resume from; drop --resume to start a new run in {out}")
        resume_ckpt = load_checkpoint(last_path)
        if resume_ckpt["model"]["name"] != cfg.model:
            raise LggError(f"--resume: {last_path} trained {resume_ckpt['model']['name']}, not {cfg.model}")
        cfg, changed = resume_config(cfg, resume_ckpt.get("train_config", {}), last_path)
        resumes = list(resume_ckpt.get("resumes", [])) + [
            {"after_epoch": int(resume_ckpt["epoch"]), "changed": changed}
        ]
        cfg.validate()
    elif main and last_path.exists():
        raise LggError(
            f"{out} already holds a training run (last.pt): pass --resume to continue it, or choose another --out"
        )
    if main and out.is_dir():
        remove_stale_temporaries(out)  # the .tmp files of a run that was killed (SIGKILL) while writing

    init_ckpt = load_checkpoint(cfg.init_checkpoint) if cfg.init_checkpoint and resume_ckpt is None else None
    if init_ckpt is not None and init_ckpt["img_size"] != cfg.img_size:
        raise LggError(
            f"--img-size {cfg.img_size} differs from the {init_ckpt['img_size']} px the initial checkpoint was trained at"
        )
    if init_ckpt is not None and "threshold" not in cfg.given() and cfg.threshold == TrainConfig.threshold:
        cfg = replace(
            cfg, threshold=float(init_ckpt["threshold"])
        )  # fine-tuning keeps the decision threshold it starts from
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    # The model (and its encoder weights) before anything is written: a bad name or weights file leaves no folder behind.
    spec = resolve_model(cfg.model)
    normalization = Normalization(mode=cfg.normalization)
    start_from = resume_ckpt if resume_ckpt is not None else init_ckpt
    if start_from is not None:
        model = model_from_checkpoint(start_from).train()
        carried = (
            "encoder_weights",
            "encoder_weights_sha256",
            "dropped_modules",
            "layer_shapes",
            "pruning",
            "pruned_from",
        )
        weights_info = {k: start_from[k] for k in carried if k in start_from}
        normalization = Normalization.from_json(start_from["normalization"], origin=str(cfg.init_checkpoint or cfg.out))
        if "normalization" in cfg.given() and normalization.mode != cfg.normalization:
            raise LggError(
                f"--normalization {cfg.normalization} differs from the {normalization.mode!r} normalization the checkpoint was trained with"
            )
        cfg = replace(cfg, normalization=normalization.mode)  # the record says what the run feeds the model
    else:
        built = build_model(spec, cfg.encoder_weights)
        model = built.model
        weights_info = {
            "encoder_weights": built.encoder_weights,
            "encoder_weights_sha256": built.encoder_weights_sha256,
            "dropped_modules": built.dropped_modules,
        }

    if main:
        check_can_create(out)  # an unwritable --out is refused before the data are read
    dataset = load_dataset(cfg.data)
    if resume_ckpt is not None:
        split = split_of(resume_ckpt)
    elif init_ckpt is not None and not cfg.split_file:
        split = split_of(init_ckpt)
    elif cfg.split_file:
        split = load_split(cfg.split_file)
    else:
        split = make_split(dataset, seed=cfg.seed)
    split.check_against(dataset, origin=str(cfg.split_file or "split"))
    if not split.val:
        raise LggError("the split has no validation patients: training keeps the best checkpoint by validation Dice")
    with progress_bar(cfg.show_progress and main) as bar:
        patients = split.train + split.val
        task = bar.add_task("reading slices", total=sum(len(dataset.patients[p].slices) for p in patients), info="")
        train_slices = load_slices(dataset, split.train, on_slice=lambda: bar.advance(task))
        val_slices = load_slices(dataset, split.val, on_slice=lambda: bar.advance(task))
    if main:
        ensure_folder(out)
        save_split(split, out / "split.json")
    train_images = resize_images(train_slices.images, cfg.img_size)
    train_masks = resize_masks(train_slices.masks, cfg.img_size)
    train_tumor = train_slices.masks.reshape(len(train_slices), -1).any(axis=1)
    train_smallest_tumor = smallest_tumor(
        train_slices.masks, train_slices.patients
    )  # bounds the post-processing's size
    val_targets = (
        torch.from_numpy(resize_masks(val_slices.masks, cfg.img_size)).unsqueeze(1).float()
    )  # for the val loss, once

    set_batch_norm_momentum(model, cfg.bn_momentum)
    model.to(device)
    teacher = None
    if cfg.teacher is not None:
        teacher_ckpt = load_checkpoint(cfg.teacher)
        if teacher_ckpt["img_size"] != cfg.img_size:
            raise LggError(
                f"the teacher {cfg.teacher} works at {teacher_ckpt['img_size']} px, the run at {cfg.img_size} px: distil at the teacher's size"
            )
        teacher = model_from_checkpoint(teacher_ckpt).to(device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
    compute_dtype = autocast_dtype(cfg.precision, device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # Each rank takes its own share of the same seeded permutation (what DistributedSampler does).
    n_train = len(train_images)
    per_rank = n_train // world
    steps_per_epoch = per_rank // cfg.batch_size + (1 if per_rank % cfg.batch_size >= 2 else 0)
    if steps_per_epoch < 1:
        raise LggError(
            f"{n_train} training slices are too few for --batch-size {cfg.batch_size} on {world} process(es)"
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The cosine schedule spans the epochs the run was started with; epochs added on --resume run at its final lr.
    schedule_epochs = (
        int(resume_ckpt.get("schedule_epochs", resume_ckpt["train_config"]["epochs"]))
        if resume_ckpt is not None
        else cfg.epochs
    )
    budgeted = cfg.budget_minutes is not None and resume_ckpt is None
    explicit_epochs = "epochs" in cfg.given()
    if budgeted and not explicit_epochs:
        cfg = replace(cfg, epochs=1000)  # the budget decides; 1000 is only the cap
        schedule_epochs = TrainConfig.epochs  # provisional cosine length for epoch 1, fixed once epoch 1 is timed
    schedule = {"total_steps": schedule_epochs * steps_per_epoch}
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule["total_steps"], warmup_steps)
    )
    ema = make_ema(model, cfg.ema_decay) if cfg.ema_decay else None
    scaler = torch.amp.GradScaler("cuda", enabled=compute_dtype == torch.float16)
    history: list[dict] = []
    best: dict = {"epoch": 0, "val_mean_patient_dice": -1.0}
    start_epoch = 1
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        scaler.load_state_dict(resume_ckpt["scaler"])
        if ema is not None:
            ema.load_state_dict(resume_ckpt["ema_state_dict"])
        history = list(resume_ckpt["history"])
        best = dict(resume_ckpt["best"])
        start_epoch = int(resume_ckpt["epoch"]) + 1
        states = resume_ckpt.get("rng_states") or [{"torch": resume_ckpt["torch_rng"], "numpy": None}]
        if states[0].get("numpy") is None:  # a checkpoint of an older lggdeploy: the CPU generator only
            torch.set_rng_state(states[0]["torch"])
        else:
            set_rng_state(states[rank] if rank < len(states) else states[0])
        if start_epoch > cfg.epochs:
            raise LggError(
                f"--resume: {last_path} already finished epoch {start_epoch - 1} of {cfg.epochs}; raise --epochs to train longer"
            )

    augment = Augmentation(missing_modality=cfg.missing_modality)
    config_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "explicit"}
    n_epochs = cfg.epochs
    budget_record: dict | None = (
        dict(resume_ckpt["budget"]) if resume_ckpt is not None and resume_ckpt.get("budget") else None
    )

    def fix_epochs(total: int) -> None:
        """The budget's decision, on every rank: the run's length and its cosine's."""
        nonlocal n_epochs, schedule_epochs
        n_epochs = schedule_epochs = total
        schedule["total_steps"] = total * steps_per_epoch
        config_record["epochs"] = total

    started = time.perf_counter()
    if main:
        console.print(
            f"[bold]{spec.name}[/]: {count_parameters(model) / 1e6:.2f}M parameters, encoder weights {weights_info['encoder_weights']}, "
            f"{len(split.train)} train / {len(split.val)} val patients ({n_train} / {len(val_slices)} slices), "
            f"{cfg.img_size}px, device {device}{f', {world} processes' if world > 1 else ''}, "
            f"compute {str(compute_dtype).removeprefix('torch.') if compute_dtype else 'float32'}{', channels-last' if cfg.channels_last else ''}"
        )

    with progress_bar(cfg.show_progress and main) as bar:
        epoch_task = bar.add_task("epochs", total=None if budgeted else cfg.epochs, completed=start_epoch - 1, info="")
        epoch = start_epoch - 1
        while epoch < n_epochs:
            epoch += 1
            epoch_started = time.perf_counter()
            order = epoch_order(train_tumor, cfg.seed * 100_003 + epoch, cfg.tumor_fraction or None)[
                rank * per_rank : (rank + 1) * per_rank
            ]
            seen_tumor = seen = 0
            aug_generator = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 31 + rank)
            net.train()
            losses: list[float] = []
            counts = np.zeros(4, np.int64)
            step_task = bar.add_task(
                f"epoch {epoch}/{'?' if budgeted and epoch == 1 else n_epochs}", total=steps_per_epoch, info=""
            )
            for step in range(steps_per_epoch):
                idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size].numpy()
                x01 = torch.from_numpy(train_images[idx]).permute(0, 3, 1, 2).float().div_(255)
                y = torch.from_numpy(train_masks[idx]).unsqueeze(1).float()
                if cfg.augment:
                    x01, y = augment(x01, y, aug_generator)
                x = normalization.apply_torch(x01).to(device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = y.to(device, non_blocking=True)
                with torch.autocast(
                    device.type, dtype=compute_dtype or torch.float32, enabled=compute_dtype is not None
                ):
                    logits = net(x)
                loss = segmentation_loss(logits.float(), y, cfg.loss)
                if teacher is not None:
                    with (
                        torch.no_grad(),
                        torch.autocast(
                            device.type, dtype=compute_dtype or torch.float32, enabled=compute_dtype is not None
                        ),
                    ):
                        soft = torch.sigmoid(teacher(x).float())
                    loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * F.binary_cross_entropy_with_logits(
                        logits.float(), soft
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                losses.append(loss.item())
                seen_tumor += int(train_tumor[idx].sum())
                seen += len(idx)
                counts += confusion_counts((logits.detach() > 0).cpu().numpy()[:, 0], y.cpu().numpy()[:, 0] > 0.5).sum(
                    axis=0
                )
                bar.update(step_task, advance=1, info=f"loss {np.mean(losses):.4f}")
            bar.remove_task(step_task)

            row = None
            rng_states = _gather_rng_states(
                world
            )  # before validation, so a resumed epoch draws what this one would have
            if main:
                val_losses: list[float] = []
                val_logits: list[np.ndarray] = []

                def add_val_loss(logits: np.ndarray, batch: slice) -> None:
                    val_losses.append(
                        segmentation_loss(torch.from_numpy(logits), val_targets[batch], cfg.loss).item() * len(logits)
                    )
                    if cfg.tune_threshold or cfg.postprocess == "auto":
                        val_logits.append(np.array(logits, np.float32, copy=True))

                # The model the run keeps: the EMA of the weights when on (validated, selected and saved as best.pt).
                kept = ema.module if ema is not None else model
                val = score_model(
                    kept,
                    val_slices,
                    cfg.img_size,
                    normalization,
                    cfg.eval_batch_size,
                    device,
                    show_progress=False,
                    threshold=cfg.threshold,
                    on_logits=add_val_loss,
                )
                val_loss = float(np.sum(val_losses) / len(val_slices))
                agg = val["aggregates"]
                tp, fp, fn, tn = counts
                row = {
                    "epoch": epoch,
                    "lr": optimizer.param_groups[0]["lr"],
                    "train_loss": float(np.mean(losses)),
                    "train_tumor_slice_fraction": round(seen_tumor / seen, 4),
                    "train_dice": float(dice_from_counts(tp, fp, fn)),
                    "train_iou": float(iou_from_counts(tp, fp, fn)),
                    "train_accuracy": float((tp + tn) / counts.sum()),
                    "val_loss": val_loss,
                    "val_mean_patient_dice": agg["mean_patient_dice"],
                    "val_median_patient_dice": agg["median_patient_dice"],
                    "val_mean_patient_iou": agg["mean_patient_iou"],
                    "val_global_dice": agg["global_dice"],
                    "val_pixel_accuracy": agg["pixel_accuracy"],
                    "val_patients_missed": agg["patients_missed"],
                }
                if ema is not None:  # the raw weights too, to see what the EMA buys
                    raw = score_model(
                        model,
                        val_slices,
                        cfg.img_size,
                        normalization,
                        cfg.eval_batch_size,
                        device,
                        show_progress=False,
                        threshold=cfg.threshold,
                    )
                    row["val_mean_patient_dice_raw_weights"] = raw["aggregates"]["mean_patient_dice"]
                row["seconds"] = round(time.perf_counter() - epoch_started, 2)
                if budgeted and epoch == 1:
                    elapsed = time.perf_counter() - run_started
                    total = epochs_within_budget(
                        cfg.budget_minutes * 60, elapsed, row["seconds"], cfg.epochs if explicit_epochs else None
                    )
                    fix_epochs(total)
                    budget_record = {
                        "minutes": cfg.budget_minutes,
                        "epoch_1_seconds": row["seconds"],
                        "elapsed_after_epoch_1_seconds": round(elapsed, 1),
                        "epochs": total,
                    }
                    bar.update(epoch_task, total=total)
                    console.print(
                        f"budget {cfg.budget_minutes:g} min: epoch 1 took {row['seconds']:.0f} s, so the run trains {total} epochs"
                    )
                history.append(row)
                fields_ = dict(
                    model=spec.to_json(),
                    img_size=cfg.img_size,
                    normalization=normalization.to_json(),
                    threshold=cfg.threshold,
                    split=split.to_json(),
                    split_file=str(out / "split.json"),
                    data_root=str(cfg.data),
                    train_config=config_record,
                    augmentation=augment.to_json(),
                    history=history,
                    epoch=epoch,
                    schedule_epochs=schedule_epochs,
                    resumes=resumes,
                    budget=budget_record,
                    compute_precision=str(compute_dtype).removeprefix("torch.") if compute_dtype else "float32",
                )
                improved = agg["mean_patient_dice"] > best["val_mean_patient_dice"]
                if improved:
                    best = {"epoch": epoch, **{k: v for k, v in row.items() if k.startswith("val_")}}
                    kept_fields = dict(fields_, weights="ema" if ema is not None else "raw")
                    if cfg.tune_threshold:
                        tuning = threshold_tuning.tune(
                            np.concatenate(val_logits), val_slices.masks, val_slices.patients, cfg.threshold
                        )
                        kept_fields.update(threshold=tuning["threshold"], threshold_tuning=tuning)
                        best.update(
                            threshold=tuning["threshold"],
                            val_mean_patient_dice_tuned_threshold=tuning["val_mean_patient_dice"],
                        )
                    kept_fields.update(
                        _postprocess_fields(
                            cfg.postprocess, val_logits, val_slices, kept_fields["threshold"], train_smallest_tumor
                        )
                    )
                    best["postprocess"] = kept_fields["postprocess"]
                    if "postprocess_tuning" in kept_fields and kept_fields["postprocess_tuning"]["kept"]:
                        best["val_mean_patient_dice_postprocessed"] = kept_fields["postprocess_tuning"][
                            "val_mean_patient_dice_with"
                        ]
                    save_checkpoint(best_path, {**make_payload(kept, weights_info, **kept_fields), "best": best})
                save_checkpoint(
                    last_path,
                    {
                        **make_payload(model, weights_info, **fields_, weights="raw"),
                        "best": best,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng_states": rng_states,
                        **({"ema_state_dict": ema.state_dict()} if ema is not None else {}),
                    },
                )
                write_json_atomic(out / "history.json", history)
                write_text_atomic(out / "history.csv", _history_csv(history))
                plot_history(history, out / "curves.png", title=f"{spec.name} on {Path(cfg.data).name}")
                bar.update(
                    epoch_task,
                    advance=1,
                    info=f"val per-patient Dice {agg['mean_patient_dice']:.4f} (best {best['val_mean_patient_dice']:.4f} @ {best['epoch']})",
                )
            if world > 1:
                if budgeted and epoch == 1:
                    decided = [n_epochs]
                    torch.distributed.broadcast_object_list(decided, src=0)
                    fix_epochs(int(decided[0]))
                torch.distributed.barrier()

    return TrainResult(best_path, last_path, history, best, time.perf_counter() - started)

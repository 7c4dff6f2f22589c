"""Training's configuration: every option of `lggdeploy train` with its default and its help, in one place.

Light on purpose (nothing heavy at import): the CLI derives the train command's options from it (`option_help`
shows the default written here), and models/train.py runs it.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from lggdeploy.common.errors import LggError


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
    # Post-processing stored in best.pt (postprocess.py): auto (each step kept if the val patients say it does not
    # hurt), none, largest (largest 3-D component only), N voxels, N,F, N,F,Q, each but largest optionally +crf.
    postprocess: str = "auto"
    # Wall-clock budget: after epoch 1 the run sets its number of epochs (and the cosine's length) so that it ends
    # within this many minutes, counted from the start of train(), and revises it from the median epoch after each
    # epoch before the cosine's middle; --epochs, when given, stays the upper bound.
    budget_minutes: float | None = None
    # Every batch-norm layer's running-statistics momentum while training (PyTorch's 0.1); 0 keeps each layer's own
    # (efficientnet-pytorch's 0.01 left unet-effb7's eval statistics far behind its weights: recipe.set_batch_norm_momentum).
    bn_momentum: float = 0.1
    # Train on random crops of this many pixels (0: whole slices); a tumor slice's crop holds one of its tumor pixels
    # (transforms.random_crops). Validation, selection and every engine still see whole slices.
    crop_size: int = 0
    # PSPNet's auxiliary loss: a training-only segmentation head on the encoder's stage before its last, its loss
    # weighted this much beside the model's (0: off; recipe.AuxiliaryHead). Checkpoints and engines hold the model alone.
    aux_weight: float = 0.0

    @classmethod
    def from_flags(
        cls, model: str, data: Path, out: Path | None = None, device: str = "auto", resume: bool = False, **flags
    ) -> TrainConfig:
        """A command line's options: a flag left at None was not given — its default applies, and --resume does not
        hold it against the run's own settings. `out` defaults to runs/<model>."""
        given = {k: v for k, v in flags.items() if v is not None}
        out = out or Path("runs") / model.replace(":", "-")
        explicit = frozenset({"model", *given})
        return cls(model=model, data=data, out=out, device=device, resume=resume, explicit=explicit, **given)

    def given(self) -> set[str]:
        """The options the user gave: `explicit` when the caller says (the CLI does), else every field off its default."""
        if self.explicit is not None:
            return set(self.explicit)
        return {f.name for f in fields(self) if getattr(self, f.name) != f.default}

    def validate(self) -> None:
        from lggdeploy.data.transforms import NORMALIZATION_MODES  # numpy and Pillow: not for the CLI's start-up
        from lggdeploy.models.recipe import LOSSES  # torch
        from lggdeploy.outline import require_densecrf
        from lggdeploy.postprocess import PostProcess

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
        if self.crop_size and not (64 <= self.crop_size <= self.img_size and self.crop_size % 32 == 0):
            raise LggError(
                f"--crop-size must be 0 (whole slices) or a multiple of 32 from 64 to --img-size ({self.img_size}), "
                f"got {self.crop_size}"
            )
        if not 0 <= self.aux_weight <= 10:
            raise LggError(f"--aux-weight must lie between 0 (off) and 10, got {self.aux_weight}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise LggError(f"unknown --precision {self.precision!r}: choose auto, fp32, bf16 or fp16")
        if self.postprocess != "auto":
            try:
                rule = PostProcess.parse(self.postprocess)
            except ValueError as exc:
                raise LggError(f"--postprocess: {exc} (or auto, the default)") from None
        if self.postprocess == "auto" or rule.needs_images:
            try:
                require_densecrf()
            except LggError as exc:
                raise LggError(
                    f"--postprocess {self.postprocess}: {exc}; or give a rule without the outline step (e.g. "
                    "1034,0,0.9)"
                ) from None


# What each command-line option of `lggdeploy train` means; the default shown is the field's (TrainConfig).
HELP = {
    "epochs": "epochs (on --resume: the run's own, or more to extend it)",
    "batch_size": "batch size",
    "lr": "peak learning rate",
    "img_size": "model input size (slices are 256x256; metrics are always at 256)",
    "seed": "seed of the split, initialization, shuffling and augmentation",
    "device": "auto, cpu, cuda, cuda:N",
    "split_file": "split JSON (default: a new seeded split saved in the run folder)",
    "encoder_weights": "imagenet, random, or PATH to a local encoder state dict (default: the preset's)",
    "augment": "training augmentation",
    "precision": "auto (fp16 AMP on CUDA, bf16 on CPUs with AMX, else fp32), fp32, bf16 (CPUs with AVX512-BF16 or "
    "AMX), fp16 (CUDA)",
    "loss": "overlap term beside BCE: image-dice (per tumor slice), dice (pooled over the batch), tversky",
    "tumor_fraction": "share of each epoch drawn from tumor slices (0: slices as the data come)",
    "warmup_epochs": "linear learning-rate warm-up before the cosine, in epochs",
    "ema_decay": "EMA decay of the weights per step, e.g. 0.99 (0: off)",
    "tune_threshold": "tune the decision threshold on the val patients and store it in best.pt (off by default: on "
    "21 test patients it did not pay)",
    "threshold": "decision threshold for validation (and stored unless tuned)",
    "budget_minutes": "wall-clock budget: the run sets its length after epoch 1 to end within it (whole epochs, then "
    "a shorter last one with the steps that fit) and revises it from the median epoch until the cosine's middle "
    "(--epochs stays the cap)",
    "missing_modality": "share of training slices given the data set's fill for a missing sequence (pre- and/or "
    "post-contrast replaced by FLAIR; 0: off)",
    "normalization": "model input: slice (each channel of each slice scaled to one tissue median first, so brightness "
    "differences between scans are removed) or fixed (ImageNet statistics on x / 255: absolute intensity)",
    "bn_momentum": "running-statistics momentum of every batch-norm layer while training (PyTorch's 0.1; 0 keeps each "
    "encoder's own, e.g. efficientnet's 0.01)",
    "crop_size": "train on random crops of this many pixels, each tumor slice's holding tumor (0: whole slices); "
    "validation and inference see whole slices",
    "aux_weight": "weight of PSPNet's auxiliary loss: a training-only segmentation head on the encoder's stage before "
    "its last (0: off; never part of the checkpoint or engines)",
    "postprocess": "post-processing stored in best.pt: auto (3-D components smaller than half the smallest train "
    "tumor removed, then those of mean probability under 0.9, then the outlines redrawn by a dense CRF — each step "
    "kept if the val patients say it does not hurt), none, largest, N (components under N voxels removed), N,F (also "
    "those under F x the largest component) or N,F,Q (then those of mean probability under Q; the most confident is "
    "always kept); +crf after any but largest: then the outlines redrawn (needs pydensecrf2)",
}


def option_help(name: str) -> str:
    """The option's help with TrainConfig's default for it."""
    default = next(f.default for f in fields(TrainConfig) if f.name == name)
    if default is MISSING or default is None or "(default" in HELP[name]:
        return HELP[name]
    shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
    return f"{HELP[name]} (default {shown})"

"""The pieces of the training recipe that are not the loop: losses, the epoch's slice order (tumor-slice
oversampling), the learning-rate schedule (warm-up + cosine) and the weight EMA.

Each is chosen by a TrainConfig field and recorded in the checkpoint's train_config; the benchmark that chose the
defaults is benchmarks/results/recipe/.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("dice", "image-dice", "tversky")


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the whole batch (one pooled volume, like the per-patient metric)."""
    intersection = (prob * target).sum()
    return 1 - (2 * intersection + 1.0) / (prob.sum() + target.sum() + 1.0)


def image_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of each image that holds tumor, averaged: a 30-pixel lesion weighs as much as a 3,000-pixel
    one (in the pooled Dice it is lost in the large ones). Tumor-free images are left to the BCE term."""
    dims = tuple(range(1, prob.dim()))
    has_tumor = target.sum(dim=dims) > 0
    if not has_tumor.any():
        return prob.sum() * 0.0
    p, t = prob[has_tumor], target[has_tumor]
    dice = (2 * (p * t).sum(dim=dims) + 1.0) / (p.sum(dim=dims) + t.sum(dim=dims) + 1.0)
    return 1 - dice.mean()


def tversky_loss(prob: torch.Tensor, target: torch.Tensor, alpha: float = 0.3, beta: float = 0.7) -> torch.Tensor:
    """1 - Tversky index per tumor image (Salehi et al. 2017): false negatives weigh beta, false positives alpha."""
    dims = tuple(range(1, prob.dim()))
    has_tumor = target.sum(dim=dims) > 0
    if not has_tumor.any():
        return prob.sum() * 0.0
    p, t = prob[has_tumor], target[has_tumor]
    tp = (p * t).sum(dim=dims)
    index = (tp + 1.0) / (tp + alpha * (p * (1 - t)).sum(dim=dims) + beta * ((1 - p) * t).sum(dim=dims) + 1.0)
    return 1 - index.mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "dice") -> torch.Tensor:
    """BCE with logits + the overlap term `kind` (dice: pooled soft Dice; image-dice; tversky)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    if kind == "dice":
        return bce + soft_dice_loss(prob, target)
    if kind == "image-dice":
        return bce + image_dice_loss(prob, target)
    if kind == "tversky":
        return bce + tversky_loss(prob, target)
    raise ValueError(f"unknown loss {kind!r}: choose one of {', '.join(LOSSES)}")


def epoch_order(tumor: np.ndarray, epoch_seed: int, tumor_fraction: float | None) -> torch.Tensor:
    """The slice indices one epoch visits (as many as there are training slices).

    tumor_fraction None: a plain permutation. Otherwise that fraction of the epoch is drawn from the tumor slices
    and the rest from the tumor-free ones, each side as whole shuffled passes (every slice of a side is seen
    before any repeats), then the two are shuffled together. Seeded by `epoch_seed`.
    """
    n = len(tumor)
    generator = torch.Generator().manual_seed(epoch_seed)
    if tumor_fraction is None:
        return torch.randperm(n, generator=generator)
    positive = np.flatnonzero(tumor)
    negative = np.flatnonzero(~np.asarray(tumor, bool))
    if len(positive) == 0 or len(negative) == 0:  # nothing to rebalance
        return torch.randperm(n, generator=generator)
    n_positive = min(n, max(1, round(tumor_fraction * n)))
    n_negative = n - n_positive

    def draw(pool: np.ndarray, count: int) -> torch.Tensor:
        if count == 0:
            return torch.empty(0, dtype=torch.long)
        passes = math.ceil(count / len(pool))
        picks = torch.cat([torch.randperm(len(pool), generator=generator) for _ in range(passes)])[:count]
        return torch.from_numpy(pool)[picks]

    chosen = torch.cat([draw(positive, n_positive), draw(negative, n_negative)])
    return chosen[torch.randperm(n, generator=generator)]


def lr_factor(step: int, total_steps: int, warmup_steps: int, floor: float = 0.01) -> float:
    """Learning-rate multiplier: linear warm-up from `floor` over `warmup_steps`, then cosine down to `floor`."""
    if warmup_steps > 0 and step < warmup_steps:
        return floor + (1 - floor) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(step - warmup_steps, span) / span
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_batch_norm_momentum(model: nn.Module, momentum: float) -> int:
    """Give every batch-norm layer this running-statistics momentum (0: keep each layer's own); returns how many changed.

    The statistics eval mode uses are an average over recent training steps with this weight. efficientnet-pytorch
    sets 0.01 (an average over ~100 steps, made for hundreds of ImageNet epochs): unet-effb7 trained from random
    init for two CPU epochs (192 steps) kept statistics of much earlier weights, val per-patient Dice 0.011, and 0.608
    with the same weights once the statistics were recomputed (benchmarks/results/recipe/bn-momentum/)."""
    if not momentum:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum != momentum:
            module.momentum = momentum
            changed += 1
    return changed


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of the weights and the batch-norm statistics (torch's AveragedModel)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class AuxiliaryHead(nn.Module):
    """PSPNet's auxiliary loss (Zhao et al. 2017, "deep supervision"): a small segmentation head on an earlier encoder
    stage, trained beside the model and never part of it — checkpoints, exports and engines hold the model alone.

    `attach` hooks the model's encoder so that each forward pass leaves that stage's features here; `head(size)` turns
    them into mask logits of that size. The stage is the one before the encoder's last (for the PSPNet presets,
    ResNeXt50's layer1, stride 4, under the pyramid pooling's input)."""

    STAGE = -2  # the encoder's feature list: [input, stride 2, stride 4, ..., last]
    # Narrow on purpose: a 3x3 convolution from layer1's 256 channels to 64 would be about a quarter of the work of
    # pspnet-scratch's small encoder (ResNeXt50's grouped layers 1-2); 1x1 to 32, then 3x3 to the logits, made a
    # training step 1.6 % slower (benchmarks/results/aux-loss-zen4/).
    WIDTH = 32

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channels, self.WIDTH, 1, bias=False),
            nn.BatchNorm2d(self.WIDTH),
            nn.ReLU(inplace=True),
            nn.Conv2d(self.WIDTH, 1, 3, padding=1),
        )
        self.features: torch.Tensor | None = None

    @classmethod
    def attach(cls, model: nn.Module, img_size: int) -> AuxiliaryHead:
        """A head sized by the encoder's actual features (a pruned encoder has fewer channels than it declares)."""
        encoder = model.encoder
        was_training = model.training
        model.eval()
        with torch.no_grad():
            probe = next(model.parameters()).new_zeros(1, 3, img_size, img_size)
            channels = encoder(probe)[cls.STAGE].shape[1]
        model.train(was_training)
        head = cls(channels)
        encoder.register_forward_hook(head._keep)
        return head

    def _keep(self, module, args, output) -> None:
        self.features = output[self.STAGE]

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Mask logits of `size` from the features the model's last forward pass left (a call, so that DDP syncs)."""
        if self.features is None:
            raise RuntimeError("the auxiliary head has no features: run the model first")
        out = self.block(self.features)
        self.features = None
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)

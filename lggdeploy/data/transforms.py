"""Pre- and post-processing: the one definition shared by training, evaluation, export and the runtime.

preprocess:  uint8 (N, 256, 256, 3)  -> resize to the model's input size -> /255 -> (x - mean) / std -> float32 NCHW
postprocess: logits (N, 1, s, s)      -> resize to 256 (bilinear, on logits) -> logit > 0 (probability > 0.5)

Everything here is numpy + Pillow so the edge runtime can import it without torch; only `augment` and
`standardize_torch` (training) use torch, imported inside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from lggdeploy.common.errors import LggError

NATIVE_SIZE = 256


# Per-slice normalization ("slice" mode): the tissue median every channel is scaled to (about the median of the
# shared patients' slices, so typical slices keep their values), the sampling stride, the quantile tissue is
# measured against, the least share of tissue samples and the least 99th percentile for a slice to be scaled, and
# the largest gain either way.
TISSUE_LEVEL = 0.23
TISSUE_STRIDE = 4
TISSUE_TOP_QUANTILE = 0.99
TISSUE_MIN_SHARE = 0.01
TISSUE_MIN_TOP = 0.05
TISSUE_MAX_GAIN = 4.0


NORMALIZATION_MODES = ("fixed", "slice")
SLICE_FIELDS = (
    "tissue_level",
    "tissue_above",
    "tissue_stride",
    "tissue_top_quantile",
    "tissue_min_share",
    "tissue_min_top",
    "tissue_max_gain",
)


@dataclass(frozen=True)
class Normalization:
    """Model input from x01 = uint8 / 255: per channel (x01 * f - mean) / std, ImageNet statistics (smp's convention).

    mode "fixed": f = 1, absolute intensity as read. mode "slice": f = tissue_level / (median of the channel's
    tissue in this slice), so the slice-to-slice and patient-to-patient gain of MR images (the shared patients' FLAIR
    99th percentile ranges 92-208) is removed before the network sees it. Tissue: samples (a stride-4 grid) above
    `tissue_above` x the channel's 99th percentile in the slice -- relative, so that a darker scan selects the same
    pixels; lower median. f = 1 where under 1 % of the samples are tissue or the 99th percentile is below 0.05 (an
    empty channel), and f is kept within [1/4, 4]. Per slice, so every consumer (runtime, calibration, gate, bench)
    normalizes a slice the same way whatever batch it comes in.
    """

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    mode: str = "fixed"
    tissue_level: float = TISSUE_LEVEL
    tissue_above: float = 0.2  # share of the channel's 99th percentile
    # Recorded with the mode (to_json) so that a later change of the module's defaults cannot change the inputs an
    # existing checkpoint or engine was trained and calibrated on; records without them were written with these values.
    tissue_stride: int = TISSUE_STRIDE
    tissue_top_quantile: float = TISSUE_TOP_QUANTILE
    tissue_min_share: float = TISSUE_MIN_SHARE
    tissue_min_top: float = TISSUE_MIN_TOP
    tissue_max_gain: float = TISSUE_MAX_GAIN

    def __post_init__(self):
        if self.mode not in NORMALIZATION_MODES:
            raise ValueError(
                f"unknown normalization mode {self.mode!r}: this lggdeploy knows {', '.join(NORMALIZATION_MODES)}"
            )
        if not (self.tissue_stride >= 1 and 0 < self.tissue_top_quantile <= 1 and self.tissue_max_gain >= 1):
            raise ValueError(
                f"invalid slice-normalization constants: stride {self.tissue_stride}, quantile "
                f"{self.tissue_top_quantile}, max gain {self.tissue_max_gain}"
            )

    def to_json(self) -> dict:
        out = {"scale": 1 / 255, "mean": list(self.mean), "std": list(self.std), "mode": self.mode}
        if self.mode == "slice":
            out.update({k: getattr(self, k) for k in SLICE_FIELDS})
        return out

    @classmethod
    def from_json(cls, obj: dict, origin: str = "record") -> Normalization:
        """Records written before modes existed are "fixed". An unknown mode is refused: guessing would feed the engine
        wrongly scaled inputs without an error."""

        mode = obj.get("mode", "fixed")
        if mode not in NORMALIZATION_MODES:
            from lggdeploy import __version__

            raise LggError(
                f"{origin}: normalization mode {mode!r} is unknown to lggdeploy {__version__} (it knows "
                f"{', '.join(NORMALIZATION_MODES)}); use the lggdeploy version that wrote it"
            )
        try:
            extra = {k: (int if k == "tissue_stride" else float)(obj[k]) for k in SLICE_FIELDS if k in obj}
            return cls(
                mean=tuple(float(v) for v in obj["mean"]), std=tuple(float(v) for v in obj["std"]), mode=mode, **extra
            )
        except (KeyError, TypeError, ValueError) as err:
            raise LggError(
                f"{origin}: its normalization record is damaged ({type(err).__name__}: {err}); rebuild or "
                "re-export it with lggdeploy"
            ) from None

    def _stats(self) -> tuple[np.ndarray, np.ndarray]:
        shape = (1, 3, 1, 1)
        return np.asarray(self.mean, np.float32).reshape(shape), np.asarray(self.std, np.float32).reshape(shape)

    def apply(self, x01: np.ndarray) -> np.ndarray:
        """NCHW float in [0, 1] -> standardized float32."""
        mean, std = self._stats()
        if self.mode == "slice":
            x01 = x01 * self.slice_factors(x01)
        return ((x01 - mean) / std).astype(np.float32)

    def apply_torch(self, x01):
        import torch

        mean, std = (torch.from_numpy(a).to(x01.device, x01.dtype) for a in self._stats())
        if self.mode == "slice":
            x01 = x01 * self.slice_factors_torch(x01)
        return (x01 - mean) / std

    def slice_factors(self, x01: np.ndarray) -> np.ndarray:
        """(N, C, H, W) in [0, 1] -> (N, C, 1, 1) float32 gains f (see the class)."""
        n, c = x01.shape[:2]
        ordered = np.sort(
            np.asarray(x01[:, :, :: self.tissue_stride, :: self.tissue_stride], np.float32).reshape(n, c, -1), axis=-1
        )
        m = ordered.shape[-1]
        top = ordered[..., int(self.tissue_top_quantile * (m - 1))]
        count = (ordered > (self.tissue_above * top)[..., None]).sum(-1)  # tissue: the last `count` sorted samples
        median = np.take_along_axis(
            ordered, (m - count + (np.maximum(count, 1) - 1) // 2)[..., None].clip(max=m - 1), -1
        )[..., 0]
        usable = (count >= self.tissue_min_share * m) & (top >= self.tissue_min_top)
        factor = np.where(usable, np.float32(self.tissue_level) / np.maximum(median, np.float32(1e-6)), np.float32(1))
        return np.clip(factor, 1 / self.tissue_max_gain, self.tissue_max_gain).astype(np.float32).reshape(n, c, 1, 1)

    def slice_factors_torch(self, x01):
        """slice_factors for a torch tensor (training), the same definition."""
        import torch

        n, c = x01.shape[:2]
        ordered = x01[:, :, :: self.tissue_stride, :: self.tissue_stride].float().reshape(n, c, -1).sort(dim=-1).values
        m = ordered.shape[-1]
        top = ordered[..., int(self.tissue_top_quantile * (m - 1))]
        count = (ordered > (self.tissue_above * top)[..., None]).sum(-1)
        median = ordered.gather(-1, (m - count + (count.clamp(min=1) - 1) // 2)[..., None].clamp(max=m - 1))[..., 0]
        usable = (count >= self.tissue_min_share * m) & (top >= self.tissue_min_top)
        factor = torch.where(usable, self.tissue_level / median.clamp(min=1e-6), torch.ones_like(median))
        return factor.clamp(1 / self.tissue_max_gain, self.tissue_max_gain).reshape(n, c, 1, 1).to(x01.dtype)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size, size, 3) uint8, bilinear. A no-op at the native size."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return out


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) bool -> (N, size, size) bool, nearest neighbour."""
    if masks.shape[1:3] == (size, size):
        return masks
    out = np.empty((len(masks), size, size), bool)
    for i, mask in enumerate(masks):
        out[i] = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
    return out


def to_unit(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def preprocess(images: np.ndarray, size: int, normalization: Normalization) -> np.ndarray:
    """(N, H, W, 3) or (H, W, 3) uint8 -> model input (N, 3, size, size) float32."""
    if images.ndim == 3:
        images = images[None]
    return normalization.apply(to_unit(resize_images(images, size)))


def native_logits(logits: np.ndarray, size: int = NATIVE_SIZE) -> np.ndarray:
    """(N, 1, s, s) or (N, s, s) logits -> (N, size, size) logits, bilinear (resampling logits, not masks)."""
    logits = np.asarray(logits, np.float32)
    if logits.ndim == 4:
        logits = logits[:, 0]
    if logits.shape[1:] != (size, size):
        logits = np.stack([np.asarray(Image.fromarray(one).resize((size, size), Image.BILINEAR)) for one in logits])
    return logits


def logits_to_masks(logits: np.ndarray, size: int = NATIVE_SIZE, threshold: float = 0.5) -> np.ndarray:
    """(N, 1, s, s) or (N, s, s) logits -> (N, size, size) bool masks (probability > threshold) at native size."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return native_logits(logits, size) > np.float32(np.log(threshold / (1 - threshold)))


def masks_and_probabilities(
    logits: np.ndarray, size: int = NATIVE_SIZE, threshold: float = 0.5, every_pixel: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """`logits_to_masks` and the foreground probabilities of the pixels it sets, both (N, size, size) at native size:
    0 off the masks, which is all that post-processing by mean probability reads (and a sigmoid of every pixel would
    cost as much as the rest of post-processing); `every_pixel`: every pixel's, which the outline step reads."""
    native = native_logits(logits, size)
    masks = logits_to_masks(native, size, threshold)
    if every_pixel:
        return masks, sigmoid(native)
    probabilities = np.zeros(masks.shape, np.float32)
    probabilities[masks] = sigmoid(native[masks])
    return masks, probabilities


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation, applied with the same geometry to image and mask."""

    hflip: float = 0.5
    rotate_degrees: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    gain: tuple[float, float] = (0.9, 1.1)  # per-channel intensity gain
    shift: float = 0.05  # per-channel additive intensity shift (x01 units)
    # Share of slices given the data set's own fill for a missing sequence: pre-contrast, post-contrast or both
    # replaced by FLAIR (its README: 9 of the 110 patients lack post-contrast, 6 pre-contrast). 0: off.
    missing_modality: float = 0.0

    def to_json(self) -> dict:
        return {
            "hflip": self.hflip,
            "rotate_degrees": self.rotate_degrees,
            "scale": list(self.scale),
            "gain": list(self.gain),
            "shift": self.shift,
            "missing_modality": self.missing_modality,
        }

    def __call__(self, x01, masks, generator=None):
        """x01: (N, 3, H, W) float tensor in [0, 1]; masks: (N, 1, H, W) float {0, 1}. Returns both augmented."""
        import math

        import torch
        import torch.nn.functional as F

        n = x01.shape[0]
        kw = {"generator": generator, "device": "cpu"}
        theta_rad = (torch.rand(n, **kw) * 2 - 1) * math.radians(self.rotate_degrees)
        zoom = torch.empty(n).uniform_(*self.scale, generator=generator)
        flip = torch.where(torch.rand(n, **kw) < self.hflip, -1.0, 1.0)
        cos, sin = torch.cos(theta_rad) / zoom, torch.sin(theta_rad) / zoom
        affine = torch.zeros(n, 2, 3)
        affine[:, 0, 0], affine[:, 0, 1] = cos * flip, -sin
        affine[:, 1, 0], affine[:, 1, 1] = sin * flip, cos
        affine = affine.to(x01.device, x01.dtype)
        grid = F.affine_grid(affine, list(x01.shape), align_corners=False)
        x01 = F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        masks = (F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).to(
            masks.dtype
        )
        gain = torch.empty(n, 3, 1, 1).uniform_(*self.gain, generator=generator).to(x01.device, x01.dtype)
        shift = torch.empty(n, 3, 1, 1).uniform_(-self.shift, self.shift, generator=generator).to(x01.device, x01.dtype)
        x01 = (x01 * gain + shift).clamp_(0, 1)
        if self.missing_modality > 0:  # drawn only when on, so runs without it keep their random stream
            x01 = simulate_missing_sequences(x01, self.missing_modality, generator)
        return x01, masks


def random_crops(images, masks, size: int, generator=None):
    """Training on patches (nnU-Net's habit): (N, C, H, W) images and (N, 1, H, W) masks -> size x size crops, the
    same window for both. Crop the model's input, not the raw slice: the per-slice normalization must measure the
    whole slice, as it does at inference. A slice with tumor is cropped around one of its tumor pixels drawn at
    random, at a uniform position inside the window (so every crop of a tumor slice holds tumor and its surroundings
    vary); a slice without any, anywhere. How many crops hold tumor is thereby the epoch's tumor share
    (`--tumor-fraction`). The network is convolutional, so it still predicts whole slices; only its training steps
    are cheaper."""
    import torch

    n, _, height, width = images.shape
    if size >= height and size >= width:
        return images, masks
    draws = torch.rand(n, 3, generator=generator)  # three draws per slice, tumor or not: a fixed random stream
    out_x = images.new_empty(n, images.shape[1], size, size)
    out_m = masks.new_empty(n, masks.shape[1], size, size)
    for i in range(n):
        tumor = masks[i, 0].nonzero()
        if len(tumor):
            row, col = tumor[min(int(draws[i, 0] * len(tumor)), len(tumor) - 1)].tolist()
            top = min(max(row - int(draws[i, 1] * size), 0), height - size)
            left = min(max(col - int(draws[i, 2] * size), 0), width - size)
        else:
            top, left = int(draws[i, 1] * (height - size + 1)), int(draws[i, 2] * (width - size + 1))
        out_x[i] = images[i, :, top : top + size, left : left + size]
        out_m[i] = masks[i, :, top : top + size, left : left + size]
    return out_x, out_m


def simulate_missing_sequences(x01, share: float, generator=None):
    """The data set's fill for a missing sequence, on a share of the slices: channel 0 (pre-contrast), channel 2
    (post-contrast) or both replaced by a copy of channel 1 (FLAIR), each pattern a third of the time. (N, 3, H, W)."""
    import torch

    n = x01.shape[0]
    hit = torch.rand(n, generator=generator) < share
    pattern = torch.randint(0, 3, (n,), generator=generator)  # 0: pre missing, 1: post missing, 2: both
    pre, post = (hit & (pattern != 1)).to(x01.device), (hit & (pattern != 0)).to(x01.device)
    x01 = x01.clone()
    x01[pre, 0] = x01[pre, 1]
    x01[post, 2] = x01[post, 1]
    return x01

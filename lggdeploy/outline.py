"""Outline redrawing: a 2-D fully connected CRF moves the outline of each kept mask onto the slice's own edges.

PSPNet draws its outline from logits at 1/8 of the slice, upsampled bilinearly: it knows nothing of the slice's edges
at its own resolution, and outlines (too wide and too narrow in equal parts) cost most of the Dice pspnet-scratch
loses (benchmarks/results/error-anatomy-zen4/). A fully connected CRF (Kraehenbuehl & Koltun 2011, the authors' code
through `pydensecrf2`; on brain tumors: DeepMedic, Kamnitsas et al. 2017) relabels the pixels so that nearby pixels
of similar intensity share a label, each pixel's prior being the network's probability: an appearance term (sxy,
srgb, compat) and a smoothness term (smooth_sxy, smooth_compat), `iterations` mean-field steps. It runs after the
components are chosen (postprocess.py), slice by slice on the crop around the slice's mask dilated by `margin` px
(a diamond: `margin` steps of the 4-neighbourhood), and its labels are kept only inside that dilation: an outline
moves by at most `margin` px and no component is added or deleted elsewhere. The CRF's image is the three sequences
after the slice normalization `image` (data/transforms.py), clipped to [0, 1] and scaled to 0-255; the record keeps
every constant, so a later change of the defaults cannot change what an existing engine draws.

Measured on finished runs before it became `auto`'s third step (benchmarks/results/crf-outline-zen4/): +1.49 points
of mean per-patient Dice on 17 screen patients, then +1.58 (95 % CI +0.98 to +2.14) on 20 hold-out patients, none
lost, about 5-7 ms per slice with a mask on a 2-core CPU.

numpy only; `pydensecrf2` (a compiled extension, built from source by pip) is imported when an outline is redrawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lggdeploy.common.errors import LggError
from lggdeploy.data.transforms import Normalization, to_unit

INSTALL_HINT = "pip install 'lggdeploy[outline]' (pydensecrf2: pip builds it, which needs a C++ compiler)"
FIELDS = ("margin", "iterations", "smooth_sxy", "smooth_compat", "sxy", "srgb", "compat")


def _slice_normalization() -> Normalization:
    return Normalization(mode="slice")


@dataclass(frozen=True)
class OutlineCRF:
    """The CRF that redraws outlines (see the module): its terms and the image it sees."""

    margin: int = 8  # px: one logit cell of PSPNet's output stride
    iterations: int = 5
    smooth_sxy: float = 3.0
    smooth_compat: float = 3.0
    sxy: float = 10.0
    srgb: float = 10.0
    compat: float = 5.0
    image: Normalization = field(default_factory=_slice_normalization)

    def __post_init__(self):
        if self.margin < 1 or self.iterations < 1:
            raise ValueError(
                f"an outline CRF needs margin >= 1 and iterations >= 1, got {self.margin}, {self.iterations}"
            )
        if min(self.smooth_sxy, self.sxy, self.srgb) <= 0 or min(self.smooth_compat, self.compat) < 0:
            raise ValueError("an outline CRF needs positive kernel widths and non-negative weights")

    def to_json(self) -> dict:
        return {**{k: getattr(self, k) for k in FIELDS}, "image": self.image.to_json()}

    @classmethod
    def from_json(cls, obj: dict) -> OutlineCRF:
        """Raises ValueError (the caller names the file) for a damaged record or one with fields this lggdeploy does
        not know."""
        if not isinstance(obj, dict):
            raise ValueError(f"an outline record must be an object, got {obj!r}")
        unknown = sorted(set(obj) - {*FIELDS, "image"})
        if unknown:
            raise ValueError(f"unknown outline field(s) {', '.join(unknown)}: written by a newer lggdeploy?")
        try:
            values = {k: (int if k in ("margin", "iterations") else float)(obj[k]) for k in FIELDS}
            image = Normalization.from_json(obj["image"], origin="the outline record")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"the outline record is damaged ({type(err).__name__}: {err})") from None
        return cls(**values, image=image)

    def describe(self) -> str:
        return f"outlines redrawn by a dense CRF within {self.margin} px"

    def crf_images(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 slices -> (N, H, W, 3) uint8: what the CRF's appearance term compares."""
        x01 = to_unit(np.asarray(images, np.uint8))
        if self.image.mode == "slice":
            x01 = x01 * self.image.slice_factors(x01)
        scaled = (np.clip(x01, 0, 1) * 255).round().astype(np.uint8)
        return np.ascontiguousarray(scaled.transpose(0, 2, 3, 1))

    def redraw(self, masks: np.ndarray, probabilities: np.ndarray, images: np.ndarray) -> np.ndarray:
        """(N, H, W) kept masks, their foreground probabilities (every pixel's) and the (N, H, W, 3) uint8 slices ->
        the masks with their outlines redrawn."""
        masks = np.asarray(masks, bool)
        if not masks.any():
            return masks.copy()
        densecrf = require_densecrf()
        drawn = np.flatnonzero(masks.any(axis=(1, 2)))
        out = np.zeros_like(masks)
        for i, image in zip(drawn, self.crf_images(np.asarray(images)[drawn]), strict=True):
            out[i] = self._redraw_slice(densecrf, masks[i], np.asarray(probabilities[i], np.float32), image)
        return out

    def _redraw_slice(self, densecrf, mask: np.ndarray, prob: np.ndarray, image: np.ndarray) -> np.ndarray:
        zone = dilate(mask, self.margin)
        rows, cols = np.nonzero(zone.any(axis=1))[0], np.nonzero(zone.any(axis=0))[0]
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        p = np.clip(prob[r0:r1, c0:c1], 1e-5, 1 - 1e-5)
        h, w = p.shape
        crf = densecrf.DenseCRF2D(w, h, 2)
        crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.stack([1 - p, p]).reshape(2, -1)), dtype=np.float32))
        crf.addPairwiseGaussian(sxy=self.smooth_sxy, compat=self.smooth_compat)
        crf.addPairwiseBilateral(
            sxy=self.sxy, srgb=self.srgb, rgbim=np.ascontiguousarray(image[r0:r1, c0:c1]), compat=self.compat
        )
        q = np.asarray(crf.inference(self.iterations)).reshape(2, h, w)
        out = np.zeros_like(mask)
        out[r0:r1, c0:c1] = q[1] > q[0]
        return out & zone


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """A 2-D bool mask grown by `steps` steps of the 4-neighbourhood (scipy's binary_dilation with its default
    structure, iterated), numpy only."""
    out = np.array(mask, bool, copy=True)
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def densecrf_available() -> bool:
    try:
        require_densecrf()
    except LggError:
        return False
    return True


def require_densecrf():
    """The `pydensecrf.densecrf` module, or one line that says how to install it."""
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError:
        raise LggError(
            f"this post-processing redraws outlines with a dense CRF, which needs pydensecrf2: {INSTALL_HINT}"
        ) from None
    return densecrf

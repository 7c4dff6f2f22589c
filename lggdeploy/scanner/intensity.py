"""From scanner units to the 8-bit scale the models were trained on: the one mapping predict, pack and verify use.

The data set's slices (kaggle_3m) are 8-bit display images, one per sequence, made from the TCIA MR series. A
scanner series holds 12-16-bit values (after RescaleSlope / RescaleIntercept, the modality values) whose scale is
arbitrary from scanner to scanner. The mapping is linear, per sequence and per patient volume: the sequence's display
range [low, high] is cut into 256 equal grey levels,

    uint8 = clip(floor(256 * (value - low) / (high - low + step)), 0, 255)

where `step` is the size of one stored code in modality units (RescaleSlope; 1 for integer NIfTI data, 0 for float
data), so that the range's high - low + step codes fill the 256 levels exactly. [low, high] is the **display range
the series itself carries**:

- DICOM: the VOI window (WindowCenter c, WindowWidth w, DICOM's linear function, PS3.3 C.11.2.1.2): low = c - 0.5 -
  (w - 1) / 2, high = c - 0.5 + (w - 1) / 2 — the range a radiologist sees the series in (the first window when there
  are several; the widest span when slices differ);
- NIfTI: cal_min / cal_max of the header, when cal_max > cal_min;
- neither: the volume's own range (min, max): the "minmax" mode, said in the outputs.

Why this mapping: the data set's slices are display images (0 is background and nearly every volume reaches 255 in
every sequence: the volume's range stretched onto 8 bits), and a window is what the scanner, and the converter that
made 8-bit images from a series, call its displayable range. Equal grey levels over the range's codes are what
dropping bits does: 8-bit values stored as they are (window c 128, w 256, or cal 0-255) map to themselves exactly, and
a 12-bit series made from them (value × 16 plus anything below 16, any rescale, the window over its 4096 codes) maps
back to them exactly. DICOM's own display function (rounded, `(value - low) / (high - low) * 255`) differs from it by
at most one grey level. The mode and range used are recorded per sequence in predict's case.json and in a bundle's
verification record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WINDOW, CALIBRATION, MINMAX = "window", "calibration", "minmax"
MODES = ("auto", WINDOW, MINMAX)  # auto: the series' own display range (window / cal_min-cal_max), else min-max


@dataclass(frozen=True)
class DisplayRange:
    low: float
    high: float
    source: str  # WINDOW, CALIBRATION or MINMAX
    step: float = 1.0  # one stored code in modality units (RescaleSlope; 0 for continuous values)

    def to_json(self) -> dict:
        return {"low": self.low, "high": self.high, "step": self.step, "source": self.source}


def window_range(center: float, width: float) -> tuple[float, float]:
    """DICOM's linear VOI function (PS3.3 C.11.2.1.2.1) as the value range it maps onto the output's full range."""
    return center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2


def minmax_range(volume: np.ndarray, step: float = 1.0) -> DisplayRange:
    return DisplayRange(float(np.min(volume)), float(np.max(volume)), MINMAX, step)


def to_model_scale(volume: np.ndarray, display: DisplayRange) -> np.ndarray:
    """One sequence's modality values (any shape, float) onto the data set's 8-bit scale."""
    codes = display.high - display.low + display.step
    if not display.high > display.low:  # a constant volume (or window): all background
        return np.zeros(np.shape(volume), np.uint8)
    levels = np.floor((np.asarray(volume, np.float64) - display.low) * (256.0 / codes) + 1e-9)
    return np.clip(levels, 0, 255).astype(np.uint8)

"""Every numeric command-line option's range, declared once and checked in one place before a command starts work.

`check_options(command, values)` is called by the CLI with a command's parsed options before its body runs, so a bad
value is one line and exit 2 before any folder is created or any file is read. Every float must be finite; each
option has bounds, with an upper bound wherever memory or time grows with the value (batch sizes, samples, rounds).
`tests/test_options.py` checks that every numeric option of every command has a range here and drives each with
NaN, infinities, negatives, zero, huge values and wrong types.

Checks that depend on two options together (e.g. --warmup-epochs below --epochs) or on the data stay with the
library function that owns them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from lggdeploy.common.errors import LggError


@dataclass(frozen=True)
class Range:
    low: float
    high: float | Callable[[], float]
    low_open: bool = False  # the bound itself is excluded
    high_open: bool = False
    meaning: str = ""  # what the number is, for the message

    def upper(self) -> float:
        return self.high() if callable(self.high) else self.high

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        high = self.upper()
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = value < high if self.high_open else value <= high
        return above_low and below_high

    def describe(self) -> str:
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        high = self.upper()
        shown = [f"{b:g}" if isinstance(b, float) else str(b) for b in (self.low, high)]
        return f"{left}{shown[0]}, {shown[1]}{right}" + (f" ({self.meaning})" if self.meaning else "")


def _cores() -> int:
    return os.cpu_count() or 1


POSITIVE_RATE = Range(0.0, 10.0, low_open=True, meaning="a learning rate")
SHARE = Range(0.0, 1.0, meaning="a share")
SEED = Range(0, 2**32 - 1, meaning="a seed")
BATCH = Range(1, 256, meaning="images per batch; memory grows with it")
POINTS = Range(0.0, 100.0, meaning="Dice points")
PORT = Range(1, 65_535, meaning="a TCP port")

# Option name -> range, for every command that has it (the CLI's parameter names).
RANGES: dict[str, Range] = {
    "threads": Range(1, _cores, meaning="CPU threads, at most this machine's cores"),
    "seed": SEED,
    "iters": Range(1, 10_000, meaning="timed rounds"),
    "warmup": Range(0, 1_000, meaning="warm-up runs"),
    "seconds": Range(0.0, 86_400.0, low_open=True, meaning="seconds"),
    "calib_samples": Range(1, 1_024, meaning="calibration slices"),
    "max_drop": POINTS,
    "max_patient_drop": POINTS,
    "min_agreement": Range(0.0, 1.0, meaning="a Dice of masks"),
    "min_batch": BATCH,
    "opt_batch": BATCH,
    "max_batch": BATCH,
    "batch": BATCH,
    "workspace_gib": Range(0.0, 1_024.0, low_open=True, meaning="GiB"),
    "qat_epochs": Range(0, 1_000, meaning="epochs"),
    "qat_lr": POSITIVE_RATE,
    "folds": Range(2, 100, meaning="cross-validation folds"),
    "patients": Range(1, 10_000, meaning="phantom patients"),
    "min_slices": Range(1, 1_000, meaning="slices per patient"),
    "max_slices": Range(1, 1_000, meaning="slices per patient"),
    "batch_size": Range(2, 256, meaning="images per batch (batch norm needs 2); memory grows with it"),
    "opset": Range(18, 21, meaning="ONNX opsets the exporter writes"),
    "budget_minutes": Range(0.0, 10_080.0, low_open=True, meaning="minutes, at most a week"),
    "prune_epochs": Range(0, 1_000, meaning="epochs"),
    "prune_lr": POSITIVE_RATE,
    "distill_weight": Range(0.0, 1.0, low_open=True, meaning="the teacher's share of the loss"),
    "samples": Range(1, 1_024, meaning="verification slices; the bundle grows with it"),
    "http_port": PORT,
    "grpc_port": PORT,
    "metrics_port": PORT,
    "max_queue_delay_us": Range(0, 10_000_000, meaning="microseconds, at most 10 s"),
    "instances": Range(1, 64, meaning="engine instances"),
    "threshold": Range(0.0, 1.0, low_open=True, high_open=True, meaning="a probability"),
    "spacing": Range(0.0, 100.0, low_open=True, meaning="millimetres per pixel"),
    "ratio": Range(0.0, 1.0, low_open=True, high_open=True, meaning="a share of channels"),
    "steps": Range(1, 100, meaning="pruning steps"),
    "finetune_epochs": Range(0, 1_000, meaning="epochs"),
    "lr": POSITIVE_RATE,
    "epochs": Range(1, 100_000, meaning="epochs"),
    "img_size": Range(64, 1_024, meaning="pixels, a multiple of 32"),
    "tumor_fraction": Range(0.0, 1.0, high_open=True, meaning="a share of each epoch"),
    "warmup_epochs": Range(0.0, 1_000.0, meaning="epochs"),
    "ema": Range(0.0, 1.0, high_open=True, meaning="0 (off) or a decay such as 0.99"),
    "missing_modality": SHARE,
    "bn_momentum": SHARE,
    "crop_size": Range(0, 1_024, meaning="pixels: 0 (whole slices) or a multiple of 32"),
    "aux_weight": Range(0.0, 10.0, meaning="0 (off) or a loss weight such as 0.4"),
}
# (command function, option) -> range, where a command reads an option differently.
COMMAND_RANGES: dict[tuple[str, str], Range] = {
    ("eval_cmd", "batch_size"): Range(1, 256, meaning="images per batch; memory grows with it"),
    ("demo_cmd", "patients"): Range(4, 1_000, meaning="phantom patients: a split needs train, val and test"),
}
# Options holding comma-separated numbers: each number's range and its kind.
LIST_RANGES: dict[str, tuple[type, Range]] = {
    "batch_sizes": (int, BATCH),
    "prune_ratios": (float, Range(0.0, 1.0, low_open=True, high_open=True, meaning="a share of channels")),
    "ratios": (float, SHARE),
}


def range_of(command: str, name: str) -> Range | None:
    return COMMAND_RANGES.get((command, name)) or RANGES.get(name)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(command: str, values: dict) -> dict:
    """`values` with comma-separated number lists parsed; LggError (one line) for the first value out of range."""
    checked = dict(values)
    for name, value in values.items():
        if name in LIST_RANGES and isinstance(value, str):
            checked[name] = parse_numbers(value, name)
            continue
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        allowed = range_of(command, name)
        if allowed is None:
            raise LggError(f"{flag(name)} has no declared range (lggdeploy/common/options.py): a bug, please report it")
        if not allowed.contains(value):
            raise LggError(f"{flag(name)} {value}: must lie in {allowed.describe()}")
    return checked


def parse_numbers(text: str, name: str) -> tuple:
    """'1,8' -> (1, 8) for a list option, every number checked against its range ('' -> ())."""
    kind, allowed = LIST_RANGES[name]
    try:
        numbers = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LggError(f"{flag(name)} {text!r}: give comma-separated {kind.__name__}s, e.g. '1,8'") from None
    for number in numbers:
        if not allowed.contains(number):
            raise LggError(f"{flag(name)} {text!r}: {number} must lie in {allowed.describe()}")
    return numbers

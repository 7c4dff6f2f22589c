"""`build`'s options: defaults and help in one place (light: the CLI derives its flags from it at start-up)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lggdeploy.engines.precision.criteria import DEFAULT_CRITERIA, GateCriteria


@dataclass
class BuildOptions:
    out_dir: Path = Path("engines")
    data: Path | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    int8_profile: str | None = None
    calib_samples: int = 32
    calib_method: str = "minmax"
    max_drop: float = DEFAULT_CRITERIA.max_drop
    max_patient_drop: float = DEFAULT_CRITERIA.max_patient_drop
    min_agreement: float = DEFAULT_CRITERIA.min_agreement
    force: bool = False
    batch: tuple[int, int, int] = (1, 8, 32)
    workspace_gib: float = 4.0
    threads: int | None = None
    # INT8 quantization-aware fine-tuning: "auto" when post-training INT8 fails its gate, "always", or "off"
    qat: str = "auto"
    qat_epochs: int = 1
    qat_lr: float = 1e-3
    # The FP32 model the gate compares with (default: the checkpoint itself). `optimize` gates the engines of a
    # pruned checkpoint against the unpruned model, so that pruning and quantization share one budget.
    reference: Path | None = None
    # A time.monotonic() instant (optimize's --budget-minutes): past it, an engine still failing its gate stops searching
    # (no more fallback rebuilds, no QAT) and SearchStopped is raised instead of GateFailed.
    deadline: float | None = None
    # optimize's speed probe, asked once when an INT8 engine fails its gate fully quantized (before any fallback or QAT):
    # worth_searching(open_engine, val_batch) -> a reason no search from it can win, or None. open_engine() opens that
    # engine as bench would; val_batch(n) gives n preprocessed val slices. A reason raises CannotWin (no engine written).
    worth_searching: Callable | None = None

    @property
    def criteria(self) -> GateCriteria:
        return GateCriteria(self.max_drop, self.max_patient_drop, self.min_agreement)


HELP = {
    "precision": "fp32, fp16, bf16, int8 or all",
    "int8_profile": "cpu, tensorrt or openvino (default: the backend's own profile)",
    "data": "kaggle_3m folder with the checkpoint's val patients (default: the checkpoint's)",
    "calib_samples": "validation slices for INT8 calibration",
    "calib_method": "minmax, entropy or percentile",
    "force": "write an engine that failed its gate (its manifest says so)",
    "workspace_gib": "TensorRT workspace limit in GiB",
    "threads": "CPU threads for the gate's runs (default: all cores)",
    "qat": "INT8 quantization-aware fine-tuning: auto (when post-training INT8 fails its gate), always or off",
    "qat_epochs": "QAT epochs on the checkpoint's train split (0: no QAT)",
    "qat_lr": "QAT learning rate (SGD, momentum 0.9, cosine to zero)",
    "reference": "judge against this checkpoint's FP32 model instead of the built one's (e.g. the unpruned model a "
    "pruned one replaces; same input size, normalization and split)",
}
DEFAULTS = BuildOptions()

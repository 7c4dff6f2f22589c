"""`optimize`'s options: defaults and help in one place (light: the CLI derives its flags from it at start-up)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lggdeploy.backends.base import BACKENDS, cpu_backends
from lggdeploy.common.errors import LggError
from lggdeploy.engines.precision.criteria import DEFAULT_CRITERIA, GateCriteria

LADDER_PRECISIONS = ("fp32", "bf16", "int8")  # FP16 is no CPU precision: emulated, slower than FP32


def cpu_ladder() -> tuple[tuple[str, str], ...]:
    """Every CPU backend's FP32, BF16 and INT8 rungs, precision by precision (backends/base.py's rows)."""

    return tuple(
        (backend, precision)
        for precision in LADDER_PRECISIONS
        for backend in cpu_backends()
        if precision in BACKENDS[backend].precisions
    )


LADDER = cpu_ladder()


@dataclass
class OptimizeOptions:
    out: Path = Path("optimized")
    data: Path | None = None
    max_drop: float = DEFAULT_CRITERIA.max_drop
    max_patient_drop: float = DEFAULT_CRITERIA.max_patient_drop
    min_agreement: float = DEFAULT_CRITERIA.min_agreement
    budget_minutes: float | None = None
    prune_ratios: tuple[float, ...] = (0.3,)
    prune_epochs: int = 2
    prune_lr: float = 1e-4
    distill: bool = True
    distill_weight: float = 0.5  # the teacher's share of the fine-tuning loss
    qat: str = "auto"
    qat_epochs: int = 1
    calib_samples: int = 32
    batch: int = 8  # the batch size the choice is made for
    batch_sizes: tuple[int, ...] = (1, 8)
    iters: int = 20
    threads: int | None = None
    ladder: tuple[tuple[str, str], ...] = LADDER
    search_all: bool = (
        False  # search every failing INT8 rung, even one the speed probe finds cannot win (a complete front)
    )

    def validate(self) -> None:
        GateCriteria(self.max_drop, self.max_patient_drop, self.min_agreement).validate()
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise LggError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if any(not 0 < r < 1 for r in self.prune_ratios):
            raise LggError(
                f"--prune-ratios must lie strictly between 0 and 1, got {', '.join(map(str, self.prune_ratios))}"
            )
        if self.prune_ratios and self.prune_epochs < 1:
            raise LggError(
                "pruning without fine-tuning loses most of the accuracy: give --prune-epochs 1 or more, or --prune-ratios ''"
            )
        if self.prune_ratios and not self.prune_lr > 0:
            raise LggError(f"--prune-lr must be positive, got {self.prune_lr}")
        if self.prune_ratios and self.distill:
            from lggdeploy.models.prune import check_distill_weight

            check_distill_weight(self.distill_weight)
        if self.batch not in self.batch_sizes:
            raise LggError(f"--batch {self.batch} must be one of the timed batch sizes {self.batch_sizes}")


HELP = {
    "data": "kaggle_3m folder (default: the checkpoint's)",
    "budget_minutes": "after this many minutes no new candidate is started and a failing INT8 search stops before its "
    "next rebuild (what passed is still timed; a rerun continues)",
    "prune_ratios": "comma-separated structured pruning ratios to try ('' for none)",
    "prune_epochs": "fine-tuning epochs after pruning (distilled from the unpruned model)",
    "prune_lr": "fine-tuning learning rate after pruning (warm-up, then cosine)",
    "distill": "fine-tune pruned models against the unpruned model's outputs",
    "distill_weight": "the unpruned model's share of the fine-tuning loss, in (0, 1]",
    "qat": "INT8 quantization-aware fine-tuning: auto, always or off",
    "qat_epochs": "QAT epochs when post-training INT8 fails (0: no QAT)",
    "calib_samples": "validation slices for INT8 calibration",
    "batch": "the batch size the fastest engine is chosen for",
    "batch_sizes": "batch sizes timed",
    "iters": "timed rounds per batch size (candidates interleaved)",
    "threads": "CPU threads for every runtime (default: all cores)",
    "search_all": "search every INT8 rung that fails post-training, even one the speed probe finds already slower "
    "than an engine that passed (a complete front, a longer run)",
}
DEFAULTS = OptimizeOptions()

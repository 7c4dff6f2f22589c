"""The accuracy gate's criteria and their defaults, and the rules that apply them: the one place they are written.

Light on purpose (no numpy): the CLI reads the defaults for its flags, `build`, `optimize` and `pack` for their
options and records. The gate itself (gate.py) applies them; its docstring says why a retrained model has its own rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from lggdeploy.common.errors import LggError


@dataclass(frozen=True)
class GateCriteria:
    # Read off the 34-patient engines (benchmarks/results/34p/): healthy engines agree at >= 0.98, the one that lost
    # 18 points on a patient at 0.85; about 0.92 corresponds to the 2-point per-patient budget.
    max_drop: float = 0.5  # mean per-patient Dice drop on val, points (1 point = 0.01 Dice)
    max_patient_drop: float = 2.0  # the worst val patient's drop, points
    min_agreement: float = 0.90  # every val patient: Dice of the engine's masks against the reference model's

    def validate(self) -> GateCriteria:
        """A bad criterion is a user's mistake (exit 2), never a failed gate (exit 3)."""
        if not self.max_drop >= 0:
            raise LggError(f"--max-drop must be 0 or more Dice points, got {self.max_drop}")
        if not self.max_patient_drop >= 0:
            raise LggError(f"--max-patient-drop must be 0 or more Dice points, got {self.max_patient_drop}")
        if not 0 <= self.min_agreement <= 1:
            raise LggError(f"--min-agreement must lie between 0 and 1 (a Dice of masks), got {self.min_agreement}")
        return self

    def to_json(self) -> dict:
        return {
            "max_mean_drop_points": self.max_drop,
            "max_patient_drop_points": self.max_patient_drop,
            "min_agreement": self.min_agreement,
        }


DEFAULT_CRITERIA = GateCriteria()

# The flags' help, shared by `build` and `optimize` (and any command that gates).
HELP = {
    "max_drop": "largest allowed mean drop of val per-patient Dice against the FP32 model, in points (0.01 Dice)",
    "max_patient_drop": "largest allowed drop of any one val patient's Dice, in points",
    "min_agreement": "smallest allowed Dice of the engine's masks against the FP32 model's masks, per val patient",
}


FIDELITY = "fidelity"  # the same function: agreement and per-patient drops against the FP32 model it came from
LABELS = "labels"  # a retrained model's FP32 against the unpruned FP32: drops and missed patients, agreement recorded
LABELS_TOTAL = "labels-total"  # a retrained model's quantized engine against the unpruned FP32: mean drop, missed
RETRAINED_QUANTIZED = f"{FIDELITY}+{LABELS_TOTAL}"  # both of the above, each against its own reference

RULES = {
    FIDELITY: "fidelity to the FP32 model it came from: mean and worst per-patient Dice drop, mask agreement on every "
    "val patient",
    LABELS: "a retrained (pruned, fine-tuned) model against the unpruned FP32 model, on labels: mean and worst "
    "per-patient Dice drop, no val patient missed that the unpruned model found; mask agreement recorded, not judged",
    LABELS_TOTAL: "against the unpruned FP32 model on labels, one budget with pruning: mean per-patient Dice drop, no "
    "val patient missed that the unpruned model found",
    RETRAINED_QUANTIZED: "fidelity to the retrained model's own FP32 model, and on labels against the unpruned FP32 "
    "model (mean drop, one budget with pruning; no val patient missed)",
}


def rule_for(precision: str, retrained: bool) -> str:
    """The rule that judges an engine of this precision of a retrained (or the original) model."""
    if not retrained:
        return FIDELITY
    return LABELS if precision == "fp32" else RETRAINED_QUANTIZED


def missed(row: dict) -> bool:
    """A val patient whose tumor the reference found (any overlap) and the engine did not. Rows stored before the
    detection flags were kept tell it from their Dice: the reference overlapped (Dice > 0), the engine did not (0)."""
    if "fp32_detected" in row:
        return row["fp32_detected"] is True and row["engine_detected"] is False
    return row["fp32_dice"] > 0 and row["engine_dice"] == 0

"""The accuracy gate's criteria and their defaults: the one place they are written.

Light on purpose (no numpy): the CLI reads the defaults for its flags, `build`, `optimize` and `pack` for their
options and records. The gate itself (gate.py) applies them.
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

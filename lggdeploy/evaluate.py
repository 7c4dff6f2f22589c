"""The documented import path `lggdeploy.evaluate` (README): evaluation lives in lggdeploy/models/evaluate.py."""

from lggdeploy.models.evaluate import default_eval_path, evaluate_checkpoint, score_model

__all__ = ["default_eval_path", "evaluate_checkpoint", "score_model"]

"""The documented import path `lggdeploy.train` (README): training lives in lggdeploy/models/train.py."""

from lggdeploy.models.train import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]

"""`bench`'s options: defaults and help in one place (light: the CLI derives its flags from it at start-up)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class BenchOptions:
    engines_dir: Path = Path("engines")
    data: Path | None = None
    split: str = "test"
    split_file: Path | None = None
    batch_sizes: tuple[int, ...] = (1, 8)
    iters: int = 20
    seconds: float | None = None  # stop the timed rounds of a batch size after this long (at least 3 rounds)
    warmup: int = 3
    threads: int | None = None
    bootstrap_reps: int = 2000
    seed: int = 0  # the shuffled order of the engines in each timing round
    noise_warning: float = 0.10  # warn when the A/A ratio is further than this from 1


HELP = {
    "data": "kaggle_3m folder (default: the checkpoints' data folder)",
    "split": "test, val, train or all",
    "split_file": "split JSON (default: the split in each engine's manifest)",
    "batch_sizes": "comma-separated batch sizes to time",
    "iters": "timed rounds per batch size (engines interleaved in each round)",
    "seconds": "stop the rounds of a batch size after this many seconds",
    "warmup": "untimed runs of each engine before the rounds",
    "threads": "CPU threads for ONNX Runtime, OpenVINO and PyTorch alike (default: all cores)",
}
DEFAULTS = BenchOptions()

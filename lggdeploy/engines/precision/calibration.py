"""INT8 calibration data: slices of the checkpoint's validation split, tumor and tumor-free both represented."""

from __future__ import annotations

import hashlib
import json

from lggdeploy.common.errors import LggError
from lggdeploy.data.arrays import SliceArrays, pick_slices
from lggdeploy.data.transforms import Normalization, preprocess


def pick_calibration_slices(val: SliceArrays, count: int) -> SliceArrays:
    """`count` slices spread over every val patient, half with tumor and half without where possible."""
    if len(val) == 0:
        raise LggError(
            "the split has no validation slices: INT8 calibration and the accuracy gate need some (make a split with val patients)"
        )
    if count < 1:
        raise LggError(f"--calib-samples must be at least 1, got {count}")
    return pick_slices(val, count)


def slice_ids(slices: SliceArrays) -> list[str]:
    return [f"{p}:{n}" for p, n in zip(slices.patients.tolist(), slices.numbers.tolist())]


def cache_key(model_sha256: str, ids: list[str], method: str, symmetric: bool) -> str:
    """Calibration ranges depend on the float model, the slices, the method and range symmetry: nothing else."""
    blob = json.dumps({"model": model_sha256, "slices": ids, "method": method, "symmetric": symmetric}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def slice_list_hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def make_reader(slices: SliceArrays, img_size: int, normalization: Normalization, input_name: str = "input"):
    from onnxruntime.quantization import CalibrationDataReader

    class SliceReader(CalibrationDataReader):
        """One preprocessed slice per call, exactly as the engine will see it."""

        def __init__(self):
            self.batches = [preprocess(slices.images[i : i + 1], img_size, normalization) for i in range(len(slices))]
            self.position = 0

        def get_next(self):
            if self.position >= len(self.batches):
                return None
            self.position += 1
            return {input_name: self.batches[self.position - 1]}

        def rewind(self):
            self.position = 0

        def __len__(self):
            return len(self.batches)

    return SliceReader()

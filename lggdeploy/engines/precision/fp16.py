"""FP16: a typed half-precision graph with FP32 inputs/outputs (onnxconverter-common's float16)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from lggdeploy.common.files import atomic_path

# Reductions over many values lose precision or overflow in half; keep them (and resampling) in FP32.
FP32_OPS = ["GlobalAveragePool", "ReduceMean", "ReduceSum", "AveragePool", "Resize"]
TRUNCATED = re.compile(r"the float32 number (?P<value>\S+) will be truncated to (?P<to>\S+)")


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> tuple[Path, dict]:
    """Write the FP16 graph; return what the converter changed beyond rounding: weights clamped to the FP16 range
    (|w| above its limit: a real loss, reported) and tiny weights raised to its smallest normal value."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(fp32_path))
    with warnings.catch_warnings(record=True) as caught:  # scoped to this call: the converter warns once per array
        warnings.simplefilter("always", UserWarning)
        half = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + FP32_OPS
        )
    clamped, raised, other = [], 0, []
    for warning in caught:
        match = TRUNCATED.search(str(warning.message))
        if match and abs(float(match["to"])) >= 1.0:
            clamped.append(float(match["value"]))
        elif match:
            raised += 1
        else:
            other.append(str(warning.message)[:200])
    for message in other:  # anything else the converter said is the user's to see
        warnings.warn(message, UserWarning, stacklevel=2)
    with atomic_path(out_path) as tmp:
        onnx.save_model(half, str(tmp))
    facts = {
        "weights_clamped_to_fp16_range": len(clamped),
        "largest_clamped_value": max(clamped, key=abs) if clamped else None,
        "tiny_weights_raised_to_fp16_min": raised,
    }
    return Path(out_path), facts

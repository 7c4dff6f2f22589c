"""FP16: a typed half-precision graph with FP32 inputs/outputs (onnxconverter-common's float16)."""

from __future__ import annotations

from pathlib import Path

# Reductions over many values lose precision or overflow in half; keep them (and resampling) in FP32.
FP32_OPS = ["GlobalAveragePool", "ReduceMean", "ReduceSum", "AveragePool", "Resize"]


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> Path:
    import onnx
    from onnxconverter_common import float16

    from lggdeploy.common.files import atomic_path

    import warnings

    model = onnx.load(str(fp32_path))
    with warnings.catch_warnings():  # it warns once per tiny weight it rounds to the FP16 range
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + FP32_OPS
        )
    with atomic_path(out_path) as tmp:
        onnx.save_model(half, str(tmp))
    return Path(out_path)

"""INT8: Q/DQ graphs calibrated on validation slices, for two targets.

- `tensorrt`: what TensorRT's ONNX parser accepts — signed INT8, zero point 0 (symmetric activations and
  weights), per-channel weights on the output-channel axis, per-tensor activations, float biases; Q/DQ on the
  inputs of convolutions and matrix products only, where NVIDIA's own tools (Model Optimizer, pytorch-quantization)
  place them and TensorRT fuses them. Quantizing every tensor (residual adds, the pyramid's concat, the logits
  before the final upsampling) cost the 34-patient pspnet-scratch 5.15 points on val; convolutions only, 0.35
  (benchmarks/results/qat/).
- `cpu`: what ONNX Runtime runs fastest on the host CPU — its guidance: U8S8 (uint8 activations, int8 weights),
  with reduce_range on x86 without VNNI; S8S8 on ARM with dot-product instructions. Q/DQ on the convolutions'
  outputs too, which ONNX Runtime needs to fuse a convolution into QLinearConv.
- `openvino`: the cpu profile's types, but Q/DQ on the convolutions' inputs only — where OpenVINO's own quantizer
  (NNCF) puts its FakeQuantize nodes. A quantized output leaves a convolution's activation (SiLU, sigmoid gates,
  residual adds) between a DequantizeLinear and the next QuantizeLinear, which OpenVINO runs as separate float
  kernels instead of fusing it into the int8 convolution: the EfficientNet-B7 UNet spent a quarter of its time
  there and ran slower than its BF16 engine (benchmarks/results/openvino-int8-placement/). And full 8-bit weights
  on every CPU: on an AVX2-only CPU, 7-bit weights (the cpu profile's reduce_range) cost OpenVINO accuracy and
  bought no speed — least val mask agreement 0.904 against 0.974, logit SQNR 28.4 against 34.8 dB, same
  ms/image (benchmarks/results/int8-weight-range/).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from lggdeploy.common.errors import LggError
from lggdeploy.common.files import atomic_path

METHODS = ("minmax", "entropy", "percentile")
PROFILES = ("tensorrt", "cpu", "openvino")


@dataclass(frozen=True)
class Int8Recipe:
    profile: str
    activation_type: str  # "int8" | "uint8"
    weight_type: str
    per_channel: bool
    reduce_range: bool
    symmetric_activations: bool
    op_types: tuple[str, ...] | None  # None: every op ONNX Runtime can quantize
    quantize_bias: bool = True  # int32 bias Q/DQ; TensorRT takes float biases and fuses them itself
    # Q/DQ on the outputs of the quantized ops too: what ONNX Runtime fuses into QLinearConv (cpu). TensorRT wants
    # them on inputs only (its own fusions decide the output precision), as NVIDIA's tools and QAT place them.
    quantize_outputs: bool = True

    def to_json(self) -> dict:
        return {**self.__dict__, "op_types": list(self.op_types) if self.op_types else "all"}


def recipe_for(profile: str, isa: list[str] | None = None, arch: str | None = None) -> Int8Recipe:
    if profile == "tensorrt":
        return Int8Recipe(
            "tensorrt",
            "int8",
            "int8",
            True,
            False,
            True,
            ("Conv", "ConvTranspose", "MatMul", "Gemm"),
            quantize_bias=False,
            quantize_outputs=False,
        )
    if profile == "openvino":
        return replace(recipe_for("cpu", isa, arch), profile="openvino", quantize_outputs=False, reduce_range=False)
    if profile == "cpu":
        from lggdeploy.common.machine import cpu_info

        info = cpu_info()
        isa = info["isa"] if isa is None else isa
        arch = info["arch"] if arch is None else arch
        vnni = any(flag in isa for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))
        if arch in ("aarch64", "arm64") and "asimddp" in isa:
            return Int8Recipe("cpu", "int8", "int8", True, False, True, ("Conv", "MatMul", "Gemm"))
        return Int8Recipe("cpu", "uint8", "int8", True, not vnni, False, ("Conv", "MatMul", "Gemm"))
    raise LggError(f"unknown INT8 profile {profile!r}: choose {', '.join(PROFILES)}")


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if name not in table:
        raise LggError(f"unknown --calib-method {name!r}: choose minmax, entropy or percentile")
    return table[name]


def preprocess_for_quantization(fp32_path: Path, out_path: Path) -> Path:
    """Shape inference + graph optimization, as ONNX Runtime recommends before static quantization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    return out_path


@contextlib.contextmanager
def quiet_root_logger(level: int = logging.ERROR):
    """ONNX Runtime's quantizer logs its progress on the root logger: quiet it for this call only."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, level))
    try:
        yield
    finally:
        root.setLevel(previous)


def quantize(
    prepared: Path,
    out_path: Path,
    recipe: Int8Recipe,
    reader,
    method: str,
    cache_path: Path,
    nodes_to_exclude: list[str] | None = None,
    tensor_overrides: dict | None = None,
) -> Path:
    """Write a Q/DQ INT8 model. Ranges come from `cache_path` when it exists (no recalibration).
    `tensor_overrides`: ONNX Runtime's TensorQuantOverrides (per tensor: reduce_range, axis, ...)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    extra = {
        "ActivationSymmetric": recipe.symmetric_activations,
        "WeightSymmetric": True,
        "CalibTensorRangeSymmetric": recipe.symmetric_activations,
        "QuantizeBias": recipe.quantize_bias,
    }
    if not recipe.quantize_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = list(recipe.op_types or ())
    if method == "percentile":
        extra["CalibPercentile"] = 99.99
    if tensor_overrides:
        extra["TensorQuantOverrides"] = tensor_overrides
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    if reader is not None and hasattr(reader, "rewind"):
        reader.rewind()  # a reader another call has read to its end would give no data
    with atomic_path(out_path) as tmp, contextlib.redirect_stdout(io.StringIO()), quiet_root_logger():
        quantize_static(
            str(prepared),
            str(tmp),
            calibration_data_reader=None if cache_path.is_file() else reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(recipe.op_types) if recipe.op_types else None,
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=types[recipe.activation_type],
            weight_type=types[recipe.weight_type],
            nodes_to_exclude=list(nodes_to_exclude or []),
            calibrate_method=_method(method),
            extra_options=extra,
            calibration_cache_path=str(cache_path),
        )
    return out_path


def zero_points(path: Path) -> list[int]:
    """Every zero point of every QuantizeLinear/DequantizeLinear in the graph (TensorRT needs them all 0)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    values: list[int] = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in inits:
            values.extend(np.asarray(inits[node.input[2]]).astype(np.int64).ravel().tolist())
    return values

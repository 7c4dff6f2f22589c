"""INT8 weight ranges per profile and CPU: 7-bit (reduce_range) where ONNX Runtime's kernels need it, 8-bit for OpenVINO.

Quantizes a small convolution stack with ONNX Runtime's real quantizer and reads the int8 weights back.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests.conftest import BatchReader

AVX2_ONLY = {"isa": ["avx2", "fma"], "arch": "x86_64"}
VNNI = {"isa": ["avx2", "fma", "avx512f", "avx512_vnni"], "arch": "x86_64"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from lggdeploy.engines.precision import int8

    tmp = tmp_path_factory.mktemp("weight-range")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 1, 1),
    ).eval()
    batch = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    torch.onnx.export(
        net,
        torch.from_numpy(batch[:1]),
        tmp / "float.onnx",
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
        dynamo=False,
    )
    return int8.preprocess_for_quantization(tmp / "float.onnx", tmp / "prepared.onnx"), batch, tmp


def int8_weight_extremes(path) -> list[int]:
    """Largest |q| of each convolution's int8 weight, in graph order."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    produced_by = {o: n for n in model.graph.node for o in n.output}
    out = []
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        dq = produced_by[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        out.append(int(np.abs(inits[dq.input[0]].astype(np.int32)).max()))
    return out


def quantized(prepared, profile: str, cpu: dict, name: str, **kwargs):
    from lggdeploy.engines.precision import int8

    graph, batch, tmp = prepared
    recipe = int8.recipe_for(profile, **cpu)
    return recipe, int8.quantize(
        graph, tmp / f"{name}.onnx", recipe, BatchReader(batch), "minmax", tmp / f"{name}-cache.json", **kwargs
    )


def test_cpu_profile_reduces_weights_to_7_bits_only_without_vnni(prepared):
    recipe, path = quantized(prepared, "cpu", AVX2_ONLY, "cpu-avx2")
    assert recipe.reduce_range and max(int8_weight_extremes(path)) <= 64
    recipe, path = quantized(prepared, "cpu", VNNI, "cpu-vnni")
    assert not recipe.reduce_range and min(int8_weight_extremes(path)) == 127


def test_openvino_profile_keeps_8_bit_weights_on_an_avx2_only_cpu(prepared):
    recipe, path = quantized(prepared, "openvino", AVX2_ONLY, "ov-avx2")
    assert not recipe.reduce_range and recipe.activation_type == "uint8" and not recipe.quantize_outputs
    assert min(int8_weight_extremes(path)) == 127  # per-channel symmetric: each channel's largest weight maps to 127


def test_a_tensor_override_reduces_one_weight_only(prepared):
    from lggdeploy.engines.precision import int8

    first = next(n.input[1] for n in onnx.load(str(prepared[0])).graph.node if n.op_type == "Conv")
    _, path = quantized(
        prepared, "openvino", AVX2_ONLY, "ov-first", tensor_overrides={first: [{"axis": 0, "reduce_range": True}]}
    )
    extremes = int8_weight_extremes(path)
    assert extremes[0] <= 64 and extremes[1:] == [127] * (len(extremes) - 1)
    assert int8.recipe_for("openvino", **AVX2_ONLY).to_json()["reduce_range"] is False

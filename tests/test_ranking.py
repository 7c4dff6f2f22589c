"""The INT8 fallback's ranking: which quantized nodes cost the output most, and the screen that bounds its cost."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import BatchReader

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """A small conv net (7 convolutions) as float ONNX and its Q/DQ INT8 graph, in which one convolution's weight
    scale is made 6x too large: that node alone adds a large error, every other node only rounding."""
    import torch

    from lggdeploy.engines.precision import int8

    tmp = tmp_path_factory.mktemp("ranking")
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()]
    for _ in range(5):
        layers += [torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Conv2d(8, 1, 1)).eval()
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
    prepared = int8.preprocess_for_quantization(tmp / "float.onnx", tmp / "prepared.onnx")
    recipe = int8.recipe_for("cpu", isa=["avx512_vnni"], arch="x86_64")
    qdq_path = int8.quantize(prepared, tmp / "qdq.onnx", recipe, BatchReader(batch), "minmax", tmp / "cache.json")
    qdq = onnx.load(str(qdq_path))
    convs = [n for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
    victim = convs[3]
    weight = next(n for n in qdq.graph.node if n.name == victim.name).input[
        1
    ]  # Conv(x, W, b): W is a DequantizeLinear's output
    weight_dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == weight)
    scale = next(init for init in qdq.graph.initializer if init.name == weight_dq.input[1])
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 6, scale.name))
    onnx.save(qdq, str(tmp / "damaged.onnx"))
    return prepared, tmp / "damaged.onnx", batch, victim.name, len(convs)


def test_the_damaged_node_ranks_first_with_and_without_the_screen(graphs):
    from lggdeploy.engines.precision.gate import quantized_nodes, rank_by_output_effect

    prepared, damaged, batch, victim, _ = graphs
    names = quantized_nodes(onnx.load(str(damaged)))
    full, how = rank_by_output_effect(prepared, damaged, batch, threads=1, max_scored=len(names))
    assert "screen" not in how and all(score is not None for _, score in full)
    assert full[0][0] == victim and full[0][1] > 3 + full[1][1]  # its float copy buys several dB more than any other

    screened, how = rank_by_output_effect(prepared, damaged, batch, threads=1, max_scored=2)
    assert sorted(n for n, _ in screened) == sorted(names)  # every quantized node is still reachable by the fallback
    assert [s is None for _, s in screened] == [False, False] + [True] * (len(names) - 2)
    assert screened[0][0] == victim and "the 2 adding the most error locally" in how["screen"]
    assert screened[0][1] == pytest.approx(full[0][1], abs=1e-6)  # the same measurement, only fewer of them


def test_local_loss_blames_the_node_that_adds_the_error_not_those_downstream(graphs):
    from lggdeploy.engines.precision.gate import _plain_session_options, local_error_added, quantized_nodes

    prepared, damaged, batch, victim, conv_count = graphs
    float_model, qdq_model = onnx.load(str(prepared)), onnx.load(str(damaged))
    names = quantized_nodes(qdq_model)
    loss = local_error_added(float_model, qdq_model, batch, names, _plain_session_options(1))
    worst = max(loss, key=loss.get)
    assert worst == victim and loss[victim] > 30  # a 6x weight scale: more noise than signal where rounding gives ~1e-4
    others = [n for n in names if n != victim and loss.get(n) is not None]
    assert len(others) >= conv_count - 1 and all(loss[n] < loss[victim] / 2 for n in others)

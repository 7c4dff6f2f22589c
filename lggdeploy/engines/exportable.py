"""Export-friendly equivalents of modules whose ONNX graph is slow, swapped in only for the export.

smp's PSPNet pools its 32 x 32 feature map (256 px input) to 1, 2, 3 and 6 bins; during an ONNX export its PSPBlock
switches from `nn.AdaptiveAvgPool2d` to `F.interpolate(mode="area")`, the same average. 32 is not a multiple of 3 or
6, so the dynamo exporter writes those two levels as a gather of every window, transposes, masked fills and 13
splits (about 350 nodes). On an AMX Xeon that part took over 40 % of OpenVINO's INT8 inference time
(ReduceMean on a reference kernel, transposes, reorders; `benchmarks/results/optimize-amx/`). `BinAveragePool2d`
computes the same bins (PyTorch's: start = floor(i n / o), end = ceil((i + 1) n / o)) as the mean of each bin's
slice, one axis after the other (Slice, ReduceMean, Concat; a cumulative-sum form ran on OpenVINO's reference CumSum
kernel at a tenth of the INT8 time) — no op the INT8 quantizers touch, so every
engine (FP32, FP16, INT8 from either quantizer, TensorRT) sees the same float pooling. Levels that divide evenly keep
PyTorch's own op (exported as AveragePool / ReduceMean). The export's parity check against the unswapped PyTorch
model proves the equivalence for every exported checkpoint.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


def _bins(n: int, o: int) -> tuple[list[int], list[int]]:
    return [i * n // o for i in range(o)], [-(-(i + 1) * n // o) for i in range(o)]


def bin_mean(x: torch.Tensor, dim: int, o: int) -> torch.Tensor:
    """Adaptive average pooling of axis `dim` (static length) to `o` bins: each bin's slice averaged, concatenated."""
    n = x.shape[dim]
    if o == n:
        return x
    starts, ends = _bins(n, o)
    return torch.cat([x.narrow(dim, s, e - s).mean(dim, keepdim=True) for s, e in zip(starts, ends)], dim)


class BinAveragePool2d(nn.Module):
    """`nn.AdaptiveAvgPool2d(output_size)` with the same result; uneven bins through `bin_mean`."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        size = self.output_size if isinstance(self.output_size, (tuple, list)) else (self.output_size, self.output_size)
        oh, ow = (h if size[0] is None else size[0]), (w if size[1] is None else size[1])
        if h % oh == 0 and w % ow == 0:
            return F.adaptive_avg_pool2d(x, (oh, ow))
        return bin_mean(bin_mean(x, x.dim() - 2, oh), x.dim() - 1, ow)


class PyramidLevel(nn.Module):
    """smp's PSPBlock as it computes outside an export (adaptive average pool, 1x1 Conv2dReLU, bilinear upsampling
    with aligned corners back to the input size), with the pool through `BinAveragePool2d`."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.pool = BinAveragePool2d(block.pool[0].output_size)
        self.conv = block.pool[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]
        return F.interpolate(self.conv(self.pool(x)), size=(height, width), mode="bilinear", align_corners=True)


def _is_psp_block(module: nn.Module) -> bool:
    pool = getattr(module, "pool", None)
    return (
        type(module).__name__ == "PSPBlock"
        and isinstance(pool, nn.Sequential)
        and len(pool) == 2
        and type(pool[0]) is nn.AdaptiveAvgPool2d
    )


def _swap(module: nn.Module) -> nn.Module | None:
    if _is_psp_block(module):
        return PyramidLevel(module)
    if type(module) is nn.AdaptiveAvgPool2d:
        return BinAveragePool2d(module.output_size)
    return None


def for_export(model: nn.Module) -> nn.Module:
    """A copy of `model` with smp's PSPBlocks and every plain `nn.AdaptiveAvgPool2d` replaced by the modules above
    (the model itself is not touched); the model itself when it has none."""
    if not any(_swap(m) is not None for m in model.modules()):  # a replacement only references the block's modules
        return model
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement = _swap(child)
            if replacement is not None:
                setattr(parent, name, replacement)
    return model

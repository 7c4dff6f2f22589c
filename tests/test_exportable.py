"""The export-only swap of smp's pyramid pooling: the same numbers as PyTorch's adaptive pooling, a small graph."""

import torch
from torch import nn

from lggdeploy.engines.exportable import BinAveragePool2d, PyramidLevel, for_export


def test_bin_average_pool_is_adaptive_average_pool():
    generator = torch.Generator().manual_seed(0)
    for height, width in ((32, 32), (16, 16), (31, 17), (8, 8), (5, 7)):
        x = torch.randn(2, 3, height, width, generator=generator) * 5
        for size in (1, 2, 3, 6, (3, 2), (None, 3)):
            expected = nn.AdaptiveAvgPool2d(size)(x)
            got = BinAveragePool2d(size)(x)
            assert got.shape == expected.shape, (height, width, size)
            assert torch.allclose(got, expected, atol=1e-5), (height, width, size)


def test_for_export_swaps_a_copy_of_pspnet_and_keeps_its_output():
    from lggdeploy.models.networks import build_model
    from lggdeploy.models.presets import resolve_model

    torch.manual_seed(0)
    model = build_model(resolve_model("pspnet-scratch"), encoder_weights="random").model.eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so the swapped blocks must carry them
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    swapped = for_export(model)
    assert swapped is not model
    assert sum(isinstance(m, PyramidLevel) for m in swapped.modules()) == 4
    assert not any(isinstance(m, PyramidLevel) for m in model.modules())  # the model itself is untouched
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(swapped(x), model(x), atol=1e-4)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert for_export(plain) is plain  # nothing to swap: no copy

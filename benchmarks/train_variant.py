"""A screening harness: `lggdeploy train` with one change that no flag offers (yet).

usage: .venv/bin/python benchmarks/train_variant.py CHANGE... -- [lggdeploy train options]

--decoder-dropout P: every dropout layer of the decoder gets probability P before training (smp's PSPNet: Dropout2d
0.2 on the decoder's output). Inference is unchanged (eval mode drops nothing); the checkpoint records nothing of
it, so a run made this way is labelled by its folder.

--strong-augmentation: the training augmentation's ranges widened towards nnU-Net's defaults (Isensee et al. 2021:
rotation, scaling 0.7-1.4, multiplicative brightness 0.75-1.25) within the transforms lggdeploy has: rotation
+-15 degrees (the default +-10), zoom 0.85-1.25 (0.9-1.1), per-channel gain 0.75-1.25 (0.9-1.1), per-channel shift
+-0.1 (+-0.05); flips and the missing-sequence fill unchanged. The checkpoint's `augmentation` records the ranges.

--zero-init-residual: the last batch norm of every residual block of the encoder starts with weight 0, so each block
starts as the identity (Goyal et al. 2017, torchvision's `zero_init_residual`); a from-scratch ResNeXt50 then
trains as a shallower network first. Only the initialization changes: the network, its checkpoint and engines are
the same as without it.

--low-res-epochs E [--low-res-size S]: progressive resizing — the first E epochs train on whole slices downscaled to
S px (default 128; area interpolation of the normalized slice and of the mask, so the targets there are soft), the
later ones at the run's --img-size. Validation, best.pt and the engines always see full-size slices; the cosine runs
over all epochs' steps as usual. Each epoch's wall time is in history.csv (`seconds`); its train Dice and IoU of
those first epochs are counted on the downscaled masks.

A lever that passes its screen becomes a real option.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn

from lggdeploy.cli import app
from lggdeploy.models import train as train_module

STRONG = {"rotate_degrees": 15.0, "scale": (0.85, 1.25), "gain": (0.75, 1.25), "shift": 0.1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decoder-dropout", type=float)
    parser.add_argument("--strong-augmentation", action="store_true")
    parser.add_argument("--zero-init-residual", action="store_true")
    parser.add_argument("--low-res-epochs", type=int, default=0)
    parser.add_argument("--low-res-size", type=int, default=128)
    args, rest = parser.parse_known_args()
    rest = [a for a in rest if a != "--"]
    changes = (args.decoder_dropout is not None, args.strong_augmentation, args.zero_init_residual, args.low_res_epochs)
    if not any(changes):
        sys.exit(
            "name a change: --decoder-dropout P, --strong-augmentation, --zero-init-residual or --low-res-epochs E"
        )
    build = train_module.build_model

    def build_changed(*a, **k):
        built = build(*a, **k)
        if args.decoder_dropout is not None:
            layers = [m for m in built.model.decoder.modules() if isinstance(m, nn.Dropout | nn.Dropout2d)]
            if not layers:
                sys.exit("the decoder has no dropout layer to change")
            for layer in layers:
                layer.p = args.decoder_dropout
            print(f"decoder dropout set to {args.decoder_dropout} on {len(layers)} layer(s)", file=sys.stderr)
        if args.zero_init_residual:
            norms = [m.bn3 for m in built.model.encoder.modules() if type(m).__name__ == "Bottleneck"]
            if not norms:
                sys.exit("the encoder has no bottleneck residual block")
            for norm in norms:
                nn.init.zeros_(norm.weight)
            print(f"zero-initialized the last batch norm of {len(norms)} residual block(s)", file=sys.stderr)
        return built

    train_module.build_model = build_changed
    if args.strong_augmentation:
        train_module.Augmentation = functools.partial(train_module.Augmentation, **STRONG)
        print(f"augmentation ranges widened: {STRONG}", file=sys.stderr)
    if args.low_res_epochs:
        downscale_first_epochs(args.low_res_epochs, args.low_res_size)
    app(["train", *rest])


def downscale_first_epochs(epochs: int, size: int) -> None:
    """Trainer.batch, for the first `epochs` epochs, hands over slices and masks area-downscaled to size x size."""
    batch = train_module.Trainer.batch

    def batch_downscaled(self, idx):
        x, y = batch(self, idx)
        if self.epoch > epochs or x.shape[-1] <= size:
            return x, y
        x = F.interpolate(x, size=(size, size), mode="area")
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, F.interpolate(y, size=(size, size), mode="area")

    train_module.Trainer.batch = batch_downscaled
    print(f"epochs 1-{epochs} train on slices downscaled to {size} px", file=sys.stderr)


if __name__ == "__main__":
    main()

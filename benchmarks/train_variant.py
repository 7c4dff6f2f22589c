"""A screening harness: `lggdeploy train` with one change to the network that no flag offers (yet).

usage: .venv/bin/python benchmarks/train_variant.py --decoder-dropout P -- [lggdeploy train options]

--decoder-dropout P: every dropout layer of the decoder gets probability P before training (smp's PSPNet: Dropout2d
0.2 on the decoder's output). Inference is unchanged (eval mode drops nothing); the checkpoint records nothing of
it, so a run made this way is labelled by its folder. A lever that passes its screen becomes a real option.
"""

from __future__ import annotations

import argparse
import sys

from torch import nn

from lggdeploy.cli import app
from lggdeploy.models import train as train_module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decoder-dropout", type=float, required=True)
    args, rest = parser.parse_known_args()
    rest = [a for a in rest if a != "--"]
    build = train_module.build_model

    def build_with_dropout(*a, **k):
        built = build(*a, **k)
        layers = [m for m in built.model.decoder.modules() if isinstance(m, nn.Dropout | nn.Dropout2d)]
        if not layers:
            sys.exit("the decoder has no dropout layer to change")
        for layer in layers:
            layer.p = args.decoder_dropout
        print(f"decoder dropout set to {args.decoder_dropout} on {len(layers)} layer(s)", file=sys.stderr)
        return built

    train_module.build_model = build_with_dropout
    app(["train", *rest])


if __name__ == "__main__":
    main()

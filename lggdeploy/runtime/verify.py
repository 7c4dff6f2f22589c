"""`lggdeploy verify BUNDLE`: does the engine on this device still produce the masks the validated model produced?

Torch-free (part of the runtime install): checks every checksum of the bundle, loads the engine through the
runtime on this device (the bundle's first engine usable here, or `--engine`), and judges it by the build-time
gate's agreement criterion (runtime/bundle.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from lggdeploy.common.errors import LggError
from lggdeploy.runtime.bundle import BundleError, VerifyReport, check_engine, choose_engine, opened_bundle
from lggdeploy.runtime.segmenter import Segmenter

__all__ = ["BundleError", "VerifyReport", "check_bundle_args", "verify_bundle"]


def verify_bundle(
    bundle: str | os.PathLike,
    engine: str | os.PathLike | None = None,
    threads: int | None = None,
    min_agreement: float | None = None,
) -> VerifyReport:
    bundle = Path(bundle)
    with opened_bundle(bundle) as (root, description):
        path = Path(engine) if engine else choose_engine(root, description, bundle)
        with Segmenter.load(path, threads=threads) as segmenter:
            return check_engine(segmenter, root, description, bundle, min_agreement)


def check_bundle_args(bundle: str | os.PathLike, min_agreement: float | None) -> None:
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise LggError(f"--min-agreement must lie between 0 and 1, got {min_agreement}")

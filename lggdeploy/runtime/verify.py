"""`lggdeploy verify BUNDLE`: does the engine on this device still produce the masks the validated model produced?

Torch-free (part of the runtime install): checks every checksum of the bundle, loads the engine through the
runtime on this device (every engine of the bundle usable here, or `--engine`), and judges it by the build-time
gate's agreement criterion (runtime/bundle.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from lggdeploy.common.errors import LggError
from lggdeploy.postprocess import PostProcess
from lggdeploy.runtime.bundle import BundleError, VerifyReport, check_engine, opened_bundle, usable_engines
from lggdeploy.runtime.segmenter import Segmenter

__all__ = ["BundleError", "VerifyReport", "check_bundle_args", "verify_bundle"]


def verify_bundle(
    bundle: str | os.PathLike,
    engine: str | os.PathLike | None = None,
    threads: int | None = None,
    min_agreement: float | None = None,
    trusted_key: str | os.PathLike | None = None,
) -> list[VerifyReport]:
    """One report per engine checked: `engine` (built on this device), or every engine of the bundle whose backend
    is usable here. With `trusted_key` the bundle must be signed by it; each report says what was proven."""
    bundle = Path(bundle)
    with opened_bundle(bundle, trusted_key) as opened:
        paths = [Path(engine)] if engine else usable_engines(opened.root, opened.description, bundle)
        reports = []
        for path in paths:
            # the check compares the network's masks, before post-processing: an engine whose rule redraws outlines
            # verifies without pydensecrf2
            with Segmenter.load(path, threads=threads, postprocess=PostProcess()) as segmenter:
                report = check_engine(segmenter, opened.root, opened.description, bundle, min_agreement)
            report.authenticity = opened.authenticity
            reports.append(report)
        return reports


def check_bundle_args(bundle: str | os.PathLike, min_agreement: float | None) -> None:
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise LggError(f"--min-agreement must lie between 0 and 1, got {min_agreement}")

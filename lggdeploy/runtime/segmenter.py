"""The edge runtime: a torch-free Segmenter that turns MRI slices into tumor masks with a built engine.

    from lggdeploy.runtime import Segmenter
    with Segmenter.load("engines/pspnet-scratch-1a2b3c4d/onnxruntime-int8-cpu.onnx") as seg:
        result = seg.predict(volume)          # one patient's (N, 256, 256, 3) uint8 slices, or one (256, 256, 3) slice
        result.masks, result.probabilities    # (N, 256, 256) bool / float32

Dependencies: numpy + Pillow + onnxruntime (`pip install lggdeploy[runtime]`), or tensorrt + cuda-python for
.plan engines; pydensecrf2 (`lggdeploy[outline]`) for an engine whose post-processing redraws outlines. Importing this module imports neither torch nor segmentation_models_pytorch.

Preprocessing is exactly the one recorded in the engine's manifest (lggdeploy.data.transforms, shared with
training). Inputs must be 256x256x3 uint8 (pre-contrast, FLAIR, post-contrast), the data set's convention:
another size is an error rather than a silent resize, because the model was trained at this field of view.

Post-processing: `predict` treats the slices of one call as one patient's volume and applies the engine's stored
post-processing to it (the manifest's `postprocess`, chosen on the val patients at training: small 3-D components
removed, the largest always kept, then components of low mean probability, the most confident always kept, then
the outlines redrawn by a dense CRF where the val patients kept that step; lggdeploy/postprocess.py). A scanner that streams single slices passes
`postprocess=PostProcess()` (none) and post-processes the assembled volume itself, or calls `predict` once per series.

Threads: an ONNX Runtime Segmenter may be shared by threads (InferenceSession.run is thread-safe); a
TensorRT Segmenter is bound to the thread that made it: make one per thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lggdeploy.backends.base import RunOptions
from lggdeploy.common.errors import EngineError, LggError
from lggdeploy.data.transforms import Normalization, logits_to_masks, native_logits, sigmoid
from lggdeploy.engines.formats import open_engine, read_manifest
from lggdeploy.outline import require_densecrf
from lggdeploy.postprocess import LARGEST, PostProcess
from lggdeploy.runtime.bundle import check_engine, opened_bundle
from lggdeploy.scoring import NonFiniteOutput, infer_batches

INPUT_SHAPE = (256, 256, 3)


@dataclass
class Prediction:
    masks: np.ndarray  # (N, 256, 256) bool
    probabilities: np.ndarray  # (N, 256, 256) float32


def stored_postprocess(path: Path, manifest: dict) -> PostProcess:
    """The manifest's post-processing (none for an engine built before post-processing existed)."""
    try:
        return PostProcess.from_json(manifest.get("postprocess"))
    except (ValueError, KeyError, TypeError) as exc:
        raise EngineError(
            f"{path}: the manifest's postprocess {manifest.get('postprocess')!r} is not valid ({exc}); rebuild the engine with `lggdeploy build`"
        ) from None


def float32_around(threshold: float) -> tuple[np.float32, np.float32]:
    """The largest float32 <= `threshold` and the smallest float32 > it: a float32 probability set to the first is
    off the mask (p > threshold is False), set to the second on it, whichever way float32 rounds the threshold."""
    nearest = np.float32(threshold)
    below = nearest if nearest <= threshold else np.nextafter(nearest, np.float32(0))
    above = nearest if nearest > threshold else np.nextafter(nearest, np.float32(1))
    return below, above


class Segmenter:
    def __init__(
        self, runner, manifest: dict, path: Path, threshold: float | None = None, postprocess: PostProcess | None = None
    ):
        self.runner = runner
        self.manifest = manifest
        self.path = path
        self.normalization = Normalization.from_json(manifest["normalization"], origin=str(path))
        self.img_size = int(manifest["img_size"])
        self.threshold = float(manifest["threshold"] if threshold is None else threshold)
        if not 0 < self.threshold < 1:
            raise LggError(f"threshold must be between 0 and 1, got {self.threshold}")
        self.postprocess = stored_postprocess(path, manifest) if postprocess is None else postprocess
        if self.postprocess.needs_images:
            try:
                require_densecrf()
            except LggError as exc:
                raise LggError(f"{path}: {exc}; or pass --postprocess with a rule without +crf") from None

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        threshold: float | None = None,
        threads: int | None = None,
        device: str = "auto",
        postprocess: PostProcess | None = None,
    ) -> Segmenter:
        """Read the manifest, open the engine through its backend, check compatibility before the first inference."""
        path = Path(path)
        manifest = read_manifest(path)  # a typed record: a missing or out-of-range field is refused there
        postprocess = (
            stored_postprocess(path, manifest) if postprocess is None else postprocess
        )  # before the engine is opened
        runner = open_engine(path, manifest, RunOptions(threads=threads, device=device))
        return cls(runner, manifest, path, threshold, postprocess)

    def predict(
        self,
        slices: np.ndarray,
        batch_size: int = 8,
        largest_component: bool = False,
        postprocess: PostProcess | None = None,
    ) -> Prediction:
        """Masks and probabilities for one slice (256, 256, 3) or one patient's stack (N, 256, 256, 3) of uint8.

        The stack is post-processed as one volume with `postprocess` (default: the Segmenter's, i.e. the engine's
        stored one); `largest_component=True` keeps only the largest 3-D component instead. Probabilities of the
        pixels post-processing removed are capped at the threshold, and of those its outline step added raised just
        above it, so masks and probabilities agree."""
        slices = np.asarray(slices)
        if slices.ndim == 3:
            slices = slices[None]
        if slices.ndim != 4 or slices.shape[1:] != INPUT_SHAPE:
            raise LggError(
                f"expected uint8 slices of shape {INPUT_SHAPE} (pre-contrast, FLAIR, post-contrast), got {slices.shape[1:] if slices.ndim == 4 else slices.shape}"
            )
        if slices.dtype != np.uint8:
            raise LggError(f"expected uint8 slices, got {slices.dtype}")
        masks = np.empty((len(slices), *INPUT_SHAPE[:2]), bool)
        probabilities = np.empty((len(slices), *INPUT_SHAPE[:2]), np.float32)
        try:
            for batch, logits in infer_batches(self.runner, slices, self.img_size, self.normalization, batch_size):
                native = native_logits(logits, INPUT_SHAPE[0])
                probabilities[batch] = sigmoid(native)
                masks[batch] = logits_to_masks(native, INPUT_SHAPE[0], self.threshold)
        except NonFiniteOutput:
            raise EngineError(f"{self.path}: the engine produced NaN/Inf; do not trust this engine") from None
        rule = PostProcess(LARGEST) if largest_component else (self.postprocess if postprocess is None else postprocess)
        if rule.active:
            kept = rule.apply(masks, probabilities, slices)
            below, above = float32_around(self.threshold)
            agreeing = np.where(kept, np.maximum(probabilities, above), np.minimum(probabilities, below))
            probabilities = np.where(kept == masks, probabilities, agreeing).astype(np.float32)
            masks = kept
        return Prediction(masks, probabilities)

    def verify(
        self,
        bundle: str | os.PathLike,
        min_agreement: float | None = None,
        trusted_key: str | os.PathLike | None = None,
    ):
        """Check this engine against a bundle's verification set (`lggdeploy pack`): a scanner's start-up check.
        Raises EngineError when the masks disagree with the FP32 model's (or the bundle is not signed by
        `trusted_key`, when given); returns the report otherwise."""
        with opened_bundle(bundle, trusted_key) as opened:
            report = check_engine(self, opened.root, opened.description, Path(bundle), min_agreement)
            report.authenticity = opened.authenticity
        if not report.passed:
            raise EngineError(f"{self.path} failed verification against {bundle}: {'; '.join(report.failures)}")
        return report

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

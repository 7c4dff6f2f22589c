"""What a served engine computes, request by request: the one implementation behind the Python models of `lggdeploy
serve` and `lggdeploy triton-repo`, run in Triton's Python backend. Numpy only; the engine is any Runner
`open_engine` opens.

- `pre(slices, facts)`: uint8 slices (B, 256, 256, 3) -> the network's input, normalized as the manifest says;
- `post(logits, facts)`: the network's logits -> uint8 masks (B, 256, 256) at the manifest's threshold, and the
  probabilities;
- `SliceHandler`: pre -> engine -> post, batch by batch (no post-processing: a slice knows no volume); `each` takes one
  dynamic batch of requests and refuses a bad one without failing the others;
- `VolumeHandler`: one patient's stack -> masks after the manifest's per-patient post-processing (`scoring.segment`,
  the deployed pipeline bench times) and the tumor volume in millilitres from the spacing the client gives (row, column, slice spacing in mm).

Every input is checked first (dtype, shape, an empty batch, a batch above the maximum, NaN/Inf or a non-positive
spacing): a bad request is refused with one line (`BadRequest`), never reaches the engine, and leaves the server up.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from lggdeploy.data.transforms import Normalization, native_logits, preprocess, sigmoid
from lggdeploy.postprocess import PostProcess
from lggdeploy.scoring import segment

SLICE_SHAPE = (256, 256, 3)


class BadRequest(ValueError):
    """A request the server refuses: the message says what is wrong and what was expected."""


@dataclass(frozen=True)
class EngineFacts:
    """What a client may check it talks to, and what pre/post need: read from the engine's manifest."""

    preset: str
    sha256: str
    img_size: int
    threshold: float
    normalization: dict
    postprocess: dict
    backend: str
    precision: str

    @functools.cached_property
    def preprocessing(self) -> Normalization:
        """The manifest's normalization, parsed once (not on every request)."""
        return Normalization.from_json(self.normalization, origin="the manifest")

    @classmethod
    def from_manifest(cls, manifest) -> EngineFacts:
        return cls(
            preset=str(manifest["model"]["name"]),
            sha256=str(manifest["sha256"]),
            img_size=int(manifest["img_size"]),
            threshold=float(manifest["threshold"]),
            normalization=dict(manifest["normalization"]),
            postprocess=PostProcess.from_json(manifest.get("postprocess")).to_json(),
            backend=str(manifest["backend"]),
            precision=str(manifest["precision"]),
        )

    def to_parameters(self) -> dict[str, str]:
        """Triton model-config parameters (string values)."""
        import json

        return {
            "engine_sha256": self.sha256,
            "preset": self.preset,
            "threshold": f"{self.threshold:g}",
            "img_size": str(self.img_size),
            "normalization": json.dumps(self.normalization, sort_keys=True),
            "postprocess": json.dumps(self.postprocess, sort_keys=True),
            "backend": f"{self.backend} {self.precision}",
        }


def check_slices(slices, max_batch: int | None = None, name: str = "slices") -> np.ndarray:
    array = np.asarray(slices)
    if array.dtype != np.uint8:
        raise BadRequest(f"{name}: expected UINT8 slices, got {array.dtype}")
    if array.ndim != 4 or array.shape[1:] != SLICE_SHAPE:
        raise BadRequest(
            f"{name}: expected shape [batch, 256, 256, 3] (pre-contrast, FLAIR, post-contrast), got {list(array.shape)}"
        )
    if len(array) == 0:
        raise BadRequest(f"{name}: an empty batch")
    if max_batch is not None and len(array) > max_batch:
        raise BadRequest(f"{name}: a batch of {len(array)} is above the maximum {max_batch}")
    return array


def check_spacing(spacing) -> np.ndarray:
    array = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if array.shape != (3,):
        raise BadRequest(f"spacing_mm: expected 3 values (row, column, slice spacing in mm), got {array.size}")
    if not np.all(np.isfinite(array)) or not np.all(array > 0):
        raise BadRequest(f"spacing_mm: expected finite positive millimetres, got {array.tolist()}")
    return array


def pre(slices: np.ndarray, facts: EngineFacts) -> np.ndarray:
    """The network's input for checked uint8 slices: exactly the preprocessing the model was trained with."""
    return preprocess(slices, facts.img_size, facts.preprocessing)


def post(logits: np.ndarray, facts: EngineFacts, probabilities: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 masks 0/1, float32 probabilities or None), both (B, 256, 256), at the manifest's threshold."""
    logits = np.asarray(logits, np.float32)
    if not np.all(np.isfinite(logits)):
        raise RuntimeError("the engine produced NaN/Inf logits: do not trust this engine")
    native = native_logits(logits, SLICE_SHAPE[0])
    threshold = np.float32(np.log(facts.threshold / (1 - facts.threshold)))
    masks = (native > threshold).astype(np.uint8)
    return masks, sigmoid(native).astype(np.float32) if probabilities else None


class SliceHandler:
    """Batched slices -> masks (and, when asked, probabilities): pre -> engine -> post."""

    def __init__(self, runner, facts: EngineFacts, max_batch: int, probabilities: bool = True):
        self.runner, self.facts, self.max_batch, self.probabilities = runner, facts, max_batch, probabilities

    def __call__(self, slices) -> dict[str, np.ndarray]:
        return self._answer(check_slices(slices, self.max_batch))

    def each(self, requests: list) -> list[dict[str, np.ndarray] | BadRequest]:
        """One dynamic batch of requests: each checked on its own — a bad one gets its refusal and never fails the
        others — the good ones through the engine together (at most `max_batch` slices a call), the answers split
        back per request."""
        answers: list = []
        good: list[np.ndarray] = []
        for slices in requests:
            try:
                good.append(check_slices(slices, self.max_batch))
                answers.append(len(good[-1]))
            except BadRequest as exc:
                answers.append(exc)
        if not good:
            return answers
        stacked = np.concatenate(good)
        parts = [self._answer(stacked[i : i + self.max_batch]) for i in range(0, len(stacked), self.max_batch)]
        merged = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        start = 0
        for i, answer in enumerate(answers):
            if not isinstance(answer, BadRequest):
                answers[i] = {key: value[start : start + answer] for key, value in merged.items()}
                start += answer
        return answers

    def _answer(self, checked: np.ndarray) -> dict[str, np.ndarray]:
        masks, probabilities = post(self.runner.infer(pre(checked, self.facts)), self.facts, self.probabilities)
        return {"masks": masks, "probabilities": probabilities} if self.probabilities else {"masks": masks}


class VolumeHandler:
    """One patient's stack -> post-processed masks and the tumor volume (ml) from the client's spacing."""

    def __init__(self, runner, facts: EngineFacts, batch: int = 8, max_slices: int = 1024):
        self.runner, self.facts, self.batch, self.max_slices = runner, facts, batch, max_slices
        self.rule = PostProcess.from_json(facts.postprocess)

    def __call__(self, volume, spacing_mm) -> dict[str, np.ndarray]:
        checked = check_slices(volume, self.max_slices, name="volume")
        spacing = check_spacing(spacing_mm)
        facts = self.facts
        masks = segment(
            self.runner, checked, facts.img_size, facts.preprocessing, facts.threshold, self.rule, self.batch
        )
        volume_ml = float(masks.sum()) * float(np.prod(spacing)) / 1000
        return {"masks": masks.astype(np.uint8), "volume_ml": np.array([volume_ml], np.float32)}

"""Self-describing checkpoints: every later command needs only the checkpoint path.

A checkpoint is a torch file holding plain data plus tensors (loadable with weights_only=True):
the model spec, encoder-weight provenance, dropped (never-run) modules, input size, normalization,
threshold, the split itself, training config, history, best metrics and the weights. `last.pt` also
carries optimizer/scheduler/RNG state for --resume. Written atomically: a kill never corrupts it.
"""

from __future__ import annotations

import datetime as _dt
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lggdeploy import __version__
from lggdeploy.common.errors import CheckpointError
from lggdeploy.common.files import atomic_path
from lggdeploy.data.split import Split
from lggdeploy.data.transforms import Normalization
from lggdeploy.models.networks import apply_layer_shapes, layer_shapes
from lggdeploy.models.presets import ModelSpec

FORMAT = "lggdeploy-checkpoint"
REQUIRED = ("model", "img_size", "normalization", "threshold", "split", "state_dict")


TRANSIENT = (
    "path",
    "optimizer",
    "scheduler",
    "scaler",
    "torch_rng",
    "rng_states",
    "ema_state_dict",
    "aux_state_dict",
)  # resume state: never carried over


def make_payload(network: nn.Module, base: dict | None = None, pruned: bool = False, **fields) -> dict:
    """A checkpoint payload: the durable fields of `base` (another checkpoint, or the fields a run starts from),
    updated with `fields`, and the model's weights. A pruned model, narrower than its smp spec, also records its
    layer shapes (plain integers) so that `model_from_checkpoint` can rebuild it."""
    payload = {k: v for k, v in (base or {}).items() if k not in TRANSIENT}
    payload.update(fields)
    payload["state_dict"] = network.state_dict()
    if pruned or "layer_shapes" in payload:
        payload["layer_shapes"] = layer_shapes(network)
    return payload


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    import segmentation_models_pytorch as smp

    payload = {
        "format": FORMAT,
        "version": 1,
        "lggdeploy_version": __version__,
        "torch_version": str(torch.__version__),  # TorchVersion is not weights_only-loadable
        "smp_version": smp.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **payload,
    }
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: train one with `lggdeploy train` (it writes best.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # a corrupt file fails weights_only loading too, for other reasons
            raise CheckpointError(
                f"{path}: not a readable checkpoint (unpickling failed); the file is corrupt or truncated: retrain or restore it"
            ) from None
        raise CheckpointError(
            f"{path}: holds pickled Python objects (e.g. a whole model saved with torch.save(model)), not an lggdeploy checkpoint; "
            "lggdeploy never unpickles code: train with `lggdeploy train`, or load the weights of such a model into one with --encoder-weights"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); the file is corrupt or truncated: retrain or restore it"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not an lggdeploy checkpoint (plain state dicts lack the model description); train with `lggdeploy train`"
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: checkpoint lacks {', '.join(missing)}; it was written by an incompatible version"
        )
    ckpt["path"] = str(path)
    return ckpt


def spec_of(ckpt: dict) -> ModelSpec:
    m = ckpt["model"]
    return ModelSpec(m["name"], m["arch"], m["encoder"], m.get("default_encoder_weights"))


def normalization_of(ckpt: dict) -> Normalization:
    return Normalization.from_json(ckpt["normalization"], origin=str(ckpt.get("path", "checkpoint")))


def split_of(ckpt: dict) -> Split:
    return Split.from_json(ckpt["split"], origin=f"{ckpt.get('path', 'checkpoint')} (embedded split)")


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """Rebuild the architecture (random init, same trimmed modules) and load the trained weights."""
    import segmentation_models_pytorch as smp

    spec = spec_of(ckpt)
    try:
        model = smp.create_model(spec.arch, encoder_name=spec.encoder, encoder_weights=None, in_channels=3, classes=1)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"{ckpt.get('path')}: unknown model {spec.name!r} ({spec.arch}/{spec.encoder}: {str(exc)[:120]}); it was written by an incompatible version"
        ) from None
    for name in ckpt.get("dropped_modules", []):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Identity())
    if "layer_shapes" in ckpt:  # a pruned model: narrower layers than the smp spec builds
        apply_layer_shapes(model, ckpt["layer_shapes"], ckpt["state_dict"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{ckpt.get('path')}: weights do not fit {spec.arch}/{spec.encoder} ({str(exc).splitlines()[0][:160]})"
        ) from None
    return model.eval()

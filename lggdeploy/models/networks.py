"""Building smp models from a spec: encoder weights (ImageNet via smp's hub, or a local file) and trimming.

Encoder weights are never silently random: "imagenet" either loads or fails with a message that says how
to supply a local file; random initialization must be asked for ("random") or be the preset's default.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lggdeploy.common.errors import CheckpointError, ModelError
from lggdeploy.models.presets import ModelSpec

RANDOM = "random"
# Classifier heads that encoder weight files carry but smp encoders do not have.
HEAD_PREFIXES = ("fc.", "_fc.", "classifier.", "head.", "last_linear.")


@dataclass
class BuiltModel:
    model: nn.Module
    encoder_weights: str  # "imagenet", "random" or "file:<path>"
    encoder_weights_sha256: str | None
    dropped_modules: list[str]


def build_model(spec: ModelSpec, encoder_weights: str | None = None, probe_size: int = 64) -> BuiltModel:
    """Create the model. `encoder_weights`: None (the preset's default), "imagenet", "random" or a file path."""
    choice = encoder_weights if encoder_weights is not None else (spec.encoder_weights or RANDOM)
    sha = None
    model = _create(spec, "imagenet" if choice == "imagenet" else None)
    dropped = drop_unused_modules(model, probe_size)
    if choice not in ("imagenet", RANDOM):
        from lggdeploy.common.files import sha256_file

        path = Path(choice)
        load_encoder_weights(model, path, dropped)
        sha = sha256_file(path)
        choice = f"file:{path}"
    return BuiltModel(model, choice, sha, dropped)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether smp's weight hub answers at all: one quick connection instead of five retries (~25 s) offline."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout
        ):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_unless_reachable(weights: str | None):
    """Offline, smp's hub loading still takes weights from the local cache, but fails at once when they are not there."""
    if weights is None or hub_reachable():
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _create(spec: ModelSpec, weights: str | None) -> nn.Module:
    import segmentation_models_pytorch as smp

    try:
        with _hub_offline_unless_reachable(weights):
            return smp.create_model(
                spec.arch, encoder_name=spec.encoder, encoder_weights=weights, in_channels=3, classes=1
            )
    except (KeyError, ValueError) as exc:
        raise ModelError(f"cannot build {spec.arch} with encoder {spec.encoder}: {exc}") from None
    except Exception as exc:  # hub download failures: no network, no cache, hub errors
        if weights is None:
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"ImageNet weights for encoder {spec.encoder} could not be downloaded through smp's hub ({reason[:160]}); "
            "pass --encoder-weights PATH to a local encoder state dict (.pth/.pt/.safetensors), "
            f"or --encoder-weights {RANDOM} to train from random init on purpose"
        ) from None


def drop_unused_modules(model: nn.Module, probe_size: int = 64) -> list[str]:
    """Replace submodules that a forward pass never runs with nn.Identity (returns their names).

    smp's PSPNet keeps the encoder stages beyond its depth (ResNeXt50 layer3 and layer4: most of its
    parameters) although it never runs them; they would bloat checkpoints, ONNX files and pruning.
    """
    called: set[str] = set()
    handles = [
        module.register_forward_pre_hook(lambda mod, args, name=name: called.add(name))
        for name, module in model.named_modules()
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, 3, probe_size, probe_size))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    dropped: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            ran = any(c == name or c.startswith(name + ".") for c in called)
            owns_state = any(True for _ in child.parameters()) or any(True for _ in child.buffers())
            if not ran and owns_state:
                setattr(parent, child_name, nn.Identity())
                dropped.append(name)
            elif ran:
                visit(child, name + ".")

    visit(model, "")
    return dropped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"encoder weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{path}: cannot read encoder weights ({type(exc).__name__}: {str(exc)[:160]}); give a torch state dict or a .safetensors file"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    if any(k.startswith("encoder.") for k in state):  # a whole smp model: keep its encoder
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return state


def load_encoder_weights(model: nn.Module, path: str | os.PathLike, dropped: list[str] = ()) -> None:
    """Load an encoder state dict from `path` into model.encoder; every tensor the encoder runs must be there."""
    path = Path(path)
    state = _read_state_dict(path)
    skipped = tuple(d.removeprefix("encoder.") + "." for d in dropped if d.startswith("encoder."))
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES + skipped)}
    try:
        result = nn.Module.load_state_dict(model.encoder, state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[1:2] or [str(exc)[:160]]
        raise ModelError(f"{path}: encoder weights do not fit this encoder ({first[0].strip()[:200]})") from None
    if result.missing_keys or result.unexpected_keys:
        expected = len(model.encoder.state_dict())
        example = (result.missing_keys or result.unexpected_keys)[0]
        raise ModelError(
            f"{path}: encoder weights do not match this encoder: {len(result.missing_keys)} of {expected} tensors missing, "
            f"{len(result.unexpected_keys)} unexpected (e.g. {example!r}); give weights saved from the same encoder"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """The channel attributes of every conv / batch-norm / linear layer (what pruning changes)."""
    shapes: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            shapes[name] = {
                "in_channels": module.in_channels,
                "out_channels": module.out_channels,
                "groups": module.groups,
            }
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            shapes[name] = {"num_features": module.num_features}
        elif isinstance(module, nn.Linear):
            shapes[name] = {"in_features": module.in_features, "out_features": module.out_features}
    return shapes


def apply_layer_shapes(
    model: nn.Module, shapes: dict[str, dict[str, int]], state_dict: dict[str, torch.Tensor]
) -> nn.Module:
    """Resize a freshly built model's layers to a pruned model's shapes, so its state dict loads strictly."""
    modules = dict(model.named_modules())
    for name, attrs in shapes.items():
        module = modules.get(name)
        if module is None:
            raise CheckpointError(
                f"pruned layer {name} does not exist in a fresh model: the checkpoint was pruned from another architecture"
            )
        for attr, value in attrs.items():
            setattr(module, attr, value)
        for pname, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            stored = state_dict.get(f"{name}.{pname}" if name else pname)
            if stored is not None and stored.shape != tensor.shape:
                replacement = torch.empty_like(stored)
                if isinstance(tensor, nn.Parameter):
                    setattr(module, pname, nn.Parameter(replacement, requires_grad=tensor.requires_grad))
                else:
                    module.register_buffer(pname, replacement)
    return model

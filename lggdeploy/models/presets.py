"""The three model presets of the study, and how any smp architecture/encoder maps to a model spec."""

from __future__ import annotations

from dataclasses import dataclass

from lggdeploy.common.errors import ModelError


@dataclass(frozen=True)
class ModelSpec:
    name: str  # preset name, or "arch:encoder" for a custom model
    arch: str  # smp architecture name (smp.create_model's `arch`)
    encoder: str  # smp encoder name
    encoder_weights: str | None  # the preset's default: "imagenet" (transfer) or None (random init)
    description: str = ""
    study_test_dice: float | None = None  # the originating study's test Dice (per-slice mean style)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "arch": self.arch,
            "encoder": self.encoder,
            "default_encoder_weights": self.encoder_weights,
        }


PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "pspnet-scratch", "PSPNet", "resnext50_32x4d", None, "PSPNet, ResNeXt50-32x4d encoder, random init", 0.8054
        ),
        ModelSpec(
            "pspnet-resnext50",
            "PSPNet",
            "resnext50_32x4d",
            "imagenet",
            "PSPNet, ResNeXt50-32x4d encoder, ImageNet transfer",
            0.9064,
        ),
        ModelSpec(
            "unet-effb7",
            "Unet",
            "efficientnet-b7",
            "imagenet",
            "UNet, EfficientNet-B7 encoder, ImageNet transfer",
            0.9262,
        ),
    )
}


def resolve_model(name: str) -> ModelSpec:
    """A preset name, or ARCH:ENCODER for any smp architecture and encoder (random init unless weights are given)."""
    if name in PRESETS:
        return PRESETS[name]
    if ":" in name:
        import segmentation_models_pytorch as smp

        arch, encoder = name.split(":", 1)
        if arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
            raise ModelError(
                f"unknown smp architecture {arch!r}: choose one of {', '.join(smp.MODEL_ARCHITECTURES_MAPPING)}"
            )
        if not encoder.startswith("tu-") and encoder not in smp.encoders.get_encoder_names():
            raise ModelError(
                f"unknown smp encoder {encoder!r}: see segmentation_models_pytorch.encoders.get_encoder_names() (or use tu-<timm name>)"
            )
        return ModelSpec(name, arch, encoder, None, f"{arch} with {encoder} encoder")
    raise ModelError(f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}) or ARCH:ENCODER, e.g. unet:resnet34")

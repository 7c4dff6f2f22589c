"""Quantization-aware fine-tuning (QAT) with NVIDIA TensorRT Model Optimizer (`nvidia-modelopt`).

When post-training INT8 loses too much accuracy, the weights are fine-tuned with fake quantization in the
graph so that they adapt to the int8 grid:

1. `mtq.quantize` inserts modelopt's quantizers (int8, per-channel weights on the output-channel axis,
   per-tensor activations, symmetric: the TensorRT recipe) and calibrates them with max calibration on the
   very slices the post-training engine was calibrated on — QAT starts from the PTQ ranges.
2. The model is fine-tuned on the checkpoint's train split (the training loss, AdamW, cosine to zero, batch
   norm statistics frozen so that the folded graph is the one trained), ranges held fixed.
3. The float weights are exported with lggdeploy's own exporter, and the Q/DQ graph is made by the same
   quantizer as post-training INT8 (so the profile rules hold by construction); the range of every
   convolution input is the one QAT trained with (`conv_input_ranges` maps modelopt's quantizers to ONNX
   tensors by their weights), the other tensors are calibrated on the same slices.

modelopt's own ONNX export is not used: its legacy-exporter path cannot export smp's PSPNet pyramid
pooling at 256 px (bins 3 and 6 of a 32-px map) and the dynamo path stops on a data-dependent branch of
its quantizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lggdeploy.common.errors import LggError
from lggdeploy.engines.precision.int8 import quiet_root_logger

LIBRARY = "nvidia-modelopt"


@dataclass(frozen=True)
class QatRecipe:
    epochs: int = 2
    lr: float = 1e-3  # SGD with momentum 0.9; QAT nudges weights onto the grid, it does not retrain
    batch_size: int = 8
    weight_decay: float = 0.0
    seed: int = 0
    augment: bool = True
    # The FP32 model as teacher: loss = w * BCE(logits, teacher's probabilities) + (1 - w) * (Dice + BCE on labels).
    # QAT is there to reproduce the FP32 model on the int8 grid, not to retrain it: w = 1 keeps it closest.
    distill_weight: float = 1.0
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adamw"

    def validate(self) -> None:
        if self.epochs < 1:
            raise LggError(f"--qat-epochs must be at least 1 for quantization-aware fine-tuning, got {self.epochs}")
        if not self.lr > 0:
            raise LggError(f"--qat-lr must be positive, got {self.lr}")
        if not 0 <= self.distill_weight <= 1:
            raise LggError(f"QAT distillation weight must lie between 0 and 1, got {self.distill_weight}")
        if self.batch_size < 2:
            raise LggError(f"QAT batch size must be at least 2 (batch norm), got {self.batch_size}")

    def key(self, checkpoint_sha256: str, calibration_ids: list[str]) -> str:
        blob = json.dumps(
            {"checkpoint": checkpoint_sha256, "recipe": asdict(self), "calibration": calibration_ids}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def modelopt_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("nvidia-modelopt")
    except Exception:
        return None


def _mtq():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        raise LggError(
            "quantization-aware fine-tuning needs NVIDIA TensorRT Model Optimizer: pip install 'lggdeploy[qat]' "
            "(nvidia-modelopt), or pass --qat-epochs 0 to keep post-training INT8 only"
        ) from None
    return mtq


@contextlib.contextmanager
def _quiet_modelopt():
    """modelopt prints a line per call, logs on the root logger and warns about absent CUDA and transformers: keep the
    user's screen clean for this call only (the root logger through int8's helper, as for ONNX Runtime's quantizer)."""

    with quiet_root_logger(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def quantize_for_training(model, calibration_batches: list):
    """modelopt's INT8 recipe on `model`, ranges calibrated (max) on `calibration_batches`; in place."""
    import torch

    with _quiet_modelopt():
        mtq = _mtq()

        def forward_loop(m):
            with torch.no_grad():
                for x in calibration_batches:
                    m(x)

        return mtq.quantize(model.eval(), mtq.INT8_DEFAULT_CFG, forward_loop)


def _freeze_batch_norm(model) -> None:
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def finetune(
    model, images: np.ndarray, masks: np.ndarray, normalization, recipe: QatRecipe, on_step=None, teacher=None
) -> list[dict]:
    """QAT epochs on resized uint8 train slices, distilled from `teacher` (the FP32 model) when given;
    returns one {epoch, loss, seconds} row per epoch."""
    import torch
    import torch.nn.functional as F

    from lggdeploy.data.transforms import Augmentation
    from lggdeploy.models.train import dice_bce_loss

    n = len(images)
    steps = n // recipe.batch_size + (1 if n % recipe.batch_size >= 2 else 0)
    if steps < 1:
        raise LggError(f"{n} training slices are too few for a QAT batch of {recipe.batch_size}")
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":  # steps in proportion to the gradient: near the teacher, small gradients move little
        optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)
    else:  # Adam moves every weight by about lr per step whatever the gradient: noise once the loss is small
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    total = recipe.epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    augment = Augmentation()
    torch.manual_seed(recipe.seed)  # dropout draws from the global generator
    history = []
    with _quiet_modelopt():
        for epoch in range(1, recipe.epochs + 1):
            started = time.perf_counter()
            model.train()
            _freeze_batch_norm(model)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed * 100_003 + epoch)).numpy()
            aug_generator = torch.Generator().manual_seed(recipe.seed * 7919 + epoch)
            losses = []
            for step in range(steps):
                idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
                x01 = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float().div_(255)
                y = torch.from_numpy(masks[idx]).unsqueeze(1).float()
                if recipe.augment:
                    x01, y = augment(x01, y, aug_generator)
                x = normalization.apply_torch(x01)
                logits = model(x)
                loss = dice_bce_loss(logits, y) if recipe.distill_weight < 1 or teacher is None else 0.0
                if teacher is not None and recipe.distill_weight > 0:
                    with torch.no_grad():
                        soft = torch.sigmoid(teacher(x))
                    loss = (
                        recipe.distill_weight * F.binary_cross_entropy_with_logits(logits, soft)
                        + (1 - recipe.distill_weight) * loss
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(epoch, step + 1, steps, losses[-1])
            history.append(
                {
                    "epoch": epoch,
                    "loss": round(float(np.mean(losses)), 5),
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
    return history


def conv_amax(quantized) -> dict[str, float]:
    """{module name: the input range (amax) QAT trained with} for every quantized 2-D convolution."""
    import torch

    ranges = {}
    for name, module in quantized.named_modules():
        quantizer = getattr(module, "input_quantizer", None)
        weight = getattr(module, "weight", None)
        if (
            quantizer is None
            or weight is None
            or weight.dim() != 4
            or not quantizer.is_enabled
            or quantizer.amax is None
        ):
            continue
        ranges[name] = float(torch.as_tensor(quantizer.amax).max())
    return ranges


def strip_quantizers(quantized, float_model):
    """The fine-tuned float weights in a plain copy of the network (what lggdeploy's exporter takes)."""
    state = {k: v for k, v in quantized.state_dict().items() if "_quantizer" not in k}
    float_model.load_state_dict(state)
    return float_model.eval()


def _unit_rows(weight: np.ndarray) -> np.ndarray:
    rows = weight.reshape(weight.shape[0], -1).astype(np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def conv_input_ranges(
    onnx_path: Path, model, amax: dict[str, float], min_similarity: float = 0.999
) -> dict[str, float]:
    """{ONNX tensor feeding a Conv: the amax QAT trained with}. Each ONNX Conv is matched to the fine-tuned
    convolution whose weight rows point the same way (batch-norm folding only rescales output channels)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: i for i in graph.initializer}
    candidates: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for name in amax:
        weight = model.get_submodule(name).weight.detach().float().numpy()
        candidates.setdefault(weight.shape, []).append((name, _unit_rows(weight)))
    ranges: dict[str, float] = {}
    unmatched = []
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        rows = _unit_rows(weight)
        best, best_similarity = None, -1.0
        for name, torch_rows in candidates.get(weight.shape, []):
            similarity = float(np.min(np.abs(np.sum(torch_rows * rows, axis=1))))
            if similarity > best_similarity:
                best, best_similarity = name, similarity
        if best is None or best_similarity < min_similarity:
            unmatched.append(node.name)
            continue
        ranges[node.input[0]] = max(ranges.get(node.input[0], 0.0), amax[best])
    # modelopt quantizes the convolutions it knows (nn.Conv2d itself, not e.g. efficientnet-pytorch's
    # Conv2dStaticSamePadding: 11 of unet-effb7's 283), so convolutions without a QAT range keep the range ONNX Runtime
    # calibrates for them. Only an export that matches none of the fine-tuned layers is a different model.
    if amax and not ranges:
        raise LggError(
            f"QAT: none of the {len(unmatched)} ONNX convolutions matches a fine-tuned layer (e.g. {unmatched[0]}); the export and the QAT model differ"
        )
    return ranges


def override_cache(source: Path, target: Path, ranges: dict[str, float], symmetric: bool) -> int:
    """Copy ONNX Runtime's calibration cache `source` to `target` with the QAT ranges in place; returns how many
    tensors took a QAT range. Symmetric profiles get [-amax, amax]; asymmetric keep the calibrated lower end."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, load_tensors_data, save_tensors_data

    calibrated = load_tensors_data(source)
    data = dict(calibrated.data)
    changed = 0
    for tensor, amax in ranges.items():
        if tensor not in data:
            continue
        low = -amax if symmetric else max(float(np.min(data[tensor].range_value[0])), -amax)
        data[tensor] = TensorData(lowest=np.array(low, np.float32), highest=np.array(amax, np.float32))
        changed += 1
    save_tensors_data(TensorsData(calibrated.calibration_method, data), target)  # written to a temporary, then renamed
    return changed

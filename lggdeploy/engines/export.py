"""ONNX export with a parity gate against PyTorch on real slices.

The dynamo exporter is used (smp 0.6's PSPNet exports at 256x256 only through it: the legacy exporter
fails on the 1/2/3/6 pyramid pooling; its uneven levels are exported through `exportable.BinAveragePool2d`), with a dynamic batch dimension, named input/output and the
weights inside the single .onnx file (ONNX Runtime's quantization pre-processing rejects external data).
A parity failure raises and leaves no artifact.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lggdeploy.backends import onnxruntime as ort_backend
from lggdeploy.common.errors import EngineError
from lggdeploy.common.files import atomic_path, ensure_folder, sha256_file, write_json_atomic
from lggdeploy.data.arrays import load_slices, pick_slices
from lggdeploy.data.kaggle import load_dataset, resolve_data_root
from lggdeploy.models.torch_runner import TorchRunner
from lggdeploy.postprocess import PostProcess

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 18
# The graph's form, recorded in every export: 1 the exporter's own graph; 2 smp's pyramid pooling exported as bin
# means (engines/exportable.py). Builds and optimize runs redo an export of another form instead of reusing it.
EXPORT_GRAPH = 2


@dataclass
class Parity:
    max_abs_diff: float
    mask_agreement: float
    slices: int
    passed: bool

    def to_json(self) -> dict:
        return {
            "max_abs_logit_diff": self.max_abs_diff,
            "mask_agreement": self.mask_agreement,
            "slices": self.slices,
            "passed": self.passed,
        }


def engine_tag(ckpt: dict, checkpoint_sha256: str) -> str:
    """A folder name per checkpoint: preset plus a short hash, so two trainings never collide."""
    return f"{ckpt['model']['name'].replace(':', '-')}-{checkpoint_sha256[:8]}"


def check_parity(
    reference: np.ndarray, candidate: np.ndarray, atol: float = 1e-3, rtol: float = 1e-3, min_agreement: float = 0.9999
) -> Parity:
    diff = float(np.max(np.abs(reference - candidate)))
    agreement = float(np.mean((reference > 0) == (candidate > 0)))
    passed = diff <= atol + rtol * float(np.max(np.abs(reference))) and agreement >= min_agreement
    return Parity(diff, agreement, len(reference), passed)


def export_onnx(model, path: str | os.PathLike, img_size: int, opset: int = OPSET) -> Path:
    """Write `model` to a single-file ONNX with a dynamic batch dimension (atomically)."""
    import onnx
    import torch

    from lggdeploy.engines.exportable import for_export

    model = for_export(model.eval())
    example = torch.zeros(2, 3, img_size, img_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates its steps on stdout
                program = torch.onnx.export(
                    model,
                    (example,),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: batch},),
                    opset_version=opset,
                    external_data=False,
                    verbose=False,
                )
            program.save(str(raw), external_data=False)
        except Exception as exc:
            raise EngineError(
                f"ONNX export failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})"
            ) from None
        proto = onnx.load(str(raw))
        onnx.checker.check_model(proto, full_check=True)
        with atomic_path(path) as out:
            onnx.save_model(proto, str(out))
    return Path(path)


def parity_slices(ckpt: dict, data: str | os.PathLike | None, count: int = 16) -> np.ndarray:
    """Real slices for the parity check: spread over every val patient of the checkpoint's split, tumor and tumor-free."""
    from lggdeploy.models.checkpoint import split_of

    dataset = load_dataset(resolve_data_root(data, ckpt.get("data_root"), "the export's parity check"))
    split = split_of(ckpt)
    split.check_against(dataset, origin=str(ckpt.get("path")))
    return pick_slices(load_slices(dataset, split.val or split.test), count).images


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike = "engines",
    data: str | os.PathLike | None = None,
    opset: int = OPSET,
    model_override=None,
) -> tuple[Path, dict]:
    """Export a checkpoint to `<out_dir>/<tag>/model.onnx` and its record; refuse (no file) on a parity failure.

    `model_override` replaces the checkpoint's model for the parity reference (tests use it to prove the gate).
    """
    from lggdeploy.data.transforms import preprocess
    from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of

    ensure_folder(out_dir)  # an unwritable output folder is refused before the export work
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    images = parity_slices(ckpt, data)
    x = preprocess(images, ckpt["img_size"], normalization_of(ckpt))
    checkpoint_sha256 = sha256_file(checkpoint)  # hashed once: names the folder and goes in the record
    folder = Path(out_dir) / engine_tag(ckpt, checkpoint_sha256)
    target = folder / "model.onnx"
    created_folder = not folder.exists()
    ensure_folder(folder)
    try:
        with atomic_path(target) as candidate:  # renamed onto model.onnx only if parity passes
            export_onnx(model, candidate, ckpt["img_size"], opset)
            runner = ort_backend.load(candidate)
            onnx_out = np.concatenate([runner.infer(x[i : i + 8]) for i in range(0, len(x), 8)])
            runner.close()
            reference = TorchRunner(model_override if model_override is not None else model)
            torch_out = np.concatenate([reference.infer(x[i : i + 8]) for i in range(0, len(x), 8)])
            parity = check_parity(torch_out, onnx_out)
            if not parity.passed:
                raise EngineError(
                    f"parity check failed for {checkpoint}: ONNX Runtime differs from PyTorch by up to {parity.max_abs_diff:.3g} in logits, "
                    f"masks agree on {parity.mask_agreement:.4%} of pixels; no ONNX file was written"
                )
    except BaseException:
        if created_folder and not any(folder.iterdir()):
            folder.rmdir()
        raise
    record = export_record(checkpoint, checkpoint_sha256, ckpt, target, opset, parity)
    write_json_atomic(target.with_suffix(".onnx.json"), record)
    return target, record


def graph_opset(path: Path) -> int:
    """The default-domain opset an ONNX file imports."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def export_record(checkpoint, checkpoint_sha256: str, ckpt: dict, onnx_path: Path, opset: int, parity: Parity) -> dict:
    import onnx
    import torch

    return {
        "format": "lggdeploy-export",
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": checkpoint_sha256,
        "model": ckpt["model"],
        "onnx": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "opset": graph_opset(onnx_path),  # what the file holds (the exporter may convert what was asked)
        "opset_requested": opset,
        "export_graph": EXPORT_GRAPH,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, ckpt["img_size"], ckpt["img_size"]], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", 1, ckpt["img_size"], ckpt["img_size"]], "dtype": "float32"},
        "img_size": ckpt["img_size"],
        "normalization": ckpt["normalization"],
        "threshold": ckpt["threshold"],
        "postprocess": PostProcess.from_json(ckpt.get("postprocess")).to_json(),
        "split": ckpt["split"],
        "data_root": ckpt.get("data_root"),
        "parity": parity.to_json(),
        "torch_version": str(torch.__version__),
        "onnx_version": onnx.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }

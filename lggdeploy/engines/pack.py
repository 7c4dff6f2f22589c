"""`lggdeploy pack`: one self-contained, versioned bundle per model for an edge scanner.

    bundle.json         what is inside: model, checkpoint sha256, engines, ONNX graphs, calibration, verification set
    SHA256SUMS          sha256 of every other file (`sha256sum -c` works on it)
    signature.json      with `--sign KEY`: the Ed25519 signature of SHA256SUMS and the signer's key id
    README.md           for the device: verify, build a TensorRT plan there (lggdeploy or trtexec)
    engines/            the engines and their manifests
    onnx/               model.onnx (FP32, + its export record) and the plain Q/DQ INT8 graph when one was packed:
                        what a device builds its own TensorRT plan from
    calibration/        the INT8 calibration caches (ranges) the engines were built with
    verification.npz    K val slices (tumor and tumor-free, every val patient), their ground truth and the FP32
                        model's logits and masks: `lggdeploy verify` checks an engine on the device against them

Written to a temporary file and renamed: a killed pack leaves no half bundle.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np

from lggdeploy import __version__
from lggdeploy.common.errors import LggError
from lggdeploy.common.files import atomic_path, check_writable, remove_stale_temporaries, sha256_file, temporary_folder
from lggdeploy.data.arrays import SliceArrays, load_slices, pick_slices
from lggdeploy.data.kaggle import load_dataset, resolve_data_root
from lggdeploy.data.split import Split
from lggdeploy.engines.formats import manifest_path, read_manifest, verify_engine
from lggdeploy.engines.precision.criteria import DEFAULT_CRITERIA
from lggdeploy.models.torch_runner import TorchRunner
from lggdeploy.postprocess import PostProcess

BUNDLE_FORMAT = "lggdeploy-bundle"
DEFAULT_SAMPLES = 16  # about 2 MB of verification data: small enough to ship, one or more slices per val patient


def _reference(ckpt: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The FP32 PyTorch model's logits (model resolution) and masks (native 256) on `images`."""
    from lggdeploy.data.transforms import logits_to_masks
    from lggdeploy.models.checkpoint import model_from_checkpoint, normalization_of
    from lggdeploy.scoring import infer_batches

    runner = TorchRunner(model_from_checkpoint(ckpt))
    batches = infer_batches(runner, images, ckpt["img_size"], normalization_of(ckpt), batch_size=8)
    logits = np.concatenate([out for _, out in batches])
    return logits, logits_to_masks(logits, threshold=ckpt["threshold"])


def pack(
    engines: list[str | os.PathLike],
    out: str | os.PathLike,
    samples: int = DEFAULT_SAMPLES,
    data: str | os.PathLike | None = None,
    sign: str | os.PathLike | None = None,
    samples_from: str | os.PathLike | None = None,
) -> Path:
    """One bundle of one model's engines (see the module's docstring), written atomically to `out`; with `sign` (a
    private key from `lggdeploy keygen`) its SHA256SUMS is signed (signature.json), so a device can tell who made it."""
    from lggdeploy.common import signing

    if not engines:
        raise LggError("give at least one engine to pack")
    if samples < 1:
        raise LggError(f"--samples must be at least 1, got {samples}")
    out = check_writable(out)
    remove_stale_temporaries(out.parent)  # what a killed pack (SIGKILL) left: its scratch folder and half a bundle
    private_key = signing.load_private_key(sign) if sign is not None else None  # a bad key: refused before the work
    engines = [Path(e) for e in dict.fromkeys(Path(e) for e in engines)]  # an engine given twice is packed once
    manifests = _checked_manifests(engines)
    first, folder = manifests[0], engines[0].parent
    ckpt = _source_checkpoint(first, folder)
    if samples_from is not None:
        chosen, logits, masks, source = _scanner_verification_set(ckpt, samples, Path(samples_from))
    else:
        chosen, logits, masks = _verification_set(ckpt, first, engines[0], samples, data)
        source = None
    with temporary_folder(out.parent, prefix="pack") as tmp:
        root = Path(tmp) / "bundle"
        for sub in ("engines", "onnx", "calibration"):
            (root / sub).mkdir(parents=True)
        entries = [_add_engine(root, engine, manifest) for engine, manifest in zip(engines, manifests)]
        shutil.copyfile(folder / "model.onnx", root / "onnx" / "model.onnx")
        shutil.copyfile(folder / "model.onnx.json", root / "onnx" / "model.onnx.json")
        _write_verification(root / "verification.npz", chosen, logits, masks)
        description = _description(root, first, entries, chosen, source)
        (root / "bundle.json").write_text(json.dumps(description, indent=2) + "\n")
        (root / "README.md").write_text(device_readme(description, first))
        sums = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}" for p in sorted(root.rglob("*")) if p.is_file()]
        (root / "SHA256SUMS").write_text("\n".join(sums) + "\n")
        if private_key is not None:
            record = signing.sign((root / "SHA256SUMS").read_bytes(), private_key)
            (root / signing.SIGNATURE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        with atomic_path(out) as target, tarfile.open(target, "w:gz") as tar:
            for path in sorted(root.rglob("*")):
                tar.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)
    return out


def _write_verification(path: Path, chosen, logits: np.ndarray, masks: np.ndarray) -> None:
    """verification.npz: the slices, their truth, the FP32 model's logits (float16) and masks; masks bit-packed."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        images=chosen.images,
        truth=np.packbits(chosen.masks, axis=-1),
        fp32_logits=logits.astype(np.float16),
        fp32_masks=np.packbits(masks, axis=-1),
        patients=chosen.patients.astype(str),
        numbers=chosen.numbers,
    )
    path.write_bytes(buffer.getvalue())


def _checked_manifests(engines: list[Path]) -> list:
    """Each engine's manifest, the file checked against it; all of one checkpoint (a bundle holds one model)."""
    manifests = [read_manifest(e) for e in engines]
    for engine, manifest in zip(engines, manifests):
        verify_engine(engine, manifest)
    models = {m["checkpoint_sha256"] for m in manifests}
    if len(models) > 1:
        raise LggError(
            f"the engines come from {len(models)} different checkpoints: a bundle holds one model; "
            "pack each model's engines separately"
        )
    return manifests


def _source_checkpoint(first, folder: Path) -> dict:
    """The checkpoint the engines were built from (for the FP32 reference outputs), and its export beside them."""
    from lggdeploy.models.checkpoint import load_checkpoint

    checkpoint = Path(first["checkpoint"])
    if not checkpoint.is_file() or sha256_file(checkpoint) != first["checkpoint_sha256"]:
        raise LggError(
            f"the checkpoint the engines were built from ({checkpoint}, sha256 {first['checkpoint_sha256'][:12]}…) "
            "is not here: pack needs it for the FP32 reference outputs"
        )
    if not (folder / "model.onnx").is_file() or not (folder / "model.onnx.json").is_file():
        raise LggError(f"{folder} lacks model.onnx and its record: rebuild the engines with `lggdeploy build`")
    return load_checkpoint(checkpoint)


def _verification_set(ckpt: dict, first, engine: Path, samples: int, data):
    """`samples` val slices spread over the val patients, with the FP32 model's logits and masks on them."""

    split = Split.from_json(first["split"], origin=f"{engine} manifest")
    root = resolve_data_root(
        data, first.get("data_root") or ckpt.get("data_root"), "the verification set (val patients)"
    )
    chosen = pick_slices(load_slices(load_dataset(root), split.val), samples)
    logits, masks = _reference(ckpt, chosen.images)
    return chosen, logits, masks


def _scanner_verification_set(ckpt: dict, samples: int, source: Path):
    """`samples` slices of scanner patients (DICOM series or NIfTI volumes, read and mapped to 8 bits as predict does),
    spread over the cases and over the slices where the FP32 model finds tumor and where it does not; such series carry
    no labels, so the set's truth is empty and bundle.json says so. Returns the slices, the FP32 model's logits and
    masks on them, and the record of where they came from."""
    from lggdeploy.scanner.case import model_input, plan

    cases = plan(source)
    images, patients, numbers, mapping = [], [], [], {}
    for case in cases:
        x, ranges, _ = model_input(case, resample=False, intensity="auto")
        images.append(x)
        patients += [case.name] * len(x)
        numbers += list(range(1, len(x) + 1))
        mapping[case.name] = {role: r.to_json() for role, r in ranges.items()}
    images = np.concatenate(images)
    all_logits, found = _reference(ckpt, images)
    pool = SliceArrays(images, found, np.array(patients), np.array(numbers))
    picked = pick_slices(pool, samples)  # by the FP32 model's masks: tumor and tumor-free slices, every case
    where = {key: i for i, key in enumerate(zip(pool.patients.tolist(), pool.numbers.tolist()))}
    rows = [where[key] for key in zip(picked.patients.tolist(), picked.numbers.tolist())]
    chosen = SliceArrays(picked.images, np.zeros_like(picked.masks), picked.patients, picked.numbers)
    logits, masks = all_logits[rows], found[rows]
    record = {
        "source": f"scanner series ({'NIfTI' if cases[0].flair.origin == 'nifti' else 'DICOM'}): {len(cases)} case(s)",
        "truth": "none: scanner series carry no labels; slices picked by the FP32 model's masks",
        "intensity": mapping,
    }
    return chosen, logits, masks, record


def _add_engine(root: Path, engine: Path, manifest) -> dict:
    """Copy an engine, its manifest, its portable Q/DQ twin and calibration cache into the bundle; its entry."""
    folder = engine.parent
    shutil.copyfile(engine, root / "engines" / engine.name)
    shutil.copyfile(manifest_path(engine), root / "engines" / manifest_path(engine).name)
    gate_keys = ("passed", "criteria", "min_agreement", "drop_points")
    entry = {
        "file": f"engines/{engine.name}",
        "manifest": f"engines/{manifest_path(engine).name}",
        "backend": manifest["backend"],
        "precision": manifest["precision"],
        "int8_profile": manifest.get("int8_profile"),
        "gate": {k: manifest["gate"].get(k) for k in gate_keys},
    }
    twin = manifest.get("portable_qdq") or {}
    if twin.get("file") and twin["file"] != engine.name:  # the plain Q/DQ twin of a runtime-optimized INT8 engine
        source = folder / twin["file"]
        if not source.is_file() or sha256_file(source) != twin.get("sha256"):
            raise LggError(
                f"{source}: the portable Q/DQ twin that {manifest_path(engine).name} names is missing or altered; "
                "rebuild the engine"
            )
        shutil.copyfile(source, root / "onnx" / twin["file"])
        entry["portable_qdq"] = f"onnx/{twin['file']}"
    cache = (manifest.get("calibration") or {}).get("cache")
    if cache and (folder / cache).is_file():
        shutil.copyfile(folder / cache, root / "calibration" / Path(cache).name)
    plain_qdq = (manifest["backend"], manifest["precision"], manifest.get("int8_profile")) == (
        "onnxruntime",
        "int8",
        "tensorrt",
    )
    if plain_qdq:  # the engine is itself the plain Q/DQ graph: what TensorRT's parser takes
        shutil.copyfile(engine, root / "onnx" / "model-int8-qdq.onnx")
    return entry


def _description(root: Path, first, entries: list[dict], chosen, source: dict | None = None) -> dict:
    """bundle.json: what is inside and how the device judges an engine."""
    criteria = first["gate"].get("criteria") or {}
    return {
        "format": BUNDLE_FORMAT,
        "version": 1,
        "lggdeploy_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": first["model"],
        "checkpoint_sha256": first["checkpoint_sha256"],
        "onnx_sha256": first["onnx_sha256"],
        "img_size": first["img_size"],
        "normalization": first["normalization"],
        "threshold": first["threshold"],
        "postprocess": PostProcess.from_json(first.get("postprocess")).to_json(),
        "engines": entries,
        "onnx": sorted(f"onnx/{p.name}" for p in (root / "onnx").iterdir()),
        "calibration": sorted(f"calibration/{p.name}" for p in (root / "calibration").iterdir()),
        "verification": {
            "file": "verification.npz",
            "slices": len(chosen),
            "tumor_slices": int(chosen.tumor_slices().sum()),
            "patients": chosen.patient_ids,
            "checkpoint_sha256": first["checkpoint_sha256"],
            "min_agreement": criteria.get("min_agreement", DEFAULT_CRITERIA.min_agreement),
            "criterion": "every verification patient: Dice of the engine's masks against the FP32 model's masks "
            ">= min_agreement",
            **(source or {"source": "val patients (kaggle_3m TIFFs)", "truth": "the val patients' masks"}),
        },
    }


def device_readme(description: dict, manifest: dict) -> str:
    """Commands for the device: verify what is here, build a plan on this GPU, verify the plan."""
    size = description["img_size"]
    batch = manifest.get("batch_profile") or [1, 8, 32]
    shapes = f"--minShapes=input:{batch[0]}x3x{size}x{size} --optShapes=input:{batch[1]}x3x{size}x{size} --maxShapes=input:{batch[2]}x3x{size}x{size}"
    qdq = "onnx/model-int8-qdq.onnx" if "onnx/model-int8-qdq.onnx" in description["onnx"] else None
    lines = [
        f"# {description['model']['name']} — lggdeploy bundle",
        "",
        f"Model checkpoint sha256 `{description['checkpoint_sha256']}`, input {size}×{size}×3 uint8 slices (pre-contrast, FLAIR,",
        "post-contrast), normalization and threshold in `bundle.json`. Every file is listed in `SHA256SUMS`.",
        "",
        "## 1. Check that this device runs the model as validated",
        "",
        "```bash",
        "pip install lggdeploy            # the torch-free runtime",
        "lggdeploy verify scanner-bundle.tar.gz                       # checksums + the packed engine on this device",
        "```",
        "",
        "In a scanner's start-up: `Segmenter.verify('scanner-bundle.tar.gz')` raises when the engine disagrees with the FP32 model.",
        "",
        "## 2. Build a TensorRT plan on this GPU (plans are specific to the GPU and TensorRT version)",
        "",
        "With lggdeploy (TensorRT 10 or 11 and cuda-python installed: `pip install 'lggdeploy[tensorrt]'`), from the graphs here.",
        "Each plan is built, then run on the verification set and written only if it agrees with the validated model (the",
        "device's accuracy gate); its manifest records the bundle, the graph and the verification result:",
        "",
        "```bash",
    ]
    fp16 = next(
        (e["file"] for e in description["engines"] if e["precision"] == "fp16" and e["backend"] == "onnxruntime"), None
    )
    for precision, present in (("fp32", True), ("fp16", fp16), ("int8", qdq)):
        if present:
            lines.append(
                f"lggdeploy build scanner-bundle.tar.gz --backend tensorrt --precision {precision} --min-batch {batch[0]} --opt-batch {batch[1]} --max-batch {batch[2]} -o engines"
            )
    lines += [
        "lggdeploy verify scanner-bundle.tar.gz --engine engines/<model>-<sha8>/tensorrt-fp32.plan   # again, any time later",
        "```",
        "",
        "Without Python, the same plans with `trtexec` (then `lggdeploy verify` cannot read them: they lack a manifest):",
        "",
        "```bash",
        f"trtexec --onnx=onnx/model.onnx --stronglyTyped {shapes} --memPoolSize=workspace:4096M --builderOptimizationLevel=3 --timingCacheFile=tensorrt.timing-cache --saveEngine=tensorrt-fp32.plan",
    ]
    if fp16:
        lines.append(
            f"trtexec --onnx={fp16} --stronglyTyped {shapes} --memPoolSize=workspace:4096M --builderOptimizationLevel=3 --timingCacheFile=tensorrt.timing-cache --saveEngine=tensorrt-fp16.plan"
        )
    if qdq:
        lines.append(
            f"trtexec --onnx={qdq} --stronglyTyped {shapes} --memPoolSize=workspace:4096M --builderOptimizationLevel=3 --timingCacheFile=tensorrt.timing-cache --saveEngine=tensorrt-int8-tensorrt.plan"
        )
    lines += [
        "```",
        "",
        "These are the flags lggdeploy's own TensorRT builder sets: a strongly typed network (precision comes from the graph:",
        "Q/DQ nodes for INT8), one optimization profile for the batch, a 4 GiB workspace, builder optimization level 3, a",
        "timing cache (the FP16 graph is typed: FP16 weights and compute, FP32 inputs and outputs — what TensorRT 11's",
        "strongly typed networks take). lggdeploy loads an engine only with its manifest beside it (`PLAN.json`: backend,",
        "precision, TensorRT version, GPU, sha256), which `lggdeploy build` from this bundle writes.",
        "",
    ]
    return "\n".join(lines)

"""Reading a bundle from `lggdeploy pack` and checking an engine against its verification set. Torch-free.

`opened_bundle` extracts it and checks every checksum; `check_engine` runs an open Segmenter (or anything with
its runner / normalization / threshold / manifest / path) on the verification set and applies the build-time gate's
agreement criterion: every verification patient's Dice of the engine's masks against the FP32 model's masks, and
the overall one, must reach the bundle's `min_agreement`. Logit SQNR and Dice against the ground truth are
reported beside it. (`runtime/verify.py` opens the engine; `Segmenter.verify` uses this module directly.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lggdeploy.common.errors import EngineError
from lggdeploy.data.arrays import SliceArrays
from lggdeploy.engines.formats import format_of, read_manifest
from lggdeploy.engines.precision.gate import GateCriteria, Outputs, Reference, run_on_slices, sqnr_db

BUNDLE_FORMAT = "lggdeploy-bundle"


class BundleError(EngineError):
    """The bundle is incomplete, altered, or not the one for this engine."""


@dataclass
class VerifyReport:
    bundle: Path
    engine: str
    passed: bool
    min_agreement: float
    per_patient: list[dict] = field(default_factory=list)
    per_slice_agreement: list[float] = field(default_factory=list)
    overall_agreement: float = 0.0
    logit_sqnr_db: float = 0.0
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**self.__dict__, "bundle": str(self.bundle)}


def _extract(bundle: Path, into: Path) -> Path:
    if not bundle.is_file():
        raise BundleError(f"bundle {bundle} does not exist: make one with `lggdeploy pack ENGINE... -o {bundle.name}`")
    try:
        with tarfile.open(bundle, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                if (
                    member.name.startswith(("/", ".."))
                    or ".." in Path(member.name).parts
                    or not (member.isfile() or member.isdir())
                ):
                    raise BundleError(f"{bundle}: unsafe entry {member.name!r}; this is not a bundle lggdeploy wrote")
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(
            f"{bundle}: not a readable bundle ({exc}); it was truncated or is not a .tar.gz from `lggdeploy pack`"
        ) from None
    return into


def check_checksums(root: Path, origin: Path) -> dict:
    """Every file listed in SHA256SUMS is there with its sha256, and nothing else is there; returns bundle.json."""
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        raise BundleError(f"{origin}: SHA256SUMS is missing; the bundle is incomplete: pack it again")
    listed = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
    if missing:
        raise BundleError(
            f"{origin}: {missing[0]} is listed in SHA256SUMS but missing{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; the bundle is incomplete"
        )
    if extra:
        raise BundleError(f"{origin}: {extra[0]} is not listed in SHA256SUMS; the bundle was altered after packing")
    for name, digest in listed.items():
        actual = hashlib.sha256((root / name).read_bytes()).hexdigest()
        if actual != digest:
            raise BundleError(
                f"{origin}: {name} does not match its checksum (sha256 {actual[:12]}…, SHA256SUMS says {digest[:12]}…); the file was altered or damaged"
            )
    try:
        description = json.loads((root / "bundle.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{origin}: bundle.json is unreadable ({exc})") from None
    if description.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{origin}: not an lggdeploy bundle (bundle.json format {description.get('format')!r})")
    return description


def choose_engine(root: Path, description: dict, origin: Path) -> Path:

    for entry in description["engines"]:
        path = root / entry["file"]
        if format_of(read_manifest(path), path).available()[0]:
            return path
    raise BundleError(
        f"{origin}: none of its engines has a backend usable on this device ({', '.join(e['file'] for e in description['engines'])}); run `lggdeploy doctor`"
    )


@contextlib.contextmanager
def opened_bundle(bundle: str | Path):
    """(extracted folder, bundle.json) of a bundle whose every checksum holds; the folder lives for the `with`."""
    bundle = Path(bundle)
    with tempfile.TemporaryDirectory(prefix="lggdeploy-verify-") as tmp:
        root = _extract(bundle, Path(tmp))
        yield root, check_checksums(root, bundle)


def check_engine(
    segmenter, root: Path, description: dict, origin: Path, min_agreement: float | None = None
) -> VerifyReport:
    """Run an open Segmenter on the verification set and judge it by agreement with the FP32 model's masks."""

    chosen = Path(segmenter.path)
    if segmenter.manifest.get("checkpoint_sha256") != description["verification"]["checkpoint_sha256"]:
        raise BundleError(
            f"{chosen} was built from checkpoint {str(segmenter.manifest.get('checkpoint_sha256'))[:12]}…, the verification set of {origin} "
            f"from {description['verification']['checkpoint_sha256'][:12]}…: they are different models"
        )
    data = np.load(root / description["verification"]["file"])
    slices = SliceArrays(
        data["images"], np.unpackbits(data["truth"], axis=-1)[..., :256].astype(bool), data["patients"], data["numbers"]
    )
    reference_masks = np.unpackbits(data["fp32_masks"], axis=-1)[..., :256].astype(bool)
    reference = Reference(
        Outputs(data["fp32_logits"][:, 0].astype(np.float32), reference_masks), slices, GateCriteria(min_agreement=0.0)
    )
    threshold = min_agreement if min_agreement is not None else float(description["verification"]["min_agreement"])
    outputs = run_on_slices(
        segmenter.runner,
        slices,
        description["img_size"],
        segmenter.normalization,
        segmenter.threshold,
        f"verify {chosen.name}",
    )
    if outputs.logits.shape[1:] != reference.outputs.logits.shape[1:]:
        raise BundleError(
            f"{chosen} produces {outputs.logits.shape[1:]} logits, the verification set holds {reference.outputs.logits.shape[1:]}: another model"
        )
    result = reference.judge(outputs)
    inter = (outputs.masks & reference_masks).reshape(len(slices), -1).sum(axis=1)
    total = outputs.masks.reshape(len(slices), -1).sum(axis=1) + reference_masks.reshape(len(slices), -1).sum(axis=1)
    per_slice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    overall = float(2 * inter.sum() / total.sum()) if total.sum() else 1.0
    failures = [
        f"patient {r['patient']}: agreement {r['agreement']:.4f} < {threshold}"
        for r in result.per_patient
        if r["agreement"] < threshold
    ]
    if overall < threshold:
        failures.append(f"overall agreement {overall:.4f} < {threshold}")
    return VerifyReport(
        origin,
        str(chosen),
        not failures,
        threshold,
        result.per_patient,
        [float(a) for a in per_slice],
        overall,
        sqnr_db(reference.outputs.logits, outputs.logits),
        failures,
    )

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
import re
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lggdeploy.common.errors import EngineError
from lggdeploy.common.signing import SIGNATURE_FILE
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
    authenticity: str = ""  # who made the bundle, as far as a trusted key proved it (OpenedBundle.authenticity)

    def to_json(self) -> dict:
        return {**self.__dict__, "bundle": str(self.bundle)}


# A bundle's largest legitimate member is an FP32 graph of the largest preset (unet-effb7: about 270 MB); anything
# declared larger, or a bundle declaring more in all, is refused from the headers, before a byte is extracted.
MAX_MEMBER_BYTES = 1 << 29  # 512 MiB
MAX_BUNDLE_BYTES = 1 << 31  # 2 GiB


def _extract(bundle: Path, into: Path) -> Path:
    if bundle.is_dir():
        raise BundleError(f"{bundle} is a folder, not a bundle: give the .tar.gz that `lggdeploy pack` wrote")
    if not bundle.is_file():
        raise BundleError(f"bundle {bundle} does not exist: make one with `lggdeploy pack ENGINE... -o {bundle.name}`")
    try:
        with tarfile.open(bundle, "r:gz") as tar:
            members = tar.getmembers()
            _check_members(bundle, members)
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(
            f"{bundle}: not a readable bundle ({exc}); it was truncated or is not a .tar.gz from `lggdeploy pack`"
        ) from None
    return into


def _check_members(bundle: Path, members: list) -> None:
    """Only plain files and folders, inside the bundle, of bounded declared sizes."""
    total = 0
    for member in members:
        unsafe = member.name.startswith(("/", "..")) or ".." in Path(member.name).parts
        if unsafe or not (member.isfile() or member.isdir()):
            raise BundleError(f"{bundle}: unsafe entry {member.name!r}; this is not a bundle lggdeploy wrote")
        if member.size > MAX_MEMBER_BYTES:
            raise BundleError(
                f"{bundle}: {member.name} declares {member.size / 2**20:.0f} MiB, more than any bundle member may hold "
                f"({MAX_MEMBER_BYTES >> 20} MiB); refused before extraction"
            )
        total += member.size
    if total > MAX_BUNDLE_BYTES:
        raise BundleError(
            f"{bundle}: its members declare {total / 2**30:.1f} GiB in all (at most {MAX_BUNDLE_BYTES >> 30} GiB); "
            "refused before extraction"
        )


def check_checksums(root: Path, origin: Path) -> dict:
    """Every file listed in SHA256SUMS is there with its sha256, and nothing else is there; returns bundle.json."""
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        raise BundleError(f"{origin}: SHA256SUMS is missing; the bundle is incomplete: pack it again")
    listed = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"SHA256SUMS", SIGNATURE_FILE}
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
    if not isinstance(description, dict) or description.get("format") != BUNDLE_FORMAT:
        found = description.get("format") if isinstance(description, dict) else type(description).__name__
        raise BundleError(f"{origin}: not an lggdeploy bundle (bundle.json format {found!r})")
    return check_description(description, root, origin)


def inside(root: Path, relative, origin: Path, what: str) -> Path:
    """A path bundle.json names, resolved inside the bundle's own folder; BundleError for anything else (absolute,
    `..`, a link out, not a string)."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        raise BundleError(f"{origin}: bundle.json's {what} {relative!r} is not a path inside the bundle; refused")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BundleError(f"{origin}: bundle.json's {what} {relative!r} points outside the bundle; refused")
    return path


def safe_name(name) -> str:
    """A name from a bundle made safe for a file or folder name (letters, digits, '.', '_', '-')."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip(".-")
    return cleaned or "model"


def check_description(description: dict, root: Path, origin: Path) -> dict:
    """bundle.json against its schema before any field is used: required keys and types, thresholds in range,
    every path inside the bundle and present."""

    def need(record: dict, key: str, kind, where: str):
        if not isinstance(record, dict) or key not in record:
            raise BundleError(f"{origin}: bundle.json lacks {where}{key!r}; the bundle is incomplete: pack it again")
        value = record[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise BundleError(
                f"{origin}: bundle.json's {where}{key!r} is {value!r}, not a {getattr(kind, '__name__', kind)}"
            )
        return value

    need(description, "model", dict, "")
    need(description["model"], "name", str, "model.")
    need(description, "checkpoint_sha256", str, "")
    need(description, "img_size", int, "")
    need(description, "normalization", dict, "")
    need(description, "threshold", (int, float), "")
    engines = need(description, "engines", list, "")
    if not engines:
        raise BundleError(f"{origin}: bundle.json lists no engines; pack at least one")
    for entry in engines:
        for key in ("file", "manifest"):
            path = inside(root, need(entry, key, str, "engines[]."), origin, f"engine {key}")
            if not path.is_file():
                raise BundleError(f"{origin}: the engine {key} {entry[key]!r} that bundle.json lists is not in it")
        if entry.get("portable_qdq") is not None:
            inside(root, entry["portable_qdq"], origin, "portable Q/DQ graph")
    verification = need(description, "verification", dict, "")
    path = inside(root, need(verification, "file", str, "verification."), origin, "verification file")
    if not path.is_file():
        raise BundleError(f"{origin}: its verification file {verification['file']!r} is missing; pack it again")
    need(verification, "checkpoint_sha256", str, "verification.")
    agreement = need(verification, "min_agreement", (int, float), "verification.")
    if not 0 < agreement <= 1:
        raise BundleError(
            f"{origin}: bundle.json's verification.min_agreement {agreement!r} is not in (0, 1]: a bundle that accepts "
            "any engine is refused"
        )
    return description


VERIFICATION_ARRAYS = ("images", "truth", "fp32_logits", "fp32_masks", "patients", "numbers")


def load_verification(root: Path, description: dict, origin: Path) -> dict:
    """The verification arrays (no pickles), checked to be what pack writes."""
    path = inside(root, description["verification"]["file"], origin, "verification file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in VERIFICATION_ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(
            f"{origin}: {description['verification']['file']} is not a verification set lggdeploy wrote ({str(exc)[:120]})"
        ) from None
    n = len(arrays["images"])
    if arrays["images"].ndim != 4 or arrays["images"].dtype != np.uint8 or any(len(a) != n for a in arrays.values()):
        raise BundleError(
            f"{origin}: {description['verification']['file']} holds arrays of unexpected shapes; pack it again"
        )
    return arrays


def usable_engines(root: Path, description: dict, origin: Path) -> list[Path]:
    """Every engine of the bundle whose backend is usable on this device (verify checks each)."""
    usable = []
    for entry in description["engines"]:
        path = inside(root, entry["file"], origin, "engine file")
        if format_of(read_manifest(path), path).available()[0]:
            usable.append(path)
    if not usable:
        files = ", ".join(e["file"] for e in description["engines"])
        raise BundleError(
            f"{origin}: none of its engines has a backend usable on this device ({files}); run `lggdeploy doctor`"
        )
    return usable


@dataclass
class OpenedBundle:
    root: Path  # the extracted folder (lives for the `with`)
    description: dict  # bundle.json, checked against its schema
    signed_by: str | None  # the trusted key's id when a signature was checked, else None (authenticity not checked)

    @property
    def authenticity(self) -> str:
        if self.signed_by:
            return f"signed by the trusted key {self.signed_by}"
        return "NOT CHECKED: no --trusted-key given; the checksums prove integrity, not who made the bundle"


@contextlib.contextmanager
def opened_bundle(bundle: str | Path, trusted_key: str | Path | None = None):
    """The extracted bundle: its signature checked against `trusted_key` first (when given: nothing else is read
    before), then every checksum, then bundle.json's schema."""
    from lggdeploy.common import signing

    bundle = Path(bundle)
    public_key = signing.load_public_key(trusted_key) if trusted_key is not None else None
    with tempfile.TemporaryDirectory(prefix="lggdeploy-verify-") as tmp:
        root = _extract(bundle, Path(tmp))
        signed_by = signing.check_signature(root, bundle, public_key) if public_key is not None else None
        yield OpenedBundle(root, check_checksums(root, bundle), signed_by)


def verification_reference(root: Path, description: dict, origin: Path) -> tuple[SliceArrays, Reference]:
    """The verification slices and the FP32 model's outputs on them, as the gate's reference."""
    data = load_verification(root, description, origin)
    truth = np.unpackbits(data["truth"], axis=-1)[..., :256].astype(bool)
    slices = SliceArrays(data["images"], truth, data["patients"], data["numbers"])
    masks = np.unpackbits(data["fp32_masks"], axis=-1)[..., :256].astype(bool)
    outputs = Outputs(data["fp32_logits"][:, 0].astype(np.float32), masks)
    return slices, Reference(outputs, slices, GateCriteria(min_agreement=0.0))


def device_threshold(description: dict, origin: Path, min_agreement: float | None) -> float:
    """The bundle's own agreement threshold (signed with it); a device may ask for a stricter one, never a looser."""
    packed = float(description["verification"]["min_agreement"])
    if min_agreement is None:
        return packed
    if min_agreement < packed:
        raise BundleError(
            f"--min-agreement {min_agreement} is looser than the {packed} {origin} was packed with: a device may only "
            "be stricter"
        )
    return float(min_agreement)


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
    slices, reference = verification_reference(root, description, origin)
    reference_masks = reference.outputs.masks
    threshold = device_threshold(description, origin, min_agreement)
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

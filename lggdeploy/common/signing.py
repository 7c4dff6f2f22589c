"""Who made a bundle: Ed25519 signatures over its SHA256SUMS (the `cryptography` package). Torch-free.

SHA256SUMS lists the sha256 of every other file of a bundle, bundle.json (and so the verification threshold) among
them; signing it signs the whole bundle. `signature.json` beside it holds the signature and the signer's key id (the
first 16 hex digits of the sha256 of the raw public key). A device that is given the trusted public key
(`verify --trusted-key`, `build BUNDLE --trusted-key`) refuses an unsigned bundle, or one signed by another key,
before it reads anything else in it. Checksums alone prove integrity against damage, not authenticity: whoever can
change a bundle can recompute them.

Ed25519 rather than Sigstore: a scanner is offline (no transparency log or OIDC identity to reach), and a key pair
that a hospital's IT holds is the trust model it already runs; the keys are standard PEM files (PKCS#8 / SPKI), so
OpenSSL reads them too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from lggdeploy.common.errors import LggError

SIGNATURE_FILE = "signature.json"
ALGORITHM = "ed25519"


class SignatureError(LggError):
    """A bundle is unsigned, signed by another key, or its signature does not match; or a key file is unusable."""


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError("signing needs the `cryptography` package: pip install cryptography") from None
    return serialization, ed25519


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def keygen(out_dir: str | os.PathLike, name: str = "lggdeploy-signing") -> tuple[Path, Path]:
    """A new key pair in `out_dir`: NAME.key (private, mode 0600) and NAME.pub; an existing key is never overwritten."""
    serialization, ed25519 = _crypto()
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise SignatureError(f"{path} already exists: keys are never overwritten; choose another folder or name")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_private(private_path, private_pem)
    tmp = public_path.with_name(f".{public_path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(public_pem)
    os.replace(tmp, public_path)
    return private_path, public_path


def _write_private(path: Path, data: bytes) -> None:
    """Created 0600 from the start (never readable by others, not even between write and chmod), then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_private_key(path: str | os.PathLike):
    serialization, ed25519 = _crypto()
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a readable private key ({exc}); make one with `lggdeploy keygen`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key; make one with `lggdeploy keygen`")
    return key


def load_public_key(path: str | os.PathLike):
    serialization, ed25519 = _crypto()
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(
            f"{path}: not a readable public key ({exc}); use the .pub from `lggdeploy keygen`"
        ) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key; use the .pub from `lggdeploy keygen`")
    return key


def sign(checksums: bytes, private_key) -> dict:
    """signature.json's content for a bundle whose SHA256SUMS holds `checksums`."""
    signature = private_key.sign(checksums)
    return {
        "algorithm": ALGORITHM,
        "signs": "SHA256SUMS",
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(signature).decode(),
    }


def check_signature(root: Path, origin: Path, public_key) -> str:
    """The bundle extracted in `root` is signed by `public_key` (its key id returned); SignatureError otherwise."""
    from cryptography.exceptions import InvalidSignature

    expected = key_id(public_key)
    record_path = root / SIGNATURE_FILE
    if not record_path.is_file():
        raise SignatureError(
            f"{origin} is not signed, and a trusted key ({expected}) was given: refused unread. "
            "Ask for a bundle made with `lggdeploy pack --sign KEY`"
        )
    try:
        record = json.loads(record_path.read_text())
        signature = base64.b64decode(record["signature"], validate=True)
        checksums = (root / "SHA256SUMS").read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{origin}: its signature record is unreadable ({exc}); refused unread") from None
    if record.get("algorithm") != ALGORITHM or record.get("key_id") != expected:
        raise SignatureError(
            f"{origin} is signed by key {record.get('key_id')!r}, not by the trusted key {expected}: refused unread"
        )
    try:
        public_key.verify(signature, checksums)
    except InvalidSignature:
        raise SignatureError(
            f"{origin}: its signature does not match its SHA256SUMS (key {expected}): the bundle was altered after "
            "signing; refused unread"
        ) from None
    return expected

"""Atomic artifact writing: a killed run never leaves a half-written file that looks finished.

Temporary files and build folders carry the writer's process id (`.<name>.<pid>.<random>.tmp`,
`.build-<pid>-<random>`), so a later run can tell the leftovers of a killed process (SIGKILL, power loss)
from the work of a live one, and remove them (`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lggdeploy.common.errors import LggError

_UMASK = os.umask(0)
os.umask(_UMASK)
STALE = re.compile(r"^\.(?:.+\.(?P<pid>\d+)\.[^.]+\.tmp|(?:build|pack)-(?P<bpid>\d+)-.+)$")


def _unwritable(path: Path, exc: OSError) -> LggError:
    reason = exc.strerror or type(exc).__name__
    return LggError(f"cannot write {path}: {reason}; choose an output path in a folder you can write to")


def ensure_folder(folder: str | os.PathLike) -> Path:
    """Create `folder` (and its parents) or fail with one clear line: a path under a file, no permission, ..."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LggError(f"cannot write into {folder}: it is a file, not a folder; choose another output path") from None
    except OSError as exc:
        raise _unwritable(folder, exc) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LggError(
            f"cannot write into {folder}: permission denied; choose an output path in a folder you can write to"
        )
    return folder


def check_can_create(folder: str | os.PathLike) -> Path:
    """Fail early when `folder` could not be created later, without creating anything now."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LggError(f"cannot write into {folder}: {existing} is a file, not a folder; choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LggError(
            f"cannot write into {folder}: permission denied on {existing}; choose an output path in a folder you can write to"
        )
    return folder


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before long work) when the file `path` could not be written later."""
    path = Path(path)
    if path.is_dir():
        raise LggError(f"cannot write {path}: it is a folder; give a file path")
    ensure_folder(path.parent)
    return path


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files and build folders in `folder` left by processes that no longer run."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = STALE.match(entry.name)
        if not match:
            continue
        pid = int(match.group("pid") or match.group("bpid"))
        if pid != os.getpid() and process_alive(pid):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def temporary_folder(parent: str | os.PathLike, prefix: str = "build") -> tempfile.TemporaryDirectory:
    """A scratch folder inside `parent` (same file system: results are renamed out of it atomically)."""
    return tempfile.TemporaryDirectory(dir=ensure_folder(parent), prefix=f".{prefix}-{os.getpid()}-")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`, on failure removed."""
    target = Path(path)
    ensure_folder(target.parent)
    if target.is_dir():
        raise LggError(f"cannot write {target}: it is a folder; give a file path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise _unwritable(target, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get ordinary permissions
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """UTF-8; a name from a file system that is not UTF-8 (a lone surrogate) is written escaped, not refused."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()

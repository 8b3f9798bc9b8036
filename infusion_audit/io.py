"""Atomic file writes, JSON lines, content hashes, recorded hashes of cached artefacts and run-directory
locks: results never half-written, caches keyed by content and checked before reuse, one writer per run."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)


_UMASK = os.umask(0)
os.umask(_UMASK)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the filesystem is full (or the user's quota spent): a run stops on it, never records it."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def _naming(exc: OSError, path: Path) -> OSError:
    """The same error with the file it was writing named (a write to a descriptor names none)."""
    return exc if exc.filename else type(exc)(exc.errno, exc.strerror, str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file beside `path` and rename it over, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results and reports are meant to be shared
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(exc, path) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a single flushed write: a crash loses at most this line."""
    append_jsonl_many(path, [record])


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read records; a torn last line (from a killed run) is ignored, a torn line elsewhere is an error."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            from .errors import DataError

            raise DataError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object, independent of key order: the cache key of what produced an artefact."""
    blob = json.dumps(obj, sort_keys=True, default=_jsonable).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


def array_hash(*arrays: np.ndarray, length: int = 16) -> str:
    """Content hash of arrays (shape, dtype and bytes)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:length]


def iter_chunks(n: int, size: int) -> Iterable[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def append_jsonl_many(path: str | os.PathLike, records: list[dict]) -> None:
    """Append several records in one write: all of them or none. A write that fails (a full disk) or comes up
    short is cut back to where the file ended, so the file holds whole lines only; a crash mid-write leaves a
    torn tail that the next run repairs (`repair_jsonl`). The caller must be the file's only writer."""
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = memoryview("".join(json.dumps(r, sort_keys=True, default=_jsonable) + "\n" for r in records).encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            while blob:  # a short write (the disk filling up) is continued until it fails outright
                blob = blob[os.write(fd, blob):]
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, end)
            raise _naming(exc, path) from exc
    finally:
        os.close(fd)


def repair_jsonl(path: str | os.PathLike) -> int:
    """Cut a torn last line left by a killed writer, so appends start on a fresh line; returns bytes cut."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as fh:
        fh.truncate(keep)
    return len(data) - keep


# --------------------------------------------------------------------------- cached artefacts
HASH_SUFFIX = ".sha256"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + HASH_SUFFIX)


def content_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (their relative names and contents, in sorted order)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        if path.is_dir():
            h.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def record_hash(path: str | os.PathLike) -> Path:
    """Record the sha256 of a cached artefact (a file or a folder) in PATH.sha256, written after the
    artefact itself: an artefact without its record was interrupted and is never trusted."""
    path = Path(path)
    return atomic_write_text(_sidecar(path), content_sha256(path) + "\n")


def verified(path: str | os.PathLike) -> bool:
    """Whether a cached artefact exists and still matches its recorded hash. A damaged or unrecorded one
    gets a warning naming it (the caller recomputes it); a missing one is simply not there."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        recorded = _sidecar(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        log.warning("%s: cached artefact has no readable recorded hash; recomputing it", path)
        return False
    if content_sha256(path) != recorded:
        log.warning("%s: cached artefact does not match its recorded hash (damaged); recomputing it", path)
        return False
    return True


# --------------------------------------------------------------------------- locks
LOCK_NAME = ".lock"


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an flock on `path`, waiting for it: processes that share a cache (bench workers fitting the same
    influence factors) take turns, so the second finds the first's verified artefact instead of rewriting it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold DIR/.lock (an flock, released by the kernel when the process dies, however it dies) while a
    run writes DIR; a second process on the same directory is refused rather than interleaving records."""
    from .errors import UserError

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise UserError(f"{directory} is in use by another infusion-audit process (pid {holder}); "
                            "wait for it or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield directory
    finally:
        os.close(fd)  # closing the only descriptor releases the lock

"""Where things live on disk, the record kept beside each verified weights file, and managing the cache.

Layout under the cache root (``MIXNET_HOME`` or the user cache directory)::

    weights/MixNet_S_pretrained.pdparams            the file exactly as downloaded, moved in only once verified
    weights/MixNet_S_pretrained.pdparams.json       its record: sha256, size, where it came from, when
    weights/MixNet_S_pretrained.pdparams.part       a download in progress (or interrupted: the next run resumes it)
    weights/MixNet_S_pretrained.pdparams.part.json  the URL and validator (ETag) that partial file came from
    weights/MixNet_S_pretrained.pdparams.lock       held by the one process downloading or installing that file
    weights/.MixNet_S_pretrained.pdparams.*.tmp     a file being copied in or a record being written

Nothing but the exact weights name is ever loaded as weights. Removing and clearing touch only these names,
so a cache root pointed at a directory that holds other files never loses them.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import files, settings
from .errors import CacheError
from .manifest import ModelSpec, load_manifest

RECORD_SUFFIX = ".json"
PARTIAL_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"


def cache_root() -> Path:
    return settings.home()


def weights_dir() -> Path:
    return cache_root() / "weights"


def weights_path(spec: ModelSpec) -> Path:
    return weights_dir() / spec.filename


def record_path(spec: ModelSpec) -> Path:
    path = weights_path(spec)
    return path.with_name(path.name + RECORD_SUFFIX)


def partial_path(spec: ModelSpec) -> Path:
    """Where a download in progress accumulates; never loaded as weights."""
    path = weights_path(spec)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def lock_path(spec: ModelSpec) -> Path:
    path = weights_path(spec)
    return path.with_name(path.name + LOCK_SUFFIX)


def temporary_path(spec: ModelSpec, what: str = "") -> Path:
    """A fresh name beside the weights, unique to this process, thread and call, for a file written then renamed."""
    return files.temporary_path(weights_path(spec), what)


def leftover_paths(spec: ModelSpec) -> list[Path]:
    """Temporary files of processes that were killed (``.incomplete``: the name older versions used)."""
    directory = weights_dir()
    if not directory.is_dir():
        return []
    name = spec.filename
    found = list(directory.glob(f".{name}.*.tmp")) + list(directory.glob(f".{name}.*.incomplete"))
    return sorted(p for p in found if p.is_file())


@dataclass(frozen=True)
class WeightsRecord:
    """What was verified about a cached weights file when it entered the cache."""

    model: str
    sha256: str
    size: int
    source: str
    fetched_at: str


def read_record(spec: ModelSpec) -> WeightsRecord | None:
    """The record of a cached file, or None when there is none or it is unreadable (treated as not cached)."""
    try:
        raw = json.loads(record_path(spec).read_text(encoding="utf-8"))
        return WeightsRecord(
            model=str(raw["model"]),
            sha256=str(raw["sha256"]),
            size=int(raw["size"]),
            source=str(raw["source"]),
            fetched_at=str(raw["fetched_at"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_record(spec: ModelSpec, record: WeightsRecord) -> None:
    """Write the record atomically (temporary file, then rename) so a reader never sees half of one."""
    files.write_text(record_path(spec), json.dumps(asdict(record), indent=2) + "\n")


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(
            f"cannot create the cache directory {path} ({exc.strerror}); "
            "set MIXNET_HOME to a writable directory"
        ) from None
    return path


sha256_of = files.file_sha256


# --- the lock ----------------------------------------------------------------------------------------------------

@contextmanager
def model_lock(spec: ModelSpec, *, wait: bool = True, on_wait: Any = None) -> Iterator[None]:
    """Hold the lock of ``spec``'s weights file: one process at a time downloads, installs or removes it.

    With ``wait=False`` a lock held elsewhere raises :class:`CacheError` at once; otherwise ``on_wait(path)`` is
    called, then this blocks until it is free. The OS drops the lock of a process that dies, so a killed run
    never leaves a stale lock.
    """
    from filelock import FileLock, Timeout

    path = lock_path(spec)
    lock = FileLock(str(path))
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise CacheError(
                    f"another mixnet process is downloading {spec.filename} (lock {path}); "
                    "try again when it has finished"
                ) from None
            if on_wait is not None:
                on_wait(path)
            lock.acquire(timeout=-1)
    except CacheError:
        raise
    except OSError as exc:
        raise CacheError(
            f"cannot lock {path} ({exc.strerror or exc}); the cache is read-only: "
            "set MIXNET_HOME to a writable directory"
        ) from None
    try:
        yield
    finally:
        lock.release()


# --- what the cache holds ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheEntry:
    """One file of the cache as ``mixnet cache list`` shows it.

    ``status`` is ``verified`` (matches its record), ``unverified`` (no record yet: checked in full on first use),
    ``corrupt`` (no longer matches its record) or ``partial`` (an interrupted download the next run resumes).
    """

    model: str
    status: str
    size: int
    sha256: str | None
    source: str | None
    fetched_at: str | None
    path: Path

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["path"] = str(self.path)
        return row


def _mtime_iso(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).replace(microsecond=0).isoformat()


def list_entries(specs: Sequence[ModelSpec] | None = None) -> list[CacheEntry]:
    """The weights files (and partial downloads) in the cache, each checked against its record."""
    from .download import read_partial_info

    entries: list[CacheEntry] = []
    for spec in specs if specs is not None else load_manifest().models.values():
        path = weights_path(spec)
        try:
            if path.is_file():
                size = path.stat().st_size
                sha256 = sha256_of(path)
                record = read_record(spec)
                if record is None:
                    status, source, when = "unverified", None, _mtime_iso(path)
                else:
                    status = "verified" if (record.size, record.sha256) == (size, sha256) else "corrupt"
                    source, when = record.source, record.fetched_at
                entries.append(CacheEntry(spec.name, status, size, sha256, source, when, path))
            partial = partial_path(spec)
            if partial.is_file():
                info = read_partial_info(partial)
                entries.append(CacheEntry(
                    spec.name, "partial", partial.stat().st_size, None, info.url if info else None,
                    _mtime_iso(partial), partial,
                ))
        except OSError as exc:
            raise CacheError(f"cannot read {path} ({exc.strerror or exc}); check the cache's permissions") from None
    return entries


def model_files(spec: ModelSpec) -> list[Path]:
    """Every file the cache keeps for ``spec`` (not its lock), present ones only."""
    from .download import info_path

    partial = partial_path(spec)
    named = [weights_path(spec), record_path(spec), partial, info_path(partial)]
    return [p for p in named if p.is_file()] + leftover_paths(spec)


def _remove(paths: Sequence[Path]) -> list[Path]:
    removed = []
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CacheError(
                f"cannot delete {path} ({exc.strerror or exc}); check the cache's permissions"
            ) from None
        removed.append(path)
    return removed


def remove_model(spec: ModelSpec) -> list[Path]:
    """Delete ``spec``'s weights, record, partial download and leftovers; returns what was deleted.

    Refuses (:class:`CacheError`) while another process is downloading that file.
    """
    if not weights_dir().is_dir() or not model_files(spec):
        return []
    with model_lock(spec, wait=False):
        return _remove(model_files(spec))


def clear_cache(specs: Sequence[ModelSpec] | None = None) -> list[Path]:
    """Delete every file the cache owns, then the weights directory if that leaves it empty; returns what was
    deleted. Files of other names, and the cache root itself, are never touched."""
    removed: list[Path] = []
    specs = list(specs if specs is not None else load_manifest().models.values())
    if weights_dir().is_dir():
        for spec in specs:
            removed += remove_model(spec)
            lock = lock_path(spec)
            if lock.is_file():
                # Only once nobody holds it: a waiting process must keep sharing the same file.
                with model_lock(spec, wait=False):
                    removed += _remove([lock])
    try:
        weights_dir().rmdir()
    except OSError:
        pass  # not empty (files of other names), or absent: leave it
    return removed


def files_to_clear(specs: Sequence[ModelSpec] | None = None) -> list[Path]:
    """What :func:`clear_cache` would delete (for the confirmation prompt)."""
    specs = list(specs if specs is not None else load_manifest().models.values())
    if not weights_dir().is_dir():
        return []
    found: list[Path] = []
    for spec in specs:
        found += model_files(spec)
        if lock_path(spec).is_file():
            found.append(lock_path(spec))
    return found

"""Where things live on disk, and the record kept beside each verified weights file.

Layout under the cache root (``MIXNET_HOME`` or the user cache directory)::

    weights/MixNet_S_pretrained.pdparams        the file exactly as downloaded, moved in only once verified
    weights/MixNet_S_pretrained.pdparams.json   its record: sha256, size, where it came from, when
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from . import settings
from .errors import CacheError
from .manifest import ModelSpec

RECORD_SUFFIX = ".json"
_HASH_CHUNK = 1 << 20


def cache_root() -> Path:
    return settings.home()


def weights_dir() -> Path:
    return cache_root() / "weights"


def weights_path(spec: ModelSpec) -> Path:
    return weights_dir() / spec.filename


def record_path(spec: ModelSpec) -> Path:
    path = weights_path(spec)
    return path.with_name(path.name + RECORD_SUFFIX)


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
    path = record_path(spec)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(
            f"cannot create the cache directory {path} ({exc.strerror}); "
            "set MIXNET_HOME to a writable directory"
        ) from None
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

"""Getting a model's weights into the cache and out of it, verified.

The policy lives here: which URLs to try, what a file must pass before it enters the cache (manifest checksum
and size where published, a safe parse, every key and shape of the architecture), and the check of a cached
file against the record written when it was verified.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from . import cache, settings
from .download import fetch_url
from .errors import CacheError, DownloadError, MixnetError, OfflineError, WeightsError
from .manifest import ModelSpec
from .pdparams import read_state_dict


@dataclass(frozen=True)
class VerifiedWeights:
    spec: ModelSpec
    path: Path
    record: cache.WeightsRecord


def candidate_urls(spec: ModelSpec, mirrors: Sequence[str] | None = None) -> list[str]:
    """The mirrors (flag, else ``MIXNET_MIRROR``) in order, each as ``<mirror>/<file name>``; else the manifest URL."""
    chosen = list(mirrors) if mirrors else settings.mirrors()
    if chosen:
        return [f"{mirror.rstrip('/')}/{spec.filename}" for mirror in chosen]
    return [spec.url]


def _download_hint(spec: ModelSpec) -> str:
    short = spec.name.rsplit("_", 1)[-1]
    return f"run `mixnet download {short} --force`"


def check_file(spec: ModelSpec, path: Path, size: int, sha256: str) -> dict[str, np.ndarray]:
    """Everything a file must pass before it enters the cache; returns its parsed state dict.

    Raises :class:`WeightsError` whose message starts with what failed (the caller names the file).
    """
    if spec.size is not None and size != spec.size:
        raise WeightsError(f"has {size} bytes, but {spec.name} weights have {spec.size}")
    if spec.sha256 is not None and sha256 != spec.sha256:
        raise WeightsError(f"has sha256 {sha256}, but {spec.name} weights have {spec.sha256}")
    state = read_state_dict(path)
    from .model import build_network, check_state_dict, expected_shapes

    check_state_dict(spec, state, expected_shapes(build_network(spec)))
    return state


def _install(spec: ModelSpec, tmp: Path, source: str, size: int, sha256: str) -> VerifiedWeights:
    target = cache.weights_path(spec)
    record = cache.WeightsRecord(
        model=spec.name,
        sha256=sha256,
        size=size,
        source=source,
        fetched_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    )
    # The weights go in first, then the record: a file without a record is re-verified before use,
    # a record without its file is ignored, so a crash between the two never yields an unverified file.
    os.replace(tmp, target)
    cache.write_record(spec, record)
    return VerifiedWeights(spec=spec, path=target, record=record)


def _temporary_path(spec: ModelSpec) -> Path:
    target = cache.weights_path(spec)
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.incomplete")


def download_weights(
    spec: ModelSpec, *, mirrors: Sequence[str] | None = None, progress: bool | None = None
) -> VerifiedWeights:
    """Download, verify and install ``spec``'s weights, trying each candidate URL until one passes."""
    cache.ensure_dir(cache.weights_dir())
    failures: list[MixnetError] = []
    for url in candidate_urls(spec, mirrors):
        tmp = _temporary_path(spec)
        try:
            fetched = fetch_url(url, tmp, label=spec.filename, progress=progress)
            check_file(spec, tmp, fetched.size, fetched.sha256)
            return _install(spec, tmp, url, fetched.size, fetched.sha256)
        except WeightsError as exc:
            failures.append(WeightsError(f"{url} {exc}; check the mirror or URL"))
        except DownloadError as exc:
            failures.append(exc)
        except OSError as exc:
            failures.append(CacheError(
                f"cannot write {tmp} ({exc.strerror or exc}); free disk space or set MIXNET_HOME"
            ))
        finally:
            tmp.unlink(missing_ok=True)
    if len(failures) == 1:
        raise failures[0]
    raise DownloadError(f"no source gave valid {spec.name} weights: " + " | ".join(map(str, failures)))


def cached_weights(spec: ModelSpec) -> VerifiedWeights | None:
    """The cached file if present and still matching its record; None if not cached.

    A file whose content no longer matches its record is corrupt: it is removed and :class:`WeightsError` says
    how to fetch it again. A file with no record (placed by hand, or a crash before the record was written) is
    verified in full and then adopted.
    """
    path = cache.weights_path(spec)
    if not path.is_file():
        return None
    record = cache.read_record(spec)
    size = path.stat().st_size
    sha256 = cache.sha256_of(path)
    if record is None:
        try:
            check_file(spec, path, size, sha256)
        except WeightsError as exc:
            raise WeightsError(
                f"{path} {exc}; delete it or {_download_hint(spec)}"
            ) from None
        record = cache.WeightsRecord(
            model=spec.name, sha256=sha256, size=size, source=f"file:{path}",
            fetched_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        )
        try:
            cache.write_record(spec, record)
        except OSError:
            pass  # a read-only cache still serves what it holds; verification simply repeats next time
        return VerifiedWeights(spec=spec, path=path, record=record)
    if size != record.size or sha256 != record.sha256 or (spec.sha256 and sha256 != spec.sha256):
        raise WeightsError(
            f"cached weights {path} are corrupt (sha256 {sha256[:12]}..., expected {record.sha256[:12]}...); "
            f"{_download_hint(spec)}"
        )
    return VerifiedWeights(spec=spec, path=path, record=record)


def ensure_weights(
    spec: ModelSpec,
    *,
    mirrors: Sequence[str] | None = None,
    offline: bool | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> VerifiedWeights:
    """The verified cached weights of ``spec``, downloading them first when needed (and allowed)."""
    if not force:
        found = cached_weights(spec)
        if found is not None:
            return found
    if settings.offline() if offline is None else offline:
        raise OfflineError(
            f"{spec.name} weights are not in the cache ({cache.weights_path(spec)}) and offline mode is on; "
            f"run `mixnet download {spec.name.rsplit('_', 1)[-1]}` with network access first"
        )
    return download_weights(spec, mirrors=mirrors, progress=progress)


def load_state(weights: VerifiedWeights) -> dict[str, np.ndarray]:
    """Parse verified weights into a state dict (the safe unpickler; never ``pickle.load``)."""
    try:
        return read_state_dict(weights.path)
    except MixnetError as exc:
        raise WeightsError(f"{weights.path} {exc}; {_download_hint(weights.spec)}") from None

"""HTTP transport: stream one URL into one local file, with a timeout and a progress bar on stderr.

This module knows nothing about models or the cache; :mod:`mixnet_cli.weights` decides what to fetch, where
to put it and whether to keep it.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from . import settings
from .errors import DownloadError

_CHUNK = 1 << 16


@dataclass(frozen=True)
class Downloaded:
    url: str
    size: int
    sha256: str


def _progress_bar(total: int | None, label: str, enabled: bool | None):
    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(
        total=total,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not show,
        file=sys.stderr,
        leave=False,
    )


def fetch_url(url: str, destination: Path, *, label: str, progress: bool | None = None) -> Downloaded:
    """Stream ``url`` into ``destination`` (created or truncated) and return its size and sha256.

    Raises :class:`DownloadError` for connection failures, timeouts and non-200 answers.
    """
    import requests

    timeout = settings.download_timeout()
    try:
        response = requests.get(url, stream=True, timeout=(timeout, timeout))
    except requests.RequestException as exc:
        raise DownloadError(f"cannot reach {url} ({_reason(exc)}); check the network or use a mirror") from None
    with response:
        if response.status_code != 200:
            raise DownloadError(
                f"{url} answered HTTP {response.status_code} {response.reason or ''}".rstrip()
                + "; check the URL or mirror, or try again later"
            )
        total = response.headers.get("Content-Length")
        expected = int(total) if total and total.isdigit() else None
        digest = hashlib.sha256()
        size = 0
        try:
            with open(destination, "wb") as out, _progress_bar(expected, label, progress) as bar:
                for chunk in response.iter_content(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        except requests.RequestException as exc:
            raise DownloadError(f"download of {url} broke off after {size} bytes ({_reason(exc)}); run again") from None
        if expected is not None and size != expected:
            raise DownloadError(f"download of {url} ended after {size} of {expected} bytes; run again")
    return Downloaded(url=url, size=size, sha256=digest.hexdigest())


def _reason(exc: Exception) -> str:
    import requests

    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return type(exc).__name__

"""HTTP transport: fetch one URL into one partial file, resuming, retrying, with a progress bar on stderr.

This module knows nothing about models or the cache; :mod:`mixnet_cli.weights.store` decides what to fetch, where
to put it, whether to keep it, and holds the lock that makes one process at a time write a given partial file.

A partial file keeps what arrived so far; beside it, ``<partial>.json`` keeps the URL and the validator
(strong ``ETag``, else ``Last-Modified``) of the response it came from. The next attempt, in this run or a
later one, asks for the rest with ``Range`` + ``If-Range``, so a file that changed on the server comes back
whole (200) instead of being spliced onto the old bytes. A server that ignores ``Range`` (200), answers at the
wrong offset, or a partial without a validator, restarts the file from zero.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..base import settings
from ..base.cache import PartialInfo, discard_partial, read_partial_info, write_partial_info
from ..base.errors import DownloadError
from ..base.http import (Retryable, failure_reason, host_not_found, notice, parse_retry_after, read_chunks,
                         retry_delay, session, unknown_host)

# A server answering at the wrong offset is sent a plain request; one that keeps doing it is broken.
_MAX_RESTARTS = 2
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Downloaded:
    url: str
    size: int
    sha256: str
    resumed_from: int = 0
    """Bytes kept from an earlier attempt or run (0 when the whole file came in this attempt)."""


def _strong_etag(value: str | None) -> str | None:
    # If-Range only works with a strong validator (RFC 9110 13.1.5); a weak ETag must not be sent.
    if not value or value.strip().startswith("W/"):
        return None
    return value.strip()


class _Restart(Exception):
    """What arrived cannot be appended to the partial file: start the file again from zero."""


def _progress_bar(total: int | None, initial: int, label: str, enabled: bool | None) -> Any:
    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(
        total=total,
        initial=initial,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not show,
        file=sys.stderr,
        leave=False,
    )


def _sha256_of(path: Path, digest: Any = None) -> Any:
    digest = digest or hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest


def fetch_url(
    url: str,
    destination: Path,
    *,
    label: str,
    progress: bool | None = None,
    resume: bool = True,
    max_bytes: int | None = None,
    retry_unreachable: bool = True,
    on_start: Callable[[int | None, int], None] | None = None,
) -> Downloaded:
    """Download ``url`` into the partial file ``destination`` and return its size and sha256.

    Continues an earlier partial download of the same URL when the server allows it (``resume=False`` starts
    from zero). Connection failures, timeouts, HTTP 429 and 5xx are retried ``MIXNET_RETRIES`` times with
    exponential backoff, except a host name that does not resolve (:class:`UnknownHostError` at once), and a
    server that does not answer at all (connection refused) when ``retry_unreachable`` is false (the caller has another source to try); after the last, :class:`DownloadError` says what happened, and what arrived stays in
    ``destination`` for the next run to resume. Other HTTP errors, an HTML page, or a body larger than
    ``max_bytes`` raise :class:`DownloadError` at once. Errors writing ``destination`` (a full disk) propagate
    as :class:`OSError`.

    ``on_start(total, kept)`` is called when a response's body is about to be read, with the file's whole size in
    bytes (None when the server does not say) and how many bytes of an earlier attempt are kept (0: from the start).
    """
    if not resume:
        discard_partial(destination)
    attempts = settings.download_retries() + 1
    failures = 0
    restarts = 0
    while True:
        try:
            return _attempt(url, destination, label=label, progress=progress, max_bytes=max_bytes, on_start=on_start)
        except _Restart as exc:
            discard_partial(destination)
            restarts += 1
            if restarts > _MAX_RESTARTS:
                raise DownloadError(f"{url}: {exc}, again and again; use another mirror") from None
            notice(f"{url}: {exc}; starting the file again from the beginning")
        except Retryable as exc:
            failures += 1
            if exc.unreachable and not retry_unreachable:
                raise DownloadError(str(exc)) from None  # another source is next: no waiting on a dead one
            if failures >= attempts:
                kept = destination.stat().st_size if destination.exists() else 0
                tail = (
                    f"; run the same command again to resume ({kept} bytes kept)" if kept
                    else "; check the network or the mirror, or try again later"
                )
                tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
                raise DownloadError(f"{exc} (gave up after {tries}){tail}") from None
            delay = retry_delay(failures, exc.retry_after, settings.download_backoff(), settings.download_backoff_max())
            notice(f"{exc}; retrying in {delay:g}s (attempt {failures + 1} of {attempts})")
            time.sleep(delay)


def _attempt(url: str, destination: Path, *, label: str, progress: bool | None, max_bytes: int | None,
             on_start: Callable[[int | None, int], None] | None = None) -> Downloaded:
    import requests
    import urllib3

    info = read_partial_info(destination)
    offset = destination.stat().st_size if destination.exists() else 0
    if offset and (info is None or info.url != url or info.validator is None):
        # Bytes of unknown origin, another URL's, or from a server that gave no validator: they cannot be
        # continued safely.
        discard_partial(destination)
        offset, info = 0, None
    headers = {"Accept-Encoding": "identity"}
    if offset and info is not None and info.validator:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = info.validator
    timeout = settings.download_timeout()
    try:
        response = session().get(url, stream=True, timeout=(timeout, timeout), headers=headers)
    except requests.RequestException as exc:
        if host_not_found(exc):
            raise unknown_host(url) from None  # no retry: a name that does not resolve does not in 16 s either
        unreachable = isinstance(exc, requests.ConnectionError) and not isinstance(exc, requests.Timeout)
        raise Retryable(f"cannot reach {url} ({failure_reason(exc, timeout)})", unreachable=unreachable) from None
    with response:
        status = response.status_code
        if status == 429 or 500 <= status < 600:
            raise Retryable(
                f"{url} answered HTTP {status} {response.reason or ''}".rstrip(),
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if status == 416 and offset and info is not None:
            match = _UNSATISFIED_RANGE.match(response.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == offset and info.total == offset:
                # Everything had arrived before (the earlier run stopped while checking the file).
                return Downloaded(url=url, size=offset, sha256=_sha256_of(destination).hexdigest(), resumed_from=offset)
            raise _Restart("the server cannot continue the partial download")
        if status not in (200, 206):
            raise DownloadError(
                f"{url} answered HTTP {status} {response.reason or ''}".rstrip()
                + "; check the URL or mirror, or try again later"
            )
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type in ("text/html", "application/xhtml+xml"):
            raise DownloadError(
                f"{url} served a web page ({content_type}), not a weights file; check the mirror URL "
                "(a login or error page?)"
            )
        etag = _strong_etag(response.headers.get("ETag"))
        last_modified = response.headers.get("Last-Modified")
        length = response.headers.get("Content-Length", "")
        total = int(length) if length.isdigit() else None
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            start = int(match.group(1)) if match else -1
            total = int(match.group(3)) if match and match.group(3) != "*" else None
            if start != offset:
                raise _Restart(f"the server answered a range request at the wrong offset ({start}, not {offset})")
            if offset and info is not None and (
                (etag and info.etag and etag != info.etag) or (total and info.total and total != info.total)
            ):
                raise _Restart("the file changed on the server")
        if status == 206 and offset:
            digest = _sha256_of(destination)
            mode = "ab"
        else:
            # The whole file, either because nothing was asked for, or because the server ignored Range or the
            # file changed (If-Range): never append it to the old bytes.
            offset = 0
            digest = hashlib.sha256()
            mode = "wb"
        if max_bytes is not None and total is not None and total > max_bytes:
            raise DownloadError(
                f"{url} is {total} bytes, far more than these weights can be; check the mirror URL"
            )
        if on_start is not None:
            on_start(total, offset)
        if mode == "wb":
            # Written before the first byte, so an interrupted download can always be continued.
            write_partial_info(destination, PartialInfo(url=url, etag=etag, last_modified=last_modified, total=total))
        size = offset
        if hasattr(response.raw, "enforce_content_length"):
            # urllib3 discards the bytes it had buffered when it notices a short body; read to the end instead
            # and compare with the promised length below, so every byte that arrived is kept for resuming.
            response.raw.enforce_content_length = False
        try:
            # Unbuffered: what arrived is on disk at once, so even a killed process leaves a partial file that
            # holds every byte it received, and the next run asks for exactly the rest.
            with open(destination, mode, buffering=0) as out, _progress_bar(total, offset, label, progress) as bar:
                for chunk in read_chunks(response):
                    _write_all(out, chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
                    if max_bytes is not None and size > max_bytes:
                        discard_partial(destination)
                        raise DownloadError(
                            f"{url} sent more than {max_bytes} bytes, far more than these weights can be; "
                            "check the mirror URL"
                        )
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise Retryable(f"download of {url} broke off after {size} bytes ({failure_reason(exc, timeout)})") from None
    if total is not None and size != total:
        raise Retryable(f"download of {url} broke off after {size} of {total} bytes (connection closed early)")
    return Downloaded(url=url, size=size, sha256=digest.hexdigest(), resumed_from=offset)


def _write_all(out: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = out.write(view)
        if not written:
            raise OSError("write returned no progress")
        view = view[written:]

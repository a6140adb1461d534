"""HTTP transport: fetch one URL into one partial file, resuming, retrying, with a progress bar on stderr.

This module knows nothing about models or the cache; :mod:`mixnet_cli.weights` decides what to fetch, where
to put it, whether to keep it, and holds the lock that makes one process at a time write a given partial file.

A partial file keeps what arrived so far; beside it, ``<partial>.json`` keeps the URL and the validator
(strong ``ETag``, else ``Last-Modified``) of the response it came from. The next attempt, in this run or a
later one, asks for the rest with ``Range`` + ``If-Range``, so a file that changed on the server comes back
whole (200) instead of being spliced onto the old bytes. A server that ignores ``Range`` (200), answers at the
wrong offset, or a partial without a validator, restarts the file from zero.
"""

from __future__ import annotations

import email.utils
import logging
import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import files, settings
from .errors import DownloadError, UsageError

_CHUNK = 1 << 16
INFO_SUFFIX = ".json"
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


_log = logging.getLogger(__name__)


def notice(message: str) -> None:
    """A one-line message for the person waiting, logged at INFO (the CLI shows it on stderr unless -q)."""
    _log.info(message)


def check_http_url(url: str, source: str, example: str) -> str:
    """``url`` itself when it is an http:// or https:// URL with a host; else a :class:`UsageError` naming
    ``source`` (the option or variable it came from) and showing a URL that would do (``example``, or ``url``
    with http:// in front when it only lacks a scheme). requests would refuse it later with InvalidSchema or
    MissingSchema, which say nothing of the option to fix."""
    try:
        parts = urlsplit(url.strip())
        good = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:  # an unclosed IPv6 bracket, a port that is not a number
        good = False
    if good:
        return url
    hint = f"http://{url.strip()}" if url.strip() and "://" not in url else example
    raise UsageError(f"{source} {url!r}: must be an http:// or https:// URL with a host; give one like {hint}")


def info_path(partial: Path) -> Path:
    """Where the URL and validator of ``partial``'s bytes are kept."""
    return partial.with_name(partial.name + INFO_SUFFIX)


def discard_partial(partial: Path) -> None:
    """Remove a partial file and its info (missing ones are fine)."""
    partial.unlink(missing_ok=True)
    info_path(partial).unlink(missing_ok=True)


@dataclass(frozen=True)
class PartialInfo:
    """The URL, validators and full size of the response a partial file's bytes came from."""

    url: str
    etag: str | None
    last_modified: str | None
    total: int | None

    @property
    def validator(self) -> str | None:
        return self.etag or self.last_modified


def read_partial_info(partial: Path) -> PartialInfo | None:
    """Where ``partial``'s bytes came from, or None when that is not known (then they are not resumed)."""
    try:
        raw = json.loads(info_path(partial).read_text(encoding="utf-8"))
        total = raw.get("total")
        return PartialInfo(
            url=str(raw["url"]),
            etag=raw.get("etag") or None,
            last_modified=raw.get("last_modified") or None,
            total=int(total) if total is not None else None,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_info(partial: Path, info: PartialInfo) -> None:
    files.write_text(
        info_path(partial),
        json.dumps({"url": info.url, "etag": info.etag, "last_modified": info.last_modified, "total": info.total})
        + "\n",
    )


def _strong_etag(value: str | None) -> str | None:
    # If-Range only works with a strong validator (RFC 9110 13.1.5); a weak ETag must not be sent.
    if not value or value.strip().startswith("W/"):
        return None
    return value.strip()


def retry_delay(attempt: int, retry_after: float | None, base: float, cap: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): the server's ``Retry-After`` if it
    sent one, else ``base * 2 ** (attempt - 1)``; never more than ``cap``."""
    wanted = retry_after if retry_after is not None else base * 2 ** (attempt - 1)
    return max(0.0, min(wanted, cap))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: either a number of seconds or an HTTP date. None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


class _Retryable(Exception):
    """A failure worth another attempt: network trouble, a timeout, HTTP 429 or 5xx. ``unreachable``: nothing
    answered at all (connection refused, unknown host), which with another source to try is not worth a wait."""

    def __init__(self, message: str, retry_after: float | None = None, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.unreachable = unreachable


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
) -> Downloaded:
    """Download ``url`` into the partial file ``destination`` and return its size and sha256.

    Continues an earlier partial download of the same URL when the server allows it (``resume=False`` starts
    from zero). Connection failures, timeouts, HTTP 429 and 5xx are retried ``MIXNET_RETRIES`` times with
    exponential backoff, except a server that does not answer at all (connection refused, unknown host) when
    ``retry_unreachable`` is false (the caller has another source to try); after the last, :class:`DownloadError` says what happened, and what arrived stays in
    ``destination`` for the next run to resume. Other HTTP errors, an HTML page, or a body larger than
    ``max_bytes`` raise :class:`DownloadError` at once. Errors writing ``destination`` (a full disk) propagate
    as :class:`OSError`.
    """
    if not resume:
        discard_partial(destination)
    attempts = settings.download_retries() + 1
    failures = 0
    restarts = 0
    while True:
        try:
            return _attempt(url, destination, label=label, progress=progress, max_bytes=max_bytes)
        except _Restart as exc:
            discard_partial(destination)
            restarts += 1
            if restarts > _MAX_RESTARTS:
                raise DownloadError(f"{url}: {exc}, again and again; use another mirror") from None
            notice(f"{url}: {exc}; starting the file again from the beginning")
        except _Retryable as exc:
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


def _attempt(url: str, destination: Path, *, label: str, progress: bool | None, max_bytes: int | None) -> Downloaded:
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
        unreachable = isinstance(exc, requests.ConnectionError) and not isinstance(exc, requests.Timeout)
        raise _Retryable(f"cannot reach {url} ({_reason(exc, timeout)})", unreachable=unreachable) from None
    with response:
        status = response.status_code
        if status == 429 or 500 <= status < 600:
            raise _Retryable(
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
        if mode == "wb":
            # Written before the first byte, so an interrupted download can always be continued.
            _write_info(destination, PartialInfo(url=url, etag=etag, last_modified=last_modified, total=total))
        size = offset
        if hasattr(response.raw, "enforce_content_length"):
            # urllib3 discards the bytes it had buffered when it notices a short body; read to the end instead
            # and compare with the promised length below, so every byte that arrived is kept for resuming.
            response.raw.enforce_content_length = False
        try:
            # Unbuffered: what arrived is on disk at once, so even a killed process leaves a partial file that
            # holds every byte it received, and the next run asks for exactly the rest.
            with open(destination, mode, buffering=0) as out, _progress_bar(total, offset, label, progress) as bar:
                for chunk in _chunks(response):
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
            raise _Retryable(f"download of {url} broke off after {size} bytes ({_reason(exc, timeout)})") from None
    if total is not None and size != total:
        raise _Retryable(f"download of {url} broke off after {size} of {total} bytes (connection closed early)")
    return Downloaded(url=url, size=size, sha256=digest.hexdigest(), resumed_from=offset)


_sessions = threading.local()


def session() -> Any:
    """This thread's ``requests.Session``: connections to a host are kept and reused between requests (a session
    is not safe to share between threads, and the decode threads fetch image URLs side by side)."""
    import requests

    if getattr(_sessions, "session", None) is None:
        _sessions.session = requests.Session()
    return _sessions.session


class ResponseTooLarge(DownloadError):
    """The body is larger than the caller's limit."""


class DeadlinePassed(DownloadError, TimeoutError):
    """The whole fetch took longer than its deadline."""


def fetch_bytes(url: str, *, max_bytes: int, deadline_s: float | None = None) -> bytes:
    """Download ``url`` into memory (an image, not weights: nothing is written to disk) and return the body.

    The weights' HTTP layer: the same requests code and retry rules (a session of its own per fetch, since each
    runs in a watched thread of its own), ``MIXNET_TIMEOUT`` for each connect and read, ``MIXNET_RETRIES`` with
    backoff for failures that may pass (timeouts, dropped connections, HTTP 429 and 5xx). All of it within
    ``deadline_s`` seconds (default ``MIXNET_URL_DEADLINE``): a server that sends a byte now and then, never
    idle long enough for a read timeout, is cut off there. Raises :class:`DeadlinePassed` at the deadline,
    :class:`ResponseTooLarge` past ``max_bytes`` (declared or received), :class:`DownloadError` otherwise.
    """
    deadline = settings.url_deadline() if deadline_s is None else deadline_s
    end = time.monotonic() + deadline
    # The fetch runs in a thread of its own, watched from here: a server can drip its status line and headers,
    # each byte within the read timeout, and nothing inside requests would ever stop it. At the deadline this
    # input fails; the thread is a daemon, so it can neither keep the process alive nor outlive it.
    outcome: dict[str, Any] = {}

    def fetch() -> None:
        try:
            outcome["data"] = _fetch_with_retries(url, max_bytes, end, deadline)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread as is
            outcome["error"] = exc

    worker = threading.Thread(target=fetch, name="mixnet-url", daemon=True)
    worker.start()
    worker.join(max(0.0, end - time.monotonic()) + 0.5)
    if worker.is_alive():
        raise DeadlinePassed(f"{url}: not complete within {deadline:g} s (MIXNET_URL_DEADLINE sets the limit); "
                             "check the URL or try again later")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["data"]


def _fetch_with_retries(url: str, max_bytes: int, end: float, deadline: float) -> bytes:
    attempts = settings.download_retries() + 1
    failures = 0
    while True:
        try:
            return _fetch_bytes_once(url, max_bytes, end, deadline)
        except _Retryable as exc:
            failures += 1
            if failures >= attempts:
                tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
                raise DownloadError(f"{exc} (gave up after {tries}); check the URL or try again later") from None
            delay = retry_delay(failures, exc.retry_after, settings.download_backoff(), settings.download_backoff_max())
            if time.monotonic() + delay >= end:
                raise DeadlinePassed(f"{exc}, and no time is left for another attempt within {deadline:g} s "
                                     "(MIXNET_URL_DEADLINE)") from None
            notice(f"{exc}; retrying in {delay:g}s (attempt {failures + 1} of {attempts})")
            time.sleep(delay)


def _fetch_bytes_once(url: str, max_bytes: int, end: float, deadline: float) -> bytes:
    import requests
    import urllib3

    def past_deadline() -> DeadlinePassed:
        return DeadlinePassed(f"{url}: not complete within {deadline:g} s (MIXNET_URL_DEADLINE sets the limit); "
                              "check the URL or try again later")

    remaining = end - time.monotonic()
    if remaining <= 0:
        raise past_deadline()
    # No single wait may outlast the deadline either.
    timeout = min(settings.download_timeout(), remaining)
    try:
        # identity asked for, but some servers compress anyway: the body is decoded as it arrives (decode=True),
        # and the size cap counts decoded bytes, so a small compressed body cannot grow past it.
        response = session().get(url, stream=True, timeout=(timeout, timeout), headers={"Accept-Encoding": "identity"})
    except (requests.TooManyRedirects, requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema) as exc:
        # Not something that passes: no retry.
        raise DownloadError(f"{url}: {type(exc).__name__} ({_first_line(exc)}); check the URL") from None
    except requests.RequestException as exc:
        if time.monotonic() >= end:
            raise past_deadline() from None
        unreachable = isinstance(exc, requests.ConnectionError) and not isinstance(exc, requests.Timeout)
        raise _Retryable(f"cannot reach {url} ({_reason(exc, timeout)})", unreachable=unreachable) from None
    with response:
        status = response.status_code
        if status == 429 or 500 <= status < 600:
            raise _Retryable(f"{url} answered HTTP {status} {response.reason or ''}".rstrip(),
                             retry_after=parse_retry_after(response.headers.get("Retry-After")))
        if status != 200:
            raise DownloadError(f"{url}: server answered HTTP {status}; check the URL")
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise ResponseTooLarge(f"{url}: {int(declared)} bytes is over the {max_bytes}-byte limit")
        received: list[bytes] = []
        size = 0
        try:
            for chunk in _chunks(response, decode=True):
                size += len(chunk)
                if size > max_bytes:
                    raise ResponseTooLarge(f"{url}: more than {max_bytes} bytes, over the limit")
                received.append(chunk)
                if time.monotonic() >= end:
                    raise past_deadline()
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            if time.monotonic() >= end:
                raise past_deadline() from None
            raise _Retryable(f"download of {url} broke off after {size} bytes ({_reason(exc, timeout)})") from None
    return b"".join(received)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _chunks(response: Any, *, decode: bool = False) -> Any:
    """The body as it arrives. ``read1`` returns what one read got: ``iter_content`` waits to fill a whole chunk,
    and a timeout or dropped connection while it waits loses the bytes it had, which resuming then fetches
    again. ``decode``: undo a ``Content-Encoding`` (gzip, deflate) the server applied; weights are read as sent,
    byte ranges and all."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 1.x
        yield from (response.iter_content(_CHUNK) if decode else response.raw.stream(_CHUNK, decode_content=False))
        return
    while chunk := read1(_CHUNK, decode_content=decode):
        yield chunk


def _write_all(out: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = out.write(view)
        if not written:
            raise OSError("write returned no progress")
        view = view[written:]


def _reason(exc: Exception, timeout: float) -> str:
    import requests

    import urllib3

    text = str(exc)
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)) or "timed out" in text.lower():
        return f"no answer for {timeout:g}s; MIXNET_TIMEOUT sets the limit"
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)):
        return "connection closed early"
    if isinstance(exc, requests.ConnectionError):
        if "refused" in text.lower():
            return "connection refused"
        if "resolve" in text.lower() or "name or service" in text.lower():
            return "unknown host"
        return "connection failed"
    return type(exc).__name__

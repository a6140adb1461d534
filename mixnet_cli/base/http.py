"""The one HTTP layer: a requests session per thread, timeouts, retries with backoff, ``Retry-After``, a
deadline for a whole fetch, and the check that a URL option is an http(s) URL. Weights downloads
(:mod:`mixnet_cli.weights.download`) and image URLs (:mod:`mixnet_cli.images.inputs`) both go through it; it knows
nothing of models or the cache."""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from . import settings
from .errors import DownloadError, UnknownHostError, UsageError
from .parsing import ascii_whole_number

_CHUNK = 1 << 16

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
    seconds = ascii_whole_number(value)
    if seconds is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


class Retryable(Exception):
    """A failure worth another attempt: network trouble, a timeout, HTTP 429 or 5xx. ``unreachable``: nothing
    answered at all (connection refused), which with another source to try is not worth a wait. (A host name that
    does not resolve is no Retryable: :func:`unknown_host`.)"""

    def __init__(self, message: str, retry_after: float | None = None, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.unreachable = unreachable


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
    backoff for failures that may pass (timeouts, dropped connections, HTTP 429 and 5xx; not a host name that
    does not resolve, :class:`UnknownHostError` at once). All of it within
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
        except Retryable as exc:
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
        if host_not_found(exc):
            raise unknown_host(url) from None
        unreachable = isinstance(exc, requests.ConnectionError) and not isinstance(exc, requests.Timeout)
        raise Retryable(f"cannot reach {url} ({failure_reason(exc, timeout)})", unreachable=unreachable) from None
    with response:
        status = response.status_code
        if status == 429 or 500 <= status < 600:
            raise Retryable(f"{url} answered HTTP {status} {response.reason or ''}".rstrip(),
                             retry_after=parse_retry_after(response.headers.get("Retry-After")))
        if status != 200:
            raise DownloadError(f"{url}: server answered HTTP {status}; check the URL")
        declared = ascii_whole_number(response.headers.get("Content-Length", ""))
        if declared is not None and declared > max_bytes:
            raise ResponseTooLarge(f"{url}: {declared} bytes is over the {max_bytes}-byte limit")
        received: list[bytes] = []
        size = 0
        try:
            for chunk in read_chunks(response, decode=True):
                size += len(chunk)
                if size > max_bytes:
                    raise ResponseTooLarge(f"{url}: more than {max_bytes} bytes, over the limit")
                received.append(chunk)
                if time.monotonic() >= end:
                    raise past_deadline()
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            if time.monotonic() >= end:
                raise past_deadline() from None
            raise Retryable(f"download of {url} broke off after {size} bytes ({failure_reason(exc, timeout)})") from None
    return b"".join(received)


def host_not_found(exc: BaseException) -> bool:
    """Whether ``exc`` (a requests or urllib3 error) is a failure to resolve the host name: a name that does not
    exist (``.invalid``, a typo) or a resolver that cannot be reached at all (no network). Neither passes in the
    seconds a retry waits, so it is not retried."""
    import socket

    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, socket.gaierror) or type(current).__name__ == "NameResolutionError":
            return True
        if isinstance(current, BaseException):
            # requests wraps urllib3's MaxRetryError (its reason the resolution error) in its first argument.
            pending += [current.__cause__, current.__context__, getattr(current, "reason", None),
                        *[arg for arg in current.args if isinstance(arg, BaseException)]]
    return False


def unknown_host(url: str) -> UnknownHostError:
    """The error for ``url`` whose host does not resolve, said once and not retried."""
    host = urlsplit(url).hostname or url
    return UnknownHostError(f"cannot reach {url} (unknown host {host}: the name does not resolve; check its "
                            "spelling and the network)")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def read_chunks(response: Any, *, decode: bool = False) -> Any:
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


def failure_reason(exc: Exception, timeout: float) -> str:
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

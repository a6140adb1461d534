"""Image URLs that ``mixnet serve --allow-urls`` fetches for a request: public addresses only, in async I/O.

A service that fetches any URL its clients name is a way into the network it sits in (server-side request
forgery): loopback admin ports, a cloud's metadata address (169.254.169.254), private ranges. So every host is
resolved here, every address it resolves to is checked (:func:`is_public_address`), and the connection goes to
the address that was checked (never a second lookup that a DNS answer could change); a redirect is followed by
hand, up to :data:`MAX_REDIRECTS`, and checked the same way. A refused address is refused before any connection,
with the same message whether or not anything listens there. ``allow_private`` lifts the check (an intranet,
tests).

The check is the standard library's ``ipaddress`` (``is_global``, which follows IANA's special-purpose address
registries, with ``is_multicast`` and ``is_reserved``, which ``is_global`` lets through for some ranges), and
IPv4 addresses embedded in IPv6 ones (mapped, 6to4, Teredo) are checked as IPv4 too: the standard library's
answer for them changed between Python 3.11 and 3.13.

The fetch is async I/O on the server's event loop (asyncio streams, h11 to speak HTTP/1.1): no thread is taken
from image decoding, and when a fetch passes its deadline its task is cancelled and its socket closed at once,
so nothing is left behind. The body is capped while it arrives; ``Accept-Encoding: identity`` is asked and
nothing is decompressed, so a gzip bomb stays small (and is not an image).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Callable
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

from ..base.errors import ImageTooLargeError, MixnetError, UsageError
from ..base.parsing import ascii_whole_number
from ..images.inputs import ImageDownloadError

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
# The dots that separate a host's labels for IDNA (RFC 3490 3.1): the full stop and three look-alikes.
_LABEL_DOTS = re.compile("[.\u3002\uff0e\uff61]")


class ForbiddenAddress(MixnetError, PermissionError):
    """A URL whose host is not a public address (or a redirect to one), and private addresses are not allowed."""


class BadURL(UsageError):
    """A URL that cannot be fetched as written: not http(s), no host, a bad port, a malformed IPv6 address, a host
    name that is not a valid internationalised domain name (a label over 63 characters, digits no resolver
    reads)."""


@dataclass(frozen=True)
class Target:
    """Where a URL points: its parts, its host as ASCII (IDNA, as the resolver is asked: what is checked is what
    is resolved) and its port."""

    parts: SplitResult
    host: str
    port: int


def url_target(url: str) -> Target:
    """Where ``url`` points; :class:`BadURL` (its message naming the URL, without its password, and what is wrong
    with it) when it cannot be fetched as written. Nothing is resolved or contacted."""
    shown = without_credentials(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535", a port that is not a number
        raise BadURL(f"{shown}: not a valid URL ({exc}); check it") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise BadURL(f"{shown}: not an http(s) URL with a host; check it")
    host = parts.hostname
    if ":" not in host:  # a name or an IPv4 address (an IPv6 one was checked by urlsplit)
        try:
            labels = [label.encode("idna") for label in _LABEL_DOTS.split(host)]
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise BadURL(f"{shown}: the host is not a valid domain name (an empty label, one over 63 characters, or "
                         "characters no domain name has); check the URL") from None
        if any(not label.isascii() and not encoded.startswith(b"xn--")
               for label, encoded in zip(_LABEL_DOTS.split(parts.hostname), labels)):
            # IDNA maps look-alikes (circled or full-width digits and letters) to ASCII ones: a disguise, not a name
            raise BadURL(f"{shown}: the host has characters that stand for plain ones (circled or full-width digits "
                         "or letters); write the host in plain characters")
    return Target(parts, host, port or (443 if parts.scheme.lower() == "https" else 80))


def is_public_address(address: str) -> bool:
    """Whether ``address`` (an IPv4 or IPv6 address, a zone index allowed) is a public unicast address: not
    loopback, private, link-local, shared (CGNAT), multicast, reserved or unspecified, nor an IPv6 address
    that embeds such an IPv4 one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        if any(v4 is not None for v4 in embedded):
            return all(is_public_address(str(v4)) for v4 in embedded if v4 is not None)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback
                                 or ip.is_link_local or ip.is_private)


def without_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` (for messages and logs)."""
    return re.sub(r"(?i)^(https?://)[^/?#@]*@", r"\1***@", url)


async def fetch_image(url: str, *, deadline_s: float, max_bytes: int, allow_private: bool = False,
                      allowed: Callable[[str], bool] | None = None) -> bytes:
    """The body of ``url`` (http or https, redirects followed), within ``deadline_s`` seconds and ``max_bytes``.

    Raises :class:`BadURL` when ``url`` cannot be fetched as written, :class:`ForbiddenAddress` when the host or a redirect's host resolves to an address that is not
    public (``allowed``, a predicate on the address, replaces :func:`is_public_address`; ``allow_private``
    turns the check off), :class:`ImageTooLargeError` past ``max_bytes``, :class:`ImageDownloadError` for
    anything else (unreachable, not 200, not HTTP, past the deadline). Messages never hold the URL's password.
    """
    check = None if allow_private else (allowed or is_public_address)
    try:
        return await asyncio.wait_for(_fetch(url, max_bytes, check), deadline_s)
    except asyncio.TimeoutError:
        raise ImageDownloadError(f"{without_credentials(url)}: not complete within {deadline_s:g} s; check the URL "
                                 "or try again later") from None


async def _fetch(url: str, max_bytes: int, check: Callable[[str], bool] | None) -> bytes:
    import h11

    shown = without_credentials(url)
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        try:
            where = url_target(current)
        except BadURL as exc:
            if current == url:
                raise
            raise ImageDownloadError(f"{shown}: redirected to a URL that cannot be fetched ({exc})") from None
        parts, port = where.parts, where.port
        address = await _resolve(where.host, port, check, shown, current != url)
        reader, writer = await _connect(address, port, where.host if parts.scheme.lower() == "https" else None,
                                        shown)
        try:
            connection = h11.Connection(our_role=h11.CLIENT)
            host = where.host if ":" not in where.host else f"[{where.host}]"
            headers = [("Host", host if parts.port is None else f"{host}:{parts.port}"),
                       ("User-Agent", "mixnet-serve"), ("Accept", "image/*"), ("Accept-Encoding", "identity"),
                       ("Connection", "close")]
            if parts.username is not None and current == url:
                secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
                headers.append(("Authorization", "Basic " + base64.b64encode(secret).decode()))
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            writer.write(connection.send(h11.Request(method="GET", target=target, headers=headers)))
            writer.write(connection.send(h11.EndOfMessage()))
            outcome = await _response(connection, reader, max_bytes, shown)
        except (OSError, h11.ProtocolError) as exc:
            raise ImageDownloadError(f"{shown}: the connection failed ({type(exc).__name__}); check the URL or try "
                                     "again later") from None
        finally:
            writer.transport.abort()  # no lingering socket, whatever happened (a deadline included)
        if isinstance(outcome, bytes):
            return outcome
        current = urljoin(current, outcome)
    raise ImageDownloadError(f"{shown}: more than {MAX_REDIRECTS} redirects; check the URL")


async def _resolve(host: str, port: int, check: Callable[[str], bool] | None, shown: str, redirected: bool) -> str:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ImageDownloadError(f"{shown}: cannot resolve the host {host}; check the URL") from None
    addresses = [str(info[4][0]) for info in infos]
    if check is not None and (not addresses or not all(check(address) for address in addresses)):
        where = "redirects to a host that is" if redirected else "names a host that is"
        raise ForbiddenAddress(f"{shown}: {where} not a public address; this service fetches only from public "
                               "addresses (start it with --allow-private-urls to fetch from private networks)")
    return addresses[0]


async def _connect(address: str, port: int, tls_host: str | None, shown: str) -> tuple[asyncio.StreamReader,
                                                                                       asyncio.StreamWriter]:
    import ssl

    try:
        return await asyncio.open_connection(address, port, ssl=ssl.create_default_context() if tls_host else None,
                                             server_hostname=tls_host)
    except (OSError, ssl.SSLError) as exc:
        raise ImageDownloadError(f"{shown}: cannot connect ({type(exc).__name__}: {exc.strerror or exc}); check "
                                 "the URL or try again later") from None


async def _response(connection: object, reader: asyncio.StreamReader, max_bytes: int, shown: str) -> bytes | str:
    """The body of a 200, or the Location of a redirect."""
    import h11

    assert isinstance(connection, h11.Connection)
    chunks: list[bytes] = []
    size = 0
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(_CHUNK))
        elif isinstance(event, h11.Response):
            headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in event.headers}
            if event.status_code in _REDIRECTS and "location" in headers:
                return headers["location"]
            if event.status_code != 200:
                raise ImageDownloadError(f"{shown}: server answered HTTP {event.status_code}; check the URL")
            declared = headers.get("content-length", "")
            if (ascii_whole_number(declared) or 0) > max_bytes:
                raise ImageTooLargeError(f"{shown}: {declared} bytes is over the service's limit of {max_bytes}")
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_bytes:
                raise ImageTooLargeError(f"{shown}: more than {max_bytes} bytes, over the service's limit")
            chunks.append(bytes(event.data))
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return b"".join(chunks)

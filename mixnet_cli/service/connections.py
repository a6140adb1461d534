"""Connection-level limits of ``mixnet serve``: what uvicorn's HTTP protocol leaves to a proxy in front.

uvicorn's h11 protocol never times out a request whose headers are unfinished (its keep-alive timer runs only
between requests and is cancelled by the first byte of the next one), never times out a slow body, and its
``limit_concurrency`` counts open connections, so a few hundred sockets that drip a header byte now and then get
every other client a plain-text 503. :class:`ConnectionGuard` fixes these where they arise, in a small subclass of
uvicorn's ``H11Protocol`` (:func:`guarded_protocol`) that reads h11's own state machine: ``their_state`` is
``IDLE`` until a request's headers are complete, ``SEND_BODY`` while its body arrives. A timer per connection
closes it when the headers are not complete within ``header_timeout_s`` of the connection or of the request's
first byte, when the body arrives slower than ``min_body_rate`` bytes/s (on average) after a grace period, or
when no byte of the body arrives for ``body_idle_s`` (a body sent fast and then stalled keeps a high average while
it holds its share of the bodies' byte budget). An asyncio-level
guard (wrapping the transport) would have to parse HTTP a second time to know where the headers end; the
subclass overrides a few methods of the protocol and no parsing.

A request answered before its body ended (413, 401, 503, 405) is answered with ``Connection: close`` (the service
adds it where :data:`BODY_UNFINISHED` says so) and its connection is closed as nginx's lingering close does: the
write side is shut at once (the answer ends with the client's end-of-stream), what the client still sends is
read and discarded for at most ``LINGER_S`` or ``LINGER_BYTES``, whichever comes first, then the connection is
closed. Closing at once, with the body's bytes unread, would reset the connection and the client might lose the
answer before reading it; reading the rest of the body as uvicorn does would let a client that never stops
sending keep its connection forever. A lingering connection counts as idle at the ceiling.

Admission is not counted here: requests are admitted by image count in each model's queue (the batcher), so an
idle or slow connection never takes a request's place. The only connection count is ``max_connections``, a
ceiling on file descriptors. At the ceiling a new connection is not refused while one is idle: the connection
that has waited longest without complete headers (it never sent a request, sits between requests, or drips its
headers) is closed to make room, since it has sent nothing the service could answer, while the newcomer may be a
liveness probe. Only when every connection carries a request in progress is the newcomer closed. Idle ones are
kept in the order they became idle, so the oldest is found at once, however many there are.

A request whose connection the guard closes (a slow body) is marked in its ASGI scope's ``state``
(:data:`CLOSED_BY_SERVICE`: the reason), so that the service counts it as its own doing, not as a client hang-up.

The guard also drains: once :meth:`ConnectionGuard.drain` is called (SIGTERM), a connection accepted afterwards
is closed at once, so none escapes uvicorn's shutdown (which asks only the connections open at that moment to
close). A connection busy with a request at that moment is left to the service's answer, which says
``Connection: close`` (uvicorn would close it after that answer whatever followed), unless the next request is
already waiting behind it (pipelined): the scope's ``state`` holds :data:`NEXT_REQUEST_WAITING`, a function that
says so, and then that request is read and refused (503, ``Connection: close``) rather than dropped unanswered.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

_log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT_S = 5.0
DEFAULT_KEEP_ALIVE_S = 5.0
# A body may start slowly (the client reads its file), then must average this rate: 1 KiB/s is far below any
# real upload (a 32 MB body at 1 KiB/s would take 9 hours; the deadline ends it first) and far above a drip.
DEFAULT_MIN_BODY_RATE = 1024.0
DEFAULT_BODY_GRACE_S = 5.0
# A body from which nothing arrives for this long is closed, whatever its average rate so far.
DEFAULT_BODY_IDLE_S = 5.0
# After an answer given before its request's body ended: how long, and how many bytes, of the rest are read and
# discarded before the connection is closed (time for the client to read the answer).
LINGER_S = 2.0
LINGER_BYTES = 256 * 1024
DEFAULT_MAX_CONNECTIONS = 4096
_CHECK_EVERY_S = 1.0
# The key in a request's ASGI ``scope["state"]`` that says the guard closed its connection, and why.
CLOSED_BY_SERVICE = "closed_by_service"
# The key in a request's ASGI ``scope["state"]`` of a function that says whether the next request on its connection
# has arrived already (pipelined behind it).
NEXT_REQUEST_WAITING = "next_request_waiting"
# The key in a request's ASGI ``scope["state"]`` of a function that says whether its body is still arriving (an
# answer given now closes the connection after it).
BODY_UNFINISHED = "body_unfinished"


@dataclass
class ConnectionGuard:
    """The limits every connection of one server shares."""

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    min_body_rate: float = DEFAULT_MIN_BODY_RATE
    body_grace_s: float = DEFAULT_BODY_GRACE_S
    body_idle_s: float = DEFAULT_BODY_IDLE_S
    linger_s: float = LINGER_S
    linger_bytes: int = LINGER_BYTES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    draining: bool = False
    on_close: Callable[[str], None] | None = None  # told each reason a connection is closed for (metrics)
    # Connections waiting for a request's complete headers, oldest first (a dict keeps insertion order).
    idle: dict[Any, None] = field(default_factory=dict)

    def count(self, reason: str) -> None:
        if self.on_close is not None:
            self.on_close(reason)

    def drain(self) -> None:
        """From now on, close each new connection at once (the service is shutting down)."""
        self.draining = True


def guarded_protocol(guard: ConnectionGuard) -> type:
    """A subclass of uvicorn's ``H11Protocol`` that enforces ``guard`` (pass it as ``uvicorn.Config(http=...)``)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):  # type: ignore[misc]
        _guard_timer: asyncio.TimerHandle | None = None
        _waiting_since = 0.0
        _body_since = 0.0
        _body_bytes = 0
        _body_last = 0.0
        _lingering = False
        _linger_left = 0

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.transport = _LingeringTransport(transport, self)  # uvicorn's close() after an answer: see _linger
            if guard.draining:
                self._refuse("draining")
                return
            if len(self.connections) > guard.max_connections:
                if not guard.idle:  # every connection carries a request: the newcomer waits for none of them
                    self._refuse("too_many_connections")
                    return
                oldest = next(iter(guard.idle))
                oldest._close("evicted_idle")
                self.connections.discard(oldest)  # its connection_lost comes on a later turn of the loop
            self._waiting_since = self.loop.time()
            self._idle()
            self._arm()

        def _refuse(self, reason: str) -> None:
            guard.count(reason)
            self.connections.discard(self)
            self.transport.abort()

        def _idle(self) -> None:
            """From now until its headers are complete, this connection may make room for a newcomer."""
            guard.idle.pop(self, None)
            guard.idle[self] = None

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            guard.idle.pop(self, None)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                self._linger_left -= len(data)  # the rest of a body already answered: discarded unparsed
                if self._linger_left <= 0:
                    self._end_linger()
                return
            state = self.conn.their_state
            if state is h11.IDLE and self._guard_timer is None:
                # The first byte of a request after a response: its headers have header_timeout_s from now.
                self._waiting_since = self.loop.time()
                self._arm()
            elif state is h11.SEND_BODY:
                self._body_bytes += len(data)
                self._body_last = self.loop.time()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                guard.idle.pop(self, None)  # a request is in: not a connection to close for a newcomer
            if self.conn.their_state is h11.SEND_BODY and state is h11.IDLE:
                # Headers complete in this chunk: the body's clock starts (the part of the chunk past the
                # headers is not counted, which only makes the check kinder).
                self._body_since = self._body_last = self.loop.time()
                self._body_bytes = 0
            elif self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()  # the whole request is in; the response is the application's business

        def handle_events(self) -> None:
            super().handle_events()
            if self.scope is not None:
                self.scope["state"].setdefault(NEXT_REQUEST_WAITING, self._next_request_waiting)
                self.scope["state"].setdefault(BODY_UNFINISHED, self._body_unfinished)

        def _body_unfinished(self) -> bool:
            return self.conn.their_state is h11.SEND_BODY

        def _next_request_waiting(self) -> bool:
            # Bytes past the end of this request, in h11's buffer: the start of the next one.
            return self.conn.their_state is h11.DONE and bool(self.conn.trailing_data[0])

        def shutdown(self) -> None:
            if self.cycle is None or self.cycle.response_complete:
                super().shutdown()  # idle: closed now
            # Busy: its answer says Connection: close (the service does), or answers the pipelined request next.

        def on_response_complete(self) -> None:
            if not self._lingering:  # a linger (uvicorn closed after a Connection: close) keeps its own timer
                self._disarm()
            super().on_response_complete()  # arms uvicorn's keep-alive timer for the idle time that follows
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE:
                self._waiting_since = self.loop.time()
                self._idle()
            elif self.conn.their_state is h11.SEND_BODY:
                # Answered before its body ended, without Connection: close (the service adds it; uvicorn then
                # calls close(), which lingers): uvicorn would read the rest and keep the connection for the next
                # request, however long the rest takes.
                self._linger()

        def _linger(self) -> None:
            """Shut the write side (the answer is out), discard what still comes, close soon (see the module)."""
            self._lingering = True
            self._linger_left = guard.linger_bytes
            self._disarm()
            self._unset_keepalive_if_required()
            self._idle()  # evictable at the ceiling: the answer is given
            raw = self.transport.raw
            if raw.can_write_eof():
                raw.write_eof()
            self.flow.resume_reading()  # uvicorn may have paused reading for the unread body
            self._guard_timer = self.loop.call_later(guard.linger_s, self._end_linger)

        def _end_linger(self) -> None:
            self._disarm()
            guard.idle.pop(self, None)
            self.transport.raw.close()

        def _arm(self) -> None:
            self._disarm()
            self._guard_timer = self.loop.call_later(_CHECK_EVERY_S, self._check)

        def _disarm(self) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
                self._guard_timer = None

        def _check(self) -> None:
            self._guard_timer = None
            if self.transport.is_closing():
                return
            now = self.loop.time()
            state = self.conn.their_state
            if state is h11.IDLE and now - self._waiting_since >= guard.header_timeout_s:
                self._close("header_timeout")
                return
            if state is h11.SEND_BODY and self.flow.read_paused:
                # The application has not read what came (uvicorn stopped reading): not the client's slowness.
                self._body_since, self._body_bytes, self._body_last = now, 0, now
            elif state is h11.SEND_BODY:
                elapsed = now - self._body_since
                if now - self._body_last >= guard.body_idle_s or (
                        elapsed > guard.body_grace_s and self._body_bytes < guard.min_body_rate * elapsed):
                    self._close("slow_body")
                    return
            elif state is not h11.IDLE:
                return
            self._guard_timer = self.loop.call_later(_CHECK_EVERY_S, self._check)

        def _close(self, reason: str) -> None:
            guard.count(reason)
            guard.idle.pop(self, None)
            _log.debug("closing a connection from %s: %s", self.client, reason)
            if self.cycle is not None and not self.cycle.response_complete:
                self.scope["state"][CLOSED_BY_SERVICE] = reason  # the service's doing, not a client hang-up
            # No response: the request is incomplete, and a slow client is not owed the bytes. The application
            # (if a request is in flight) sees the client gone and stops its work.
            self.transport.abort()

    return GuardedH11Protocol


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: its ``close()`` of a connection whose request's body is still
    arriving (an answer that said ``Connection: close``) lingers instead (see the module). Everything else is the
    transport's own."""

    def __init__(self, raw: Any, protocol: Any) -> None:
        self.raw = raw
        self._protocol = protocol

    def close(self) -> None:
        protocol = self._protocol
        if protocol._lingering:
            return  # closed when the linger ends (within LINGER_S)
        if protocol._body_unfinished() and not self.raw.is_closing():
            protocol._linger()
            return
        self.raw.close()

    def is_closing(self) -> bool:
        return self._protocol._lingering or self.raw.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

"""A real HTTP server on 127.0.0.1 that serves files and misbehaves on demand, for download tests.

It speaks enough HTTP for a download client: ``GET`` of a path, ``Range: bytes=N-`` with ``If-Range`` (strong
``ETag`` or ``Last-Modified``), 206 with ``Content-Range``, 416. Faults are queued per request
(``server.faults``: the next request takes the first one), or apply to every request (``server.always``)::

    server.faults += [Fault(drop_after=1000), Fault(ignore_range=True)]
    server.always = Fault(status=503)

Every wait is bounded and ends when the server closes, so a test can never hang on it.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from dataclasses import dataclass
from email.utils import formatdate
from typing import Callable

_CHUNK = 1 << 14
_LONGEST_WAIT = 30.0


@dataclass
class Fault:
    """One way to misbehave (several may be combined); the default serves the file correctly."""

    status: int | None = None
    """Answer this status with a short text body instead of the file."""
    retry_after: str | None = None
    """``Retry-After`` header to send with ``status``."""
    delay: float = 0.0
    """Seconds to wait before answering at all (to make the client time out)."""
    drop_after: int | None = None
    """Close the connection after this many body bytes (the headers promised more)."""
    stall_after: int | None = None
    """After this many body bytes, wait until ``server.gate`` is set (or the server closes), then go on."""
    ignore_range: bool = False
    """Answer a range request with 200 and the whole file."""
    wrong_offset: int | None = None
    """Answer a range request with 206 whose body and ``Content-Range`` start at this offset instead."""
    html: bool = False
    """Serve an HTML error page with status 200."""
    body: bytes | None = None
    """Serve these bytes instead of the file (as if they were the file)."""
    content_type: str = "application/octet-stream"
    declared_length: int | None = None
    """``Content-Length`` to claim (the body sent is unchanged)."""
    after: Callable[[], None] | None = None
    """Called once this response has been sent (or dropped): e.g. to change the file on the server."""


@dataclass
class Request:
    path: str
    range: str | None
    if_range: str | None
    status: int = 0
    sent: int = 0
    """Body bytes written to the socket."""


@dataclass
class _Version:
    content: bytes
    etag: str
    last_modified: str


class FaultyServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1; ``requests`` records what each request asked for."""

    def __init__(self, files: dict[str, bytes] | None = None, *, etag: bool = True, last_modified: bool = True) -> None:
        self._files: dict[str, _Version] = {}
        self._generation = 0
        self.send_etag = etag
        self.send_last_modified = last_modified
        self.faults: list[Fault] = []
        self.always = Fault()
        self.requests: list[Request] = []
        self.gate = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        for path, content in (files or {}).items():
            self.put(path, content)
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.handle_error = lambda request, address: None  # a client that hangs up is not news
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def put(self, path: str, content: bytes) -> None:
        """Publish (or change) a file: a new version gets a new ETag and Last-Modified."""
        with self._lock:
            self._generation += 1
            self._files[path] = _Version(
                content=content,
                etag='"' + hashlib.sha256(content).hexdigest()[:20] + f'-{self._generation}"',
                last_modified=formatdate(1_600_000_000 + self._generation * 1000, usegmt=True),
            )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def file_requests(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def close(self) -> None:
        self._closing.set()
        self.gate.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _wait(self, seconds: float) -> None:
        self._closing.wait(min(seconds, _LONGEST_WAIT))

    def _next_fault(self) -> Fault:
        with self._lock:
            return self.faults.pop(0) if self.faults else self.always

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                record = Request(self.path, self.headers.get("Range"), self.headers.get("If-Range"))
                server.requests.append(record)
                fault = server._next_fault()
                self._after_done = False
                try:
                    self._answer(fault, record)
                except (BrokenPipeError, ConnectionResetError, socket.timeout):
                    pass
                finally:
                    self.close_connection = True
                    self._run_after(fault)

            def _run_after(self, fault: Fault) -> None:
                if fault.after is not None and not self._after_done:
                    self._after_done = True
                    fault.after()

            def _send(self, status: int, headers: dict[str, str], record: Request) -> None:
                record.status = status
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Connection", "close")
                self.end_headers()

            def _answer(self, fault: Fault, record: Request) -> None:
                if fault.delay:
                    server._wait(fault.delay)
                    if server._closing.is_set():
                        return
                if fault.status is not None:
                    body = f"HTTP {fault.status} from the test server\n".encode()
                    headers = {"Content-Type": "text/plain", "Content-Length": str(len(body))}
                    if fault.retry_after is not None:
                        headers["Retry-After"] = fault.retry_after
                    self._send(fault.status, headers, record)
                    self.wfile.write(body)
                    return
                if fault.html:
                    body = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please log in</body></html>\n"
                    self._send(200, {"Content-Type": "text/html; charset=utf-8", "Content-Length": str(len(body))}, record)
                    self.wfile.write(body)
                    return
                with server._lock:
                    version = server._files.get(self.path.split("?", 1)[0])
                if version is None:
                    body = b"not found\n"
                    self._send(404, {"Content-Type": "text/plain", "Content-Length": str(len(body))}, record)
                    self.wfile.write(body)
                    return
                content = fault.body if fault.body is not None else version.content
                validators = {}
                if server.send_etag:
                    validators["ETag"] = version.etag
                if server.send_last_modified:
                    validators["Last-Modified"] = version.last_modified
                start = self._range_start(version, fault)
                total = len(content)
                if start is not None and start >= total:
                    self._send(416, {"Content-Range": f"bytes */{total}", "Content-Length": "0", **validators}, record)
                    return
                headers = {"Content-Type": fault.content_type, "Accept-Ranges": "bytes", **validators}
                if start is None:
                    status, start = 200, 0
                else:
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{total - 1}/{total}"
                body = content[start:]
                headers["Content-Length"] = str(fault.declared_length if fault.declared_length is not None else len(body))
                self._send(status, headers, record)
                self._stream(body, fault, record)

            def _range_start(self, version: _Version, fault: Fault) -> int | None:
                """Where to start, or None for the whole file (no Range, a stale If-Range, or ignored)."""
                wanted = self.headers.get("Range")
                if not wanted or fault.ignore_range:
                    return None
                if not wanted.startswith("bytes=") or not wanted.endswith("-"):
                    return None
                try:
                    start = int(wanted[len("bytes="):-1])
                except ValueError:
                    return None
                condition = self.headers.get("If-Range")
                if condition is not None and condition not in (
                    version.etag if server.send_etag else None,
                    version.last_modified if server.send_last_modified else None,
                ):
                    return None  # the file changed: RFC 9110 says send it whole
                return fault.wrong_offset if fault.wrong_offset is not None else start

            def _stream(self, body: bytes, fault: Fault, record: Request) -> None:
                limit = fault.drop_after if fault.drop_after is not None else len(body)
                position = 0
                while position < min(limit, len(body)):
                    if fault.stall_after is not None and position >= fault.stall_after and not server.gate.is_set():
                        self.wfile.flush()
                        server.gate.wait(_LONGEST_WAIT)
                        if server._closing.is_set():
                            return
                    end = min(position + _CHUNK, limit, len(body))
                    if fault.stall_after is not None and position < fault.stall_after < end:
                        end = fault.stall_after
                    self.wfile.write(body[position:end])
                    record.sent += end - position
                    position = end
                self.wfile.flush()
                if fault.drop_after is not None:
                    # Promised more than it sent: close now, as a dropped connection does (after the hook, so
                    # that a retry cannot arrive before, say, the file has changed).
                    self._run_after(fault)
                    self.connection.shutdown(socket.SHUT_RDWR)

        return Handler

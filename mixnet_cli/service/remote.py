"""Classifying through a running ``mixnet serve``: what ``mixnet classify --server URL`` does.

Inputs are expanded and read here, as for a local run (files, directories, globs, stdin; URLs are fetched here,
not by the service), and sent as multipart ``image`` fields named by their input, a batch per request, a few
requests in flight; the service answers with the objects a local run prints, so the output is the same. An input
that cannot be read here gets its error in its place, as locally.

A thin client: the standard library's ``http.client`` (one kept-alive connection per sending thread), no numpy,
no image library, no engine and no requests (whose import alone took longer than a warm service's answer), so a
one-image call costs little more than the Python start. Proxies come from the usual variables (``http_proxy``,
``https_proxy``, ``no_proxy``), as they did with requests.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator
from urllib.parse import quote, unquote, urlencode, urlsplit

from ..base.errors import ImageError, ImageTooLargeError, ServiceError, UsageError
from ..images.inputs import InputItem

# Requests in flight at once: enough to keep a service's batcher fed while the next batch is read and sent.
REQUESTS_IN_FLIGHT = 4
# A full queue (503) is asked again after its Retry-After, this many times, before the run fails.
OVERLOAD_RETRIES = 5
_STATUSES_WITH_RESULTS = (200, 413, 422)
CONNECT_TIMEOUT = 10.0


def check_server_url(server: str) -> str:
    """``server`` when it is an http:// or https:// URL; else a :class:`~mixnet_cli.base.errors.UsageError` saying so."""
    from ..base.http import check_http_url

    return check_http_url(server, "--server", "http://127.0.0.1:8080")


def service_limits(server: str, token: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """What the service at ``server`` takes (its ``GET /v1/limits``: ``max_images_per_request``,
    ``max_body_bytes``...); empty for a service too old to say. Raises :class:`ServiceError` when it cannot be
    reached or refuses the token."""
    import http.client

    check_server_url(server)
    client = _Client(_Service(server, timeout, token))
    try:
        status, _, data = client.request("GET", client.service.target("", "/v1/limits"))
    except (OSError, http.client.HTTPException):
        raise ServiceError(f"cannot reach the service at {server.rstrip('/')}/v1/limits; is `mixnet serve` running "
                           "there?") from None
    finally:
        client.close()
    if status == 200:
        try:
            limits = dict(json.loads(data))
        except (ValueError, TypeError):
            limits = None
        if limits is None or not _limits_make_sense(limits):
            raise ServiceError(f"the service at {server} answered /v1/limits with something that is not its JSON; "
                               "is it `mixnet serve`?") from None
        return limits
    if status == 404:
        return {}
    if status == 401:
        raise _needs_token(server, token)
    raise ServiceError(f"the service at {server.rstrip('/')}/v1/limits answered {status}: {_message(status, data)}")


def classify_remote(server: str, items: Iterable[InputItem], *, model: str, topk: int | None, batch_size: int = 4,
                    timeout: float = 60.0, token: str | None = None) -> Iterator[dict[str, Any]]:
    """The result objects (``ClassificationResult.to_dict()``) of ``items``, in input order, classified by the
    service at ``server`` (``http://host:port``), sent with ``Authorization: Bearer token`` when given. Requests
    hold at most ``batch_size`` images, and no more images or bytes than the service's ``/v1/limits`` allow.
    Raises :class:`ServiceError` when it cannot be reached or refuses a request (a wrong token included),
    :class:`~mixnet_cli.base.errors.UsageError` for a bad model or top-k (its 400). A ``topk`` above the served
    model's classes (``/v1/limits``'s ``num_classes``) is clamped to them with a notice, as a local run does."""
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    from ..base.manifest import resolve_model

    model_name = resolve_model(model).name  # a bad name fails here, before any request
    check_server_url(server)
    service = _Service(server, timeout, token)
    limits = service_limits(server, token)
    batch_size = max(1, min(batch_size, int(limits.get("max_images_per_request") or batch_size)))
    max_bytes = int(limits.get("max_body_bytes") or 0) or None
    served_classes = (limits.get("num_classes") or {}).get(model_name)
    if topk is not None and served_classes:
        from ..results import check_topk

        # as a local run: more than the served model's classes is all of them, with the same notice
        topk = check_topk(topk, int(served_classes))
    query = urlencode({"model": model_name, **({"topk": topk} if topk is not None else {})})
    local = threading.local()  # a connection per sending thread
    clients: list[_Client] = []

    def read(item: InputItem) -> tuple[str, bytes] | dict[str, Any]:
        from ..images.encoded import read_image_bytes
        from ..results import ClassificationResult

        try:
            data = read_image_bytes(item.load(), item.name)
            if max_bytes is not None and _part_cost(item.name, data) > max_bytes:
                # Sent, it would only earn the whole batch the service's 413 (or a connection it closes early).
                raise ImageTooLargeError(
                    f"{item.name}: {len(data)} bytes is over what the service at {server.rstrip('/')} takes in one "
                    f"request ({max_bytes} bytes, its --max-body-mb); classify it locally, or on a service with a "
                    "higher limit")
            return item.name, data
        except ImageError as exc:  # as a local run reports it, in its place
            return ClassificationResult(input=item.name, model=model_name, error=exc).to_dict()

    def send(batch: list[InputItem]) -> list[dict[str, Any]]:
        if not hasattr(local, "client"):
            local.client = _Client(service)
            clients.append(local.client)
        prepared = [read(item) for item in batch]
        files = [entry for entry in prepared if isinstance(entry, tuple)]
        rows: list[dict[str, Any]] = []
        for part in _within_bytes(files, max_bytes):
            rows.extend(local.client.classify(query, part))
        answers = iter(rows)
        return [entry if isinstance(entry, dict) else _named(next(answers), entry[0]) for entry in prepared]

    pool = ThreadPoolExecutor(max_workers=REQUESTS_IN_FLIGHT, thread_name_prefix="mixnet-remote")
    in_flight: deque[Future[list[dict[str, Any]]]] = deque()
    try:
        batch: list[InputItem] = []
        for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                in_flight.append(pool.submit(send, batch))
                batch = []
                while len(in_flight) >= REQUESTS_IN_FLIGHT:
                    yield from in_flight.popleft().result()
        if batch:
            in_flight.append(pool.submit(send, batch))
        while in_flight:
            yield from in_flight.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for client in clients:
            client.close()


def _named(row: Any, name: str) -> Any:
    """The service's row for the input ``name``, under that exact name: multipart file names travel escaped
    (``"`` as ``%22``) and the service reads them as they came, so its echo of a name is not always the name."""
    if isinstance(row, dict) and "input" in row:
        row["input"] = name  # the key keeps its place: the row prints as a local run's
    return row


class _Service:
    """Where requests go: the service's ``/v1/classify`` and, when the environment names one for it, the proxy."""

    def __init__(self, server: str, timeout: float, token: str | None = None) -> None:
        parts = urlsplit(server.strip())
        self.https = parts.scheme.lower() == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.path = parts.path.rstrip("/") + "/v1/classify"
        self.endpoint = server.rstrip("/") + "/v1/classify"
        self.timeout = timeout
        self.token = token
        self.proxy = _proxy_for(parts.scheme.lower(), self.host)

    def connect(self) -> Any:
        import http.client

        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        if self.proxy is None:
            connection = kind(self.host, self.port, timeout=CONNECT_TIMEOUT)
        else:
            proxy_host, proxy_port, proxy_headers = self.proxy
            connection = kind(proxy_host, proxy_port, timeout=CONNECT_TIMEOUT)
            if self.https:
                connection.set_tunnel(self.host, self.port, headers=proxy_headers)
        connection.connect()
        connection.sock.settimeout(self.timeout)  # connecting may take 10 s, an answer up to the timeout
        return connection

    def target(self, query: str, path: str | None = None) -> str:
        """The request target: the path (``/v1/classify`` unless given, below the server's own), or (through a
        plain-HTTP proxy) the whole URL."""
        path = quote(self.path if path is None else self.path[:-len("/v1/classify")] + path)
        if query:
            path = f"{path}?{query}"
        if self.proxy is not None and not self.https:
            return f"http://{self.host}:{self.port}{path}"
        return path


def _proxy_for(scheme: str, host: str) -> tuple[str, int, dict[str, str]] | None:
    """The proxy (host, port, its authorisation header) the environment names for ``scheme`` and ``host``, or None."""
    if not any(name.lower() in ("http_proxy", "https_proxy", "all_proxy") for name in os.environ):
        return None  # the usual case, without importing urllib.request
    import base64
    import urllib.request

    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    headers = {}
    if parts.username is not None:
        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(secret).decode("ascii")
    return parts.hostname or "", parts.port or 80, headers


def _field_name(value: str) -> str:
    # As browsers, curl and requests (urllib3 2) write a multipart file name: UTF-8, with CR, LF and '"'
    # percent-encoded (the WHATWG HTML standard), so the service reads back the name a local run prints.
    return value.translate({10: "%0A", 13: "%0D", 34: "%22"})


def multipart_body(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body of one ``image`` field per (name, bytes), and its content type."""
    boundary = os.urandom(16).hex()  # (not the secrets module: it imports hashlib and OpenSSL for nothing here)
    parts = []
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{_field_name(name)}"'
                     f"\r\nContent-Type: application/octet-stream\r\n\r\n".encode("utf-8"))
        parts.append(data)
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class _Client:
    """One kept-alive connection to the service, for one sending thread."""

    def __init__(self, service: _Service) -> None:
        self.service = service
        self.connection: Any = None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def request(self, method: str, target: str, body: bytes | None = None,
                content_type: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request on the kept-alive connection: status, headers (lower-case names) and body."""
        if self.connection is None:
            self.connection = self.service.connect()
        headers = {"Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if self.service.token:
            headers["Authorization"] = f"Bearer {self.service.token}"
        self.connection.request(method, target, body=body, headers=headers)
        response = self.connection.getresponse()
        data = response.read()
        headers = {name.lower(): value for name, value in response.getheaders()}
        if response.will_close:
            self.close()
        return response.status, headers, data

    def classify(self, query: str, files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        import http.client

        service = self.service
        body, content_type = multipart_body(files)
        target = service.target(query)
        reused = self.connection is not None
        for attempt in range(OVERLOAD_RETRIES + 1):
            try:
                status, headers, data = self.request("POST", target, body, content_type)
            except TimeoutError:
                self.close()
                raise ServiceError(f"{service.endpoint} did not answer within {service.timeout:g} s; try again") \
                    from None
            except (http.client.HTTPException, OSError):
                self.close()
                if reused:
                    # A kept-alive connection the service closed just as this request went out: classifying is
                    # safe to repeat, once, on a new connection.
                    reused = False
                    continue
                raise ServiceError(f"cannot reach the service at {service.endpoint}; is `mixnet serve` running "
                                   "there?") from None
            if status == 503 and attempt < OVERLOAD_RETRIES:
                from ..base.http import parse_retry_after

                wait = parse_retry_after(headers.get("retry-after"))  # seconds or a date; None: unreadable
                time.sleep(min(1.0 if wait is None else wait, 10.0))
                continue
            break
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if status in _STATUSES_WITH_RESULTS and isinstance(answer, list):
            return answer
        message = _message(status, data)
        if status == 401:
            raise _needs_token(service.endpoint, service.token)
        if status == 400:
            raise UsageError(message)
        raise ServiceError(f"the service at {service.endpoint} answered {status}: {message}")


def _message(status: int, data: bytes) -> str:
    """The service's one-line message in an error answer, or the bare status."""
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return str(answer["error"].get("message"))
    return f"HTTP {status}"


def _part_cost(name: str, data: bytes) -> int:
    """The bytes a file takes in a multipart body: its own, its part's headers and delimiter (name included)."""
    return len(data) + 512 + 3 * len(name.encode("utf-8"))


def _within_bytes(files: list[tuple[str, bytes]], max_bytes: int | None) -> Iterator[list[tuple[str, bytes]]]:
    """``files`` in consecutive groups whose multipart bodies fit ``max_bytes`` (the caller keeps a file alone over
    it from being sent: it goes alone should one come)."""
    group: list[tuple[str, bytes]] = []
    size = 0
    for entry in files:
        cost = _part_cost(*entry)
        if group and max_bytes is not None and size + cost > max_bytes:
            yield group
            group, size = [], 0
        group.append(entry)
        size += cost
    if group:
        yield group


def _limits_make_sense(limits: dict[str, Any]) -> bool:
    """Whether the numbers the client uses from ``/v1/limits`` are what `mixnet serve` writes (counts as positive
    whole numbers), so that an odd server is one line, not an error deep in the client."""
    def count(value: Any) -> bool:
        return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)

    classes = limits.get("num_classes")
    return (count(limits.get("max_images_per_request")) and count(limits.get("max_body_bytes"))
            and (classes is None or (isinstance(classes, dict) and all(map(count, classes.values())))))


def _needs_token(where: str, sent: str | None) -> ServiceError:
    """The 401's message: no token was sent, or the one sent is not the service's."""
    if sent:
        return ServiceError(f"the service at {where} refused the token given (--token-file or MIXNET_SERVE_TOKEN); "
                            "check that it is the one the service was started with")
    return ServiceError(f"the service at {where} needs its token: give --token-file FILE or set MIXNET_SERVE_TOKEN")

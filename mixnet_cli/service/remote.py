"""Classifying through a running ``mixnet serve``: what ``mixnet classify --server URL`` does.

Inputs are expanded and read here, as for a local run (files, directories, globs, stdin; URLs are fetched here,
not by the service), and sent as multipart ``image`` fields named by their input, a batch per request, a few
requests in flight; the service answers with the objects a local run prints, so the output is the same. An input
that cannot be read here gets its error in its place, as locally.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator

from ..base.errors import ImageError, ServiceError, UsageError
from ..images.inputs import InputItem

# Requests in flight at once: enough to keep a service's batcher fed while the next batch is read and sent.
REQUESTS_IN_FLIGHT = 4
# A full queue (503) is asked again after its Retry-After, this many times, before the run fails.
OVERLOAD_RETRIES = 5
_STATUSES_WITH_RESULTS = (200, 413, 422)


def check_server_url(server: str) -> str:
    """``server`` when it is an http:// or https:// URL; else a :class:`~mixnet_cli.base.errors.UsageError` saying so."""
    from ..base.http import check_http_url

    return check_http_url(server, "--server", "http://127.0.0.1:8080")


def service_limits(server: str, token: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """What the service at ``server`` takes (its ``GET /v1/limits``: ``max_images_per_request``,
    ``max_body_bytes``...); empty for a service too old to say. Raises :class:`ServiceError` when it cannot be
    reached or refuses the token."""
    import requests

    endpoint = server.rstrip("/") + "/v1/limits"
    try:
        response = requests.get(endpoint, headers=_auth(token), timeout=timeout)
    except requests.RequestException:
        raise ServiceError(f"cannot reach the service at {endpoint}; is `mixnet serve` running there?") from None
    if response.status_code == 200:
        return dict(response.json())
    if response.status_code == 404:
        return {}
    if response.status_code == 401:
        raise ServiceError(f"the service at {server} needs its token: give --token-file FILE or set "
                           "MIXNET_SERVE_TOKEN")
    raise ServiceError(f"the service at {endpoint} answered {response.status_code}: {_message(response)}")


def classify_remote(server: str, items: Iterable[InputItem], *, model: str, topk: int, batch_size: int = 4,
                    timeout: float = 60.0, token: str | None = None) -> Iterator[dict[str, Any]]:
    """The result objects (``ClassificationResult.to_dict()``) of ``items``, in input order, classified by the
    service at ``server`` (``http://host:port``), sent with ``Authorization: Bearer token`` when given. Requests
    hold at most ``batch_size`` images, and no more images or bytes than the service's ``/v1/limits`` allow.
    Raises :class:`ServiceError` when it cannot be reached or refuses a request (a wrong token included),
    :class:`~mixnet_cli.base.errors.UsageError` for a bad model or top-k (its 400)."""
    import requests

    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    from ..base.manifest import resolve_model

    model_name = resolve_model(model).name  # a bad name fails here, before any request
    check_server_url(server)
    endpoint = server.rstrip("/") + "/v1/classify"
    limits = service_limits(server, token)
    batch_size = max(1, min(batch_size, int(limits.get("max_images_per_request") or batch_size)))
    # Room for the multipart headers of each part: a few hundred bytes each.
    max_bytes = int(limits.get("max_body_bytes") or 0) or None
    sessions: list[Any] = []
    local = threading.local()  # a requests session per sending thread (sessions are not meant to be shared)

    def read(item: InputItem) -> tuple[str, bytes] | dict[str, Any]:
        from ..classifier import ClassificationResult
        from ..images.preprocess import read_image_bytes

        try:
            return item.name, read_image_bytes(item.load(), item.name)
        except ImageError as exc:  # as a local run reports it, in its place
            return ClassificationResult(input=item.name, model=model_name, error=exc).to_dict()

    def send(batch: list[InputItem]) -> list[dict[str, Any]]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            sessions.append(local.session)
        prepared = [read(item) for item in batch]
        files = [("image", (entry[0], entry[1], "application/octet-stream")) for entry in prepared
                 if isinstance(entry, tuple)]
        rows: list[dict[str, Any]] = []
        for part in _within_bytes(files, max_bytes):
            rows.extend(_post(local.session, endpoint, part, model_name, topk, timeout, token))
        answers = iter(rows)
        return [entry if isinstance(entry, dict) else next(answers) for entry in prepared]

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
        for session in sessions:
            session.close()


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return f"HTTP {response.status_code}"


def _within_bytes(files: list[Any], max_bytes: int | None) -> Iterator[list[Any]]:
    """``files`` in consecutive groups whose bodies fit ``max_bytes`` (a file alone over it goes alone: the
    service answers its 413 in its place)."""
    group: list[Any] = []
    size = 0
    for entry in files:
        cost = len(entry[1][1]) + 512  # a part's own headers and delimiter
        if group and max_bytes is not None and size + cost > max_bytes:
            yield group
            group, size = [], 0
        group.append(entry)
        size += cost
    if group:
        yield group


def _post(session: Any, endpoint: str, files: list[Any], model: str, topk: int, timeout: float,
          token: str | None = None) -> list[dict[str, Any]]:
    import time

    import requests

    reset = False
    for attempt in range(OVERLOAD_RETRIES + 1):
        try:
            response = session.post(endpoint, params={"model": model, "topk": topk}, files=files,
                                     headers=_auth(token), timeout=(10.0, timeout))
        except requests.ConnectionError:
            if not reset:
                # A kept-alive connection the service closed just as this request went out: classifying is
                # safe to repeat, once, on a new connection.
                reset = True
                continue
            raise ServiceError(f"cannot reach the service at {endpoint}; is `mixnet serve` running there?") from None
        except requests.Timeout:
            raise ServiceError(f"{endpoint} did not answer within {timeout:g} s; try again") from None
        if response.status_code == 503 and attempt < OVERLOAD_RETRIES:
            time.sleep(min(float(response.headers.get("Retry-After", "1") or 1), 10.0))
            continue
        break
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code in _STATUSES_WITH_RESULTS and isinstance(body, list):
        return body
    message = body["error"]["message"] if isinstance(body, dict) and isinstance(body.get("error"), dict) else \
        f"HTTP {response.status_code}"
    if response.status_code == 400:
        raise UsageError(message)
    if response.status_code == 401:
        raise ServiceError(f"the service at {endpoint} needs its token: give --token-file FILE or set "
                           "MIXNET_SERVE_TOKEN")
    raise ServiceError(f"the service at {endpoint} answered {response.status_code}: {message}")


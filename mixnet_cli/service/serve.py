"""``mixnet serve``: a local HTTP classification service, on Starlette and uvicorn (the ``[serve]`` extra).

Models are loaded (downloaded, converted, compiled for every batch size the batcher runs) in a thread while the
server already answers ``/healthz``; ``/readyz`` says 503 until they are. ``POST /v1/classify`` takes one image
as the raw body, or several as multipart ``image`` fields, and answers with the objects ``mixnet classify --json``
prints (one object, or a list in request order). Each image is decoded in a thread of its own pool while the
engine runs, and waits for its forward pass in its model's :class:`~mixnet_cli.service.batching.DynamicBatcher`.

Limits, each answered at once: a full queue or a shutdown (the one overload answer: JSON 503 with
``Retry-After``), a body over the size limit or more images than a request may ever hold (413), an image over
the pixel limit of ``classify`` (413), a request not answered within its deadline (504), a bad or unknown
parameter or a model not served (400, with the CLI's one-line message), bytes that are not an image (422), a
missing token (401). Every request passes :class:`ServiceGate` (token, shutdown, metrics, access log), whatever
module its route comes from. Connections are limited below HTTP (``connections.py``: header timeout, minimum
body rate), and only images count against the service's capacity. The service never reads a local path: images
arrive as bytes, or, only with ``allow_urls``, from http(s) URLs on public addresses (``url_fetch.py``).

For another protocol's endpoints on the same models (routes passed to :func:`create_app`): the token and the
metrics come with :class:`ServiceGate`; admission is :meth:`Service.admitted`, deadlines and the shutdown
:meth:`Service.within`, decoding and batching :meth:`Service.classify` (or :meth:`Service.preprocess` and the
model's batcher), bodies :func:`read_body`, a client hanging up ``handling.py`` (499), refusals
:class:`RequestError` rendered by :func:`error_response`.

Your own fine-tuned MixNet (``weights``, with ``labels``) is served alone, named as ``classify`` names it (its
architecture: ``MixNet_S``...), with its own classes: ``topk`` and the answers' labels follow them.

Starlette, uvicorn and prometheus_client are imported inside the functions that need them, so the rest of the
package (and ``mixnet --help``) works without the extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

from .batching import DynamicBatcher
from .connections import (BODY_UNFINISHED, CLOSED_BY_SERVICE, DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEP_ALIVE_S,
                          DEFAULT_MAX_CONNECTIONS, NEXT_REQUEST_WAITING, ConnectionGuard)
# ClientGone and client_gone were defined here first: still importable from here.
from .handling import (DEADLINE_PASSED, BodyBudget, ClientGone, ImageLoader, bytes_loader,  # noqa: F401
                       cancelled_by_deadline, client_gone, compressed_body, until_client_gone)
from .memory import MemoryTrimmer
from .maps import OPENAPI_PARAMETERS, OPENAPI_PATH, CamRequest, cam_request, classify_with_maps
from ..base.errors import ImageError, ImageTooLargeError, MixnetError, Overloaded, UsageError
from ..base.parsing import ascii_whole_number, whole_number
from ..base.third_party import restore_stop_signals
from ..base.settings import load_token  # noqa: F401 (read where the CLI and the service both reach it)

if TYPE_CHECKING:
    import socket

    from ..classifier import Classifier
    from ..base.manifest import ModelSpec

DEFAULT_TOPK = 5
# Measured in BENCHMARKS.md ("Serve", the batching options): on a 2-core CPU, 8 and 16 were slower than 4 at 16
# clients in every run, and 1, 2 and 4 were within the noise of each other (a forward pass of 4 costs about 4 of
# one there); 4 keeps batching where it pays (more cores, OpenVINO, a GPU) and is `classify`'s batch size. 2 ms of
# waiting lets requests that arrive together share a pass and adds at most 2 ms to one alone.
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_MAX_WAIT_MS = 2.0
DEFAULT_MAX_QUEUE = 64
DEFAULT_DEADLINE_S = 30.0
# The longest deadline_ms a request may name (a day); the service's own deadline caps it anyway.
MAX_DEADLINE_MS = 86_400_000
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Bodies being received share this many times --max-body-mb (128 MB by default): a few large uploads at once, and
# thousands of slow ones (each holds what it has sent), while a flood of large bodies is refused (503) before it
# fills memory.
BODY_BUDGET_BODIES = 4
# Kubernetes waits 30 s (terminationGracePeriodSeconds) before it kills; 20 s leaves room for the models to be
# released and the process to exit.
DEFAULT_GRACEFUL_TIMEOUT_S = 20.0
# Requests in flight at SIGTERM are answered (504 at worst) this long before the graceful timeout ends, so that
# none is cut off without an answer.
_DRAIN_MARGIN_S = 2.0
# After a second interrupt, the requests in flight have this long to be answered 503 before uvicorn stops waiting.
_FORCED_EXIT_S = 1.0
# Multipart fields besides the images (none are read; a few are tolerated, as curl or a browser may add them).
MAX_OTHER_FIELDS = 16
# Paths answered without a token: probes must work for a load balancer or kubelet that holds no secret.
# "/": the page holds no data and asks for the token itself when the service answers it 401.
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
# The query parameters each endpoint takes; any other is a 400 naming it.
QUERY_PARAMETERS = {"/v1/classify": ("model", "topk", "deadline_ms", "url", "cam", "cam_class")}
# Latency buckets (seconds) from a warm single image (~10 ms) to the default deadline.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_IMAGES_PER_S_WINDOW = 10.0

_log = logging.getLogger(__name__)
access_log = logging.getLogger("mixnet_cli.access")


def serve_missing() -> str | None:
    """The line that says what to install when the ``[serve]`` extra is missing (None: it is installed)."""
    from ..base.third_party import install_hint, module_installed

    # python-multipart is imported as python_multipart since 0.0.13, as multipart before.
    missing = [name for name, modules in (("starlette", ("starlette",)), ("uvicorn", ("uvicorn",)),
                                          ("python-multipart", ("python_multipart", "multipart")),
                                          ("prometheus-client", ("prometheus_client",)))
               if not any(module_installed(module) for module in modules)]
    if not missing:
        return None
    return f"mixnet serve needs the [serve] extra ({', '.join(missing)} missing): {install_hint('serve')}"


@dataclass(frozen=True)
class ServeOptions:
    """What ``mixnet serve`` runs: models (the first is the default of a request), where it listens, its limits.

    ``models`` are released models (none: MixNet_S). ``weights`` is your own fine-tuned MixNet (.pdparams), served
    as the only model; ``models`` then names at most one, the architecture the file must be (none: read from it).
    ``labels`` is a label file for the served classes (PaddleClas's ``<id> <name>`` per line, or one name per line).
    ``max_wait_ms`` is how long a batch waits for more images after its first; ``max_queue`` bounds the images
    admitted per model and not yet answered; ``deadline_s`` bounds each request (a request may ask for less with
    ``deadline_ms``); ``workers`` is the number of decode threads, ``threads`` the CPU threads of a forward pass
    (both default to the physical cores). ``allow_private_urls`` lets URLs reach loopback, private and other
    non-public addresses. ``token``: every request but the health probes (and ``/metrics`` with
    ``public_metrics``) must carry ``Authorization: Bearer <token>``. ``header_timeout_s`` bounds the time to a
    request's complete headers, ``keep_alive_s`` an idle connection between requests, ``graceful_timeout_s``
    the shutdown after SIGTERM; ``max_connections`` the connections open at once (at the ceiling, the one idle
    longest is closed for a newcomer).
    """

    models: tuple[str, ...] = ()
    weights: Path | None = None
    labels: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    max_queue: int = DEFAULT_MAX_QUEUE
    deadline_s: float = DEFAULT_DEADLINE_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    allow_urls: bool = False
    workers: int | None = None
    threads: int | None = None
    device: str = "auto"
    engine: str = "auto"
    precision: str = "fp32"  # or bf16 (opt-in: OpenVINO on a CPU with bf16 arithmetic)
    mirrors: tuple[str, ...] | None = None
    offline: bool | None = None
    log_format: str = "text"
    access_log: bool = True
    allow_private_urls: bool = False
    token: str | None = field(default=None, repr=False)  # never in a repr, a log line or an error message
    public_metrics: bool = False
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    graceful_timeout_s: float = DEFAULT_GRACEFUL_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def check(self) -> None:
        """Raise :class:`UsageError` for a value no service can run with."""
        if self.weights is not None and len(self.models) > 1:
            # With --weights, --model names the file's architecture (as for classify): one file, one architecture.
            raise UsageError(f"--weights {self.weights} is served alone: give at most one --model (its architecture, "
                             "S, M or L), or none to read it from the file; serve released models from another "
                             "process")
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_connections < 1:
            raise UsageError("--max-batch-size, --max-queue and --max-connections must be at least 1")
        if self.max_wait_ms < 0 or not math.isfinite(self.max_wait_ms):
            raise UsageError(f"--max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        if self.deadline_s <= 0 or self.max_body_bytes < 1:
            raise UsageError("--deadline and --max-body-mb must be above 0")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535, got {self.port}")
        for name, value in (("--header-timeout", self.header_timeout_s), ("--keep-alive", self.keep_alive_s),
                            ("--graceful-timeout", self.graceful_timeout_s)):
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"{name} must be above 0 seconds, got {value}")
        if self.token is not None and not self.token:
            raise UsageError("the token is empty; put a secret in the --token-file or MIXNET_SERVE_TOKEN")
        if self.log_format not in ("text", "json"):
            raise UsageError(f"--log-format must be text or json, got {self.log_format!r}")


class RequestError(MixnetError):
    """A request the service refuses as a whole: ``status`` is its HTTP status, ``headers`` any extra ones."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.kind, "message": str(self)}}


def image_error_status(error: MixnetError) -> int:
    """The HTTP status of an image that could not be classified: 413 over a size or pixel limit, else 422."""
    return 413 if isinstance(error, ImageTooLargeError) else 422


@dataclass
class _LoadedModel:
    classifier: "Classifier"
    batcher: DynamicBatcher


@dataclass
class _ImageThroughput:
    """Images answered in the last few seconds, for the images/s gauge."""

    window_s: float = _IMAGES_PER_S_WINDOW
    events: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, count: int) -> None:
        self.events.append((time.monotonic(), count))

    def per_second(self) -> float:
        now = time.monotonic()
        while self.events and self.events[0][0] < now - self.window_s:
            self.events.popleft()
        return sum(count for _, count in self.events) / self.window_s


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (several services may share a process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("mixnet_http_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("mixnet_http_request_duration_seconds", "Time from request to response, by endpoint",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("mixnet_batch_size", "Images per forward pass, by model", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_seconds = Histogram("mixnet_batch_duration_seconds", "Time of one forward pass, by model",
                                       ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("mixnet_queue_depth", "Images admitted and not yet answered, by model", ["model"],
                                 registry=self.registry)
        self.images = Counter("mixnet_images", "Images classified, by model", ["model"], registry=self.registry)
        self.throughput = _ImageThroughput()
        images_per_s = Gauge("mixnet_images_per_second", f"Images classified per second over the last "
                             f"{_IMAGES_PER_S_WINDOW:g} s", registry=self.registry)
        images_per_s.set_function(self.throughput.per_second)
        self.ready = Gauge("mixnet_ready", "1 once every model is loaded (0 again from SIGTERM)",
                           registry=self.registry)
        self.dropped = Counter("mixnet_images_dropped", "Images dropped before their forward pass because their "
                               "answer would come past the request's deadline, by model", ["model"],
                               registry=self.registry)
        self.connections_closed = Counter("mixnet_connections_closed", "Connections closed by the service's own "
                                          "limits, by reason", ["reason"], registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_ENDPOINTS = ("/v1/classify", "/v1/limits", "/healthz", "/readyz", "/metrics", "/openapi.json", "/")


class Service:
    """The state behind the HTTP routes: options, loaded models, thread pools, metrics, readiness.

    Raises :class:`UsageError` for options no service can run with, and for your own weights or labels that
    cannot be served (:class:`~mixnet_cli.base.errors.WeightsError` for a file that is not MixNet weights)."""

    def __init__(self, options: ServeOptions, on_load_failure: Callable[[BaseException], None] | None = None,
                 url: str = "") -> None:
        from ..engines.base import physical_cores

        options.check()
        self.options = options
        self.url = url or _url(options.host, options.port)
        self.specs = _served_specs(options)
        # Each model once, by its full name, in the order given; the first is a request's default.
        self.model_names = list(self.specs)
        self.models: dict[str, _LoadedModel] = {}
        self.metrics = Metrics()
        self.ready = False
        self.load_error: BaseException | None = None
        self._on_load_failure = on_load_failure
        workers = options.workers or physical_cores()
        self.decoders = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mixnet-decode")
        self.guard = ConnectionGuard(header_timeout_s=options.header_timeout_s,
                                     max_connections=options.max_connections)
        self.guard.on_close = lambda reason: self.metrics.connections_closed.labels(reason).inc()
        # Bodies being received: bounded apart from the images' admission (see read_body).
        self.trimmer = MemoryTrimmer()  # large bodies' memory back to the OS once their requests end
        # One body's worth of the budget is kept for bodies of up to a quarter of that (photos).
        self.bodies = BodyBudget(BODY_BUDGET_BODIES * options.max_body_bytes, on_body=self.trimmer.body_read,
                                 reserve=options.max_body_bytes, small=options.max_body_bytes // 4)
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs
        self.draining = False
        self.forced = False  # a second interrupt: the requests in flight are answered 503 at once
        self._end_moved: asyncio.Future[None] | None = None  # resolved when _drain_end moves
        self._drain_end = math.inf
        self._pixels: Any = None  # a PixelBudget, made on the event loop
        self._inference: ThreadPoolExecutor | None = None
        self._loader: threading.Thread | None = None

    # -- what any endpoint module uses (auth, admission, limits, deadlines) --------------------------------------

    def authorized(self, headers: Any) -> bool:
        """Whether a request's headers carry the service's token (``Authorization: Bearer <token>``); always true
        when the service has none. The comparison takes the same time however much of the token matches."""
        token = self.options.token
        if token is None:
            return True
        scheme, _, given = (headers.get("authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def is_public(self, path: str) -> bool:
        """Whether ``path`` is answered without the token: the health probes, and /metrics with --public-metrics."""
        return path in PUBLIC_PATHS or (path == "/metrics" and self.options.public_metrics)

    def limits(self) -> dict[str, Any]:
        """What a client must stay within (``GET /v1/limits``): images per request, body bytes, pixels per image,
        the deadline (seconds), the models and the classes of each (the largest top-k)."""
        from ..images.preprocess import MAX_PIXELS

        return {"max_images_per_request": self.options.max_queue, "max_body_bytes": self.options.max_body_bytes,
                "max_pixels_per_image": MAX_PIXELS, "deadline_s": self.options.deadline_s,
                "max_batch_size": self.options.max_batch_size, "models": self.model_names,
                # the top-k a request may ask for, by model: a client clamps to it as a local run does
                "num_classes": {name: spec.num_classes for name, spec in self.specs.items()},
                "urls": "public" if self.options.allow_urls and not self.options.allow_private_urls else
                        "any" if self.options.allow_urls else "off"}

    def check_query(self, path: str, query: Any) -> None:
        """:class:`RequestError` (400) naming the query parameters ``path`` does not take."""
        known = QUERY_PARAMETERS.get(path, ())
        unknown = sorted({key for key in query.keys() if key not in known})
        if unknown:
            takes = f"it takes {', '.join(known)}" if known else "it takes none"
            raise RequestError(400, "UsageError", f"unknown query parameter{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(unknown)} on {path}; {takes}")

    def drain(self) -> None:
        """SIGTERM: refuse new requests from now on, turn /readyz 503, and cut the deadlines of the requests in
        flight to end before the graceful timeout. Call it on the event loop."""
        self.draining = True
        self.guard.drain()
        self.metrics.ready.set(0)
        if self.loop is not None:
            self._move_drain_end(self.loop.time() + max(0.5, self.options.graceful_timeout_s - _DRAIN_MARGIN_S))

    def force_stop(self) -> None:
        """A second interrupt during the drain (Ctrl-C twice): every request in flight is answered now with the
        JSON 503 (its work cancelled), so that the server can exit at once without cutting anyone off without
        an answer. Call it on the event loop."""
        if not self.draining:
            self.drain()
        self.forced = True
        if self.loop is not None:
            self._move_drain_end(self.loop.time())

    def _move_drain_end(self, end: float) -> None:
        self._drain_end = min(self._drain_end, end)
        if self._end_moved is not None and not self._end_moved.done():
            self._end_moved.set_result(None)
        self._end_moved = None

    async def within(self, work: Awaitable[Any], deadline_s: float) -> Any:
        """``work``'s result, or :class:`asyncio.TimeoutError` once ``deadline_s`` has passed or, after SIGTERM,
        when the graceful timeout is about to end (``work`` is then cancelled, with the message
        :data:`~mixnet_cli.service.handling.DEADLINE_PASSED`); :class:`Overloaded` when a second interrupt stops
        the service at once (:meth:`force_stop`)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        task = asyncio.ensure_future(work)
        try:
            while not task.done():
                left = min(end, self._drain_end) - loop.time()
                if left <= 0:
                    task.cancel(DEADLINE_PASSED)
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    if self.forced:
                        raise Overloaded("the service is stopping now (interrupted twice); send the request to "
                                         "another instance", retry_after=1)
                    raise asyncio.TimeoutError
                if self._end_moved is None:
                    self._end_moved = loop.create_future()
                await asyncio.wait([task, self._end_moved], timeout=left, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        return task.result()

    # -- life cycle ---------------------------------------------------------------------------------------------

    def start_loading(self) -> None:
        """Load every model in a thread; the event loop keeps answering meanwhile (``/readyz``: 503)."""
        loop = asyncio.get_running_loop()

        def load() -> None:
            try:
                classifiers = [self._load(name) for name in self.model_names]
            except BaseException as exc:  # noqa: BLE001 (reported by the command, which exits with it)
                loop.call_soon_threadsafe(self._failed, exc)
                return
            loop.call_soon_threadsafe(self._loaded, classifiers)

        self._loader = threading.Thread(target=load, name="mixnet-load", daemon=True)
        self._loader.start()

    def _load(self, name: str) -> "Classifier":
        from .batching import batch_ladder
        from ..classifier import Classifier

        options = self.options
        _log.info("loading %s%s...", name, f" (your weights {options.weights})" if options.weights else "")
        classifier = Classifier(name, device=options.device, engine=options.engine, threads=options.threads,
                                precision=options.precision,
                                mirrors=list(options.mirrors) if options.mirrors else None, offline=options.offline,
                                progress=False, weights=options.weights, labels=options.labels)
        # Every batch size the batcher runs, once: OpenVINO compiles a model per size (cached on disk), which
        # belongs here rather than in a request's time.
        import numpy as np

        size = classifier.spec.preprocessing.crop_size
        for batch in batch_ladder(options.max_batch_size):
            classifier.probabilities([np.zeros((3, size, size), dtype=np.float32)] * batch)
        _log.info("%s ready (%s)", name, classifier.engine.detail)
        return classifier

    def _loaded(self, classifiers: list["Classifier"]) -> None:
        options = self.options
        # Loaded in a thread, paddle's import could not put the stop signals back itself (main thread only).
        restore_stop_signals()
        self._inference = ThreadPoolExecutor(max_workers=sum(c.engine.parallel for c in classifiers),
                                             thread_name_prefix="mixnet-infer")
        for classifier in classifiers:
            name = classifier.architecture  # the name the service knows it by (its --model)

            def on_batch(size: int, seconds: float, name: str = name) -> None:
                self.metrics.batch_size.labels(name).observe(size)
                self.metrics.batch_seconds.labels(name).observe(seconds)
                self.metrics.images.labels(name).inc(size)
                self.metrics.throughput.add(size)

            batcher = DynamicBatcher(classifier.probabilities, self._inference,
                                     max_batch_size=options.max_batch_size, max_wait_s=options.max_wait_ms / 1000.0,
                                     max_queue=options.max_queue, parallel=classifier.engine.parallel,
                                     on_batch=on_batch, on_drop=self.metrics.dropped.labels(name).inc)
            batcher.start()
            self.metrics.queue_depth.labels(name).set_function(lambda batcher=batcher: batcher.depth)
            self.models[name] = _LoadedModel(classifier, batcher)
        self.ready = True
        self.metrics.ready.set(1)
        _log.info("ready: %s on %s", ", ".join(self.model_names), self.url)

    def _failed(self, exc: BaseException) -> None:
        self.load_error = exc
        if self._on_load_failure is not None:
            self._on_load_failure(exc)

    async def close(self) -> None:
        """After the server has finished its requests: stop the batchers and the threads (after a forced stop,
        without waiting for the decodes and forward passes still running, whose answers nobody waits for)."""
        for model in self.models.values():
            await model.batcher.close()
        self.decoders.shutdown(wait=not self.forced, cancel_futures=True)
        if self._inference is not None:
            self._inference.shutdown(wait=not self.forced, cancel_futures=True)

    # -- one request --------------------------------------------------------------------------------------------

    def parameters(self, query: Any) -> tuple[str, int, float, str | None]:
        """Model name, top-k, deadline (seconds) and URL from a request's query; :class:`RequestError` (400)
        with the CLI's message for a bad one."""
        from ..classifier import check_topk
        from ..base.manifest import resolve_model

        try:
            requested = query.get("model")
            # Your own weights also by the name their answers carry (my_flowers-3fa2c1d), not only their
            # architecture's.
            name = next((arch for arch, loaded in self.models.items()
                         if requested and loaded.classifier.model_name == requested), None)
            if name is None:
                name = resolve_model(requested).name if requested else self.model_names[0]
            if name not in self.model_names and self.options.weights is not None:
                raise UsageError(f"model {name} is not served here; this service serves your own weights alone, as "
                                 f"{self.model_names[0]}")
            if name not in self.model_names:
                raise UsageError(f"model {name} is not served here; served: {', '.join(self.model_names)} "
                                 "(start the service with --model to add it)")
            raw_topk = query.get("topk")
            # Default 5, or every class of a model with fewer, as for classify.
            topk = check_topk(None if raw_topk in (None, "") else whole_number(raw_topk, "topk"),
                              self.specs[name].num_classes, clamp=False)
            deadline = self.options.deadline_s
            if query.get("deadline_ms") is not None:
                asked = whole_number(query.get("deadline_ms"), "deadline_ms", 1, MAX_DEADLINE_MS)
                deadline = min(deadline, asked / 1000.0)
            url = query.get("url")
            if url is not None:
                from ..images.inputs import is_url

                if not self.options.allow_urls:
                    raise UsageError("fetching image URLs is off in this service; send the image's bytes instead "
                                     "(or start it with --allow-urls)")
                if not is_url(url):
                    raise UsageError(f"url must start with http:// or https://, got {url!r}")
                from .url_fetch import url_target

                url_target(url)  # a URL that cannot be fetched as written: the same 400 before any admission
        except UsageError as exc:
            raise RequestError(400, type(exc).__name__, str(exc)) from None
        return name, topk, deadline, url

    @contextlib.contextmanager
    def admitted(self, model_name: str) -> Iterator[Callable[[int], None]]:
        """Room in the model's queue for one request's images, taken through the function given (call it with
        the count once the body is read and the images are known); all of it given back when the request ends,
        however it ends. Raises :class:`Overloaded` at once when the queue is full already (before the body is
        read: a flood is refused without being read), and from the function when the images do not fit.

        A body in transit holds no room in the queue: slow uploads take nobody's place. What bodies cost while
        they arrive is bounded apart, by :attr:`bodies` (see :func:`read_body`)."""
        batcher = self.models[model_name].batcher
        batcher.check_room(1)
        held = 0

        def hold(count: int) -> None:
            nonlocal held
            if count > batcher.max_queue:
                # Never admissible, however long the client waits: not a 503 to retry.
                raise RequestError(413, "TooManyImages",
                                   f"{count} images in one request; this service takes at most {batcher.max_queue} "
                                   "per request (see /v1/limits); send them in smaller requests")
            if count > held:
                batcher.admit(count - held)
                held = count

        try:
            yield hold
        finally:
            batcher.release(held)

    async def fetch(self, url: str, deadline_s: float) -> bytes:
        """An image URL's bytes, fetched in async I/O (no decode thread waits on it) within ``deadline_s`` and the
        body limit, from a public address unless ``allow_private_urls``. Raises :class:`~mixnet_cli.base.errors.ImageError` (the image's
        422 or 413), or :class:`RequestError` (400) for an address the service does not fetch from."""
        from .url_fetch import BadURL, ForbiddenAddress, fetch_image

        try:
            return await fetch_image(url, deadline_s=deadline_s,
                                     max_bytes=self.options.max_body_bytes,
                                     allow_private=self.options.allow_private_urls)
        except ForbiddenAddress as exc:
            raise RequestError(400, "ForbiddenURL", str(exc)) from None
        except BadURL as exc:
            raise RequestError(400, "BadURL", str(exc)) from None

    async def preprocess(self, model_name: str, name: str, data: bytes) -> Any:
        """One image's network input (``3 x S x S`` float32), decoded in the decode pool within the shared pixel
        budget (:meth:`decode`)."""
        return await self.decode(data, self.models[model_name].classifier.preprocess, data, name)

    async def decode(self, data: bytes, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)``, which decodes the image file ``data``, in the decode pool within the shared pixel
        budget: huge images are decoded a few at a time, small ones pass beside them. Whatever decodes an image
        in the service (the batcher's inputs, the maps) goes through here. A request that is gone (its deadline,
        a hang-up) cancels work that has not started; work that has keeps its pixels until it ends."""
        from .batching import PixelBudget
        from ..images.preprocess import MAX_PIXELS, header_pixels

        if self._pixels is None:
            self._pixels = PixelBudget(MAX_PIXELS)
        pixels = header_pixels(data)  # PNG and JPEG, here at once
        if pixels is None:  # another format: Pillow's header reader, in a decode thread
            pixels = await asyncio.get_running_loop().run_in_executor(
                self.decoders, partial(header_pixels, data, other_formats=True))
        # No size known (damaged, or a format only OpenCV reads): small files are cheap, others take a big share.
        if pixels is None:
            pixels = MAX_PIXELS // 4 if len(data) > 1024 * 1024 else 1
        return await self._pixels.run(pixels, self.decoders, work, *args)

    async def classify(self, model_name: str, topk: int, images: list[tuple[str, ImageLoader]],
                       deadline: float | None = None, rows: bool = False,
                       cam: CamRequest | None = None) -> list[Any]:
        """Classify named images with one model, room for them held with :meth:`admitted`: a
        :class:`ClassificationResult` each (with ``rows``, each image's row of probabilities instead, ``classes``
        float64: the v2 protocol's output). Each loader, awaited, gives the image's encoded bytes (at hand:
        :func:`~mixnet_cli.service.handling.bytes_loader`; or a URL being fetched). An image that cannot be read
        gets its error in its place. ``deadline`` (the loop's clock) lets the batcher drop an image whose answer
        would come too late, before its forward pass. ``cam``: each with its class activation map, from the
        classifier's map engine, outside the batcher."""
        from ..classifier import ClassificationResult

        model = self.models[model_name]

        if cam is not None:
            try:
                return await classify_with_maps(model.classifier, model_name, topk, images, cam, self.decode)
            except UsageError as exc:
                raise RequestError(400, type(exc).__name__, str(exc)) from None

        async def one(name: str, load: ImageLoader) -> Any:
            try:
                array = await self.preprocess(model_name, name, await load())
                row = await model.batcher.submit(array, deadline=deadline)
                return row if rows else model.classifier.result(name, row, topk)
            except ImageError as exc:
                return ClassificationResult(input=name, model=model.classifier.model_name, error=exc,
                                            architecture=model.classifier.architecture)
            except asyncio.CancelledError as exc:
                if cancelled_by_deadline(exc):  # cut off while fetched, decoded or queued: dropped at the deadline
                    self.metrics.dropped.labels(model_name).inc()
                raise

        tasks = [asyncio.ensure_future(one(name, load)) for name, load in images]
        why: tuple[Any, ...] = ()
        try:
            return list(await asyncio.gather(*tasks))
        except asyncio.CancelledError as exc:
            why = exc.args  # the deadline's message (if it is one), for every image cut off
            raise
        except asyncio.TimeoutError:
            why = (DEADLINE_PASSED,)  # the batcher dropped an image past the deadline: the others go with it
            raise
        finally:
            for task in tasks:  # one image past its deadline ends the request: the others need no more work
                task.cancel(*why)


def _served_specs(options: ServeOptions) -> dict[str, "ModelSpec"]:
    """The served models by name, in order. Your own weights are read and checked here, with their label file,
    so that a wrong file is one line before the service starts (:class:`UsageError`, :class:`WeightsError`)."""
    from ..base.manifest import resolve_model

    if options.weights is None:
        specs = [resolve_model(name) for name in options.models or ("MixNet_S",)]
    else:
        from ..weights.store import custom_weights

        specs = [custom_weights(options.weights, resolve_model(options.models[0]) if options.models else None).spec]
    if options.labels is not None:
        from ..images.labels import read_label_file

        for spec in specs:
            read_label_file(options.labels, spec.num_classes, released=None if spec.custom else spec.name)
    return {spec.name: spec for spec in specs}


async def read_body(receive: Callable[[], Awaitable[dict[str, Any]]], limit: int, declared: str | None,
                    budget: BodyBudget | None = None) -> bytes:
    """The request body, refused with 413 as soon as it is known to pass ``limit`` bytes (declared or read);
    :class:`ClientGone` when the client hangs up before its end.

    With ``budget`` (the bytes all bodies being received may hold), the bytes are taken from it as they arrive and
    given back once the body is in; :class:`Overloaded` (the JSON 503 with ``Retry-After``) when the declared
    ``Content-Length`` does not fit in what is left at the start, or when the body outgrows the budget."""
    too_large = RequestError(413, "RequestTooLarge",
                             f"the request body is over the service's limit of {limit} bytes; send smaller or "
                             "fewer images per request (see /v1/limits)")
    expected = ascii_whole_number(declared) or 0
    if expected > limit:
        raise too_large
    full = Overloaded("the service is receiving too many request bodies at once; try again shortly",
                      retry_after=1)
    if budget is not None and not budget.fits(expected, expected):
        raise full
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            if size + len(chunk) > limit:
                raise too_large
            if budget is not None:
                if not budget.fits(len(chunk), max(expected, size + len(chunk))):
                    raise full
                budget.take(len(chunk))
            size += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    finally:
        if budget is not None:
            budget.give_back(size)
            if budget.on_body is not None:
                budget.on_body(size)


def multipart_images(body: bytes, content_type: str, max_images: int) -> list[tuple[str, bytes]]:
    """The ``image`` parts of a multipart body, in order, as (file name, bytes). Blocking (run it in a thread):
    the parts are counted first, at C speed, so a body of thousands of parts is refused (413, naming the limit)
    before any is parsed. Raises :class:`RequestError`."""
    try:
        from python_multipart.multipart import MultipartParser, parse_options_header
    except ImportError:  # python-multipart before 0.0.13
        from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef]

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestError(400, "UsageError", "the multipart body has no boundary in its Content-Type; send files "
                           "as -F image=@cat.jpg")
    # n parts have n delimiters and one closing delimiter; the boundary cannot occur inside a part (RFC 2046).
    parts = body.count(b"--" + boundary) - 1
    if parts > max_images + MAX_OTHER_FIELDS:
        raise RequestError(413, "TooManyParts", f"{parts} parts in the multipart body; this service takes at most "
                           f"{max_images} images per request (see /v1/limits); send them in smaller requests")
    found: list[tuple[dict[bytes, bytes], list[bytes]]] = []
    header = [b"", b""]

    def on_part_begin() -> None:
        found.append(({}, []))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        found[-1][0][header[0].strip().lower()] = header[1].strip()
        header[0] = header[1] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        found[-1][1].append(data[start:end])

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data})
    try:
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # noqa: BLE001 (python-multipart's errors vary by version)
        raise RequestError(400, "UsageError", f"cannot parse the multipart body ({exc})") from None
    images = []
    for index, (headers, data) in enumerate(found):
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        if disposition.get(b"name") != b"image":
            continue
        if b"filename" not in disposition:
            raise RequestError(400, "UsageError", "the 'image' field must be a file upload (curl -F image=@cat.jpg)")
        filename = disposition[b"filename"].decode("utf-8", errors="replace")
        images.append((filename or f"image{index}", b"".join(data)))
    if not images:
        raise RequestError(400, "UsageError", "no 'image' field in the form; send files as -F image=@cat.jpg")
    return images


def error_response(exc: RequestError, path: str = "") -> Any:
    """The JSON answer of a refusal: ``{"error": {"type", "message"}}`` (``{"error": message}`` under /v2/, the
    Open Inference Protocol's form), with the error's headers."""
    from starlette.responses import JSONResponse

    body: Any = {"error": str(exc)} if path.startswith("/v2/") else exc.body()
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def overloaded(message: str, retry_after: int = 1) -> RequestError:
    """The one overload refusal: 503, JSON, with ``Retry-After``."""
    return RequestError(503, "Overloaded", message, {"Retry-After": str(retry_after)})


def create_app(service: Service, routes: Any = ()) -> Any:
    """The ASGI application of ``service``: its routes (and ``routes`` added beside them, e.g. another protocol's
    endpoints on the same models), all behind :class:`ServiceGate` (token, shutdown, metrics, access log)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from .oip import routes as oip_routes

    def error(exc: RequestError) -> Any:
        return error_response(exc)

    async def routing_error(request: Any, exc: Any) -> Any:
        """Starlette's router answers a path it lacks (404) or a method a route does not take (405) in plain
        text: here they get the error object every other refusal has, saying what the service does answer."""
        path = request.url.path
        if exc.status_code == 404:
            return error_response(RequestError(
                404, "NotFound", f"no endpoint {path}; this service answers POST /v1/classify and GET /healthz, "
                "/readyz, /metrics, /openapi.json, /v1/limits", exc.headers), path)
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            return error_response(RequestError(405, "MethodNotAllowed", f"{request.method} is not allowed on "
                                  f"{path}; use {allowed or 'another method'}", exc.headers), path)
        return error_response(RequestError(exc.status_code, "HTTPError", str(exc.detail), exc.headers), path)

    async def classify(request: Any) -> Any:
        try:
            service.check_query("/v1/classify", request.query_params)
            name, topk, deadline, url = service.parameters(request.query_params)
            if not service.ready:
                raise RequestError(503, "NotReady", "the models are still loading; try again shortly (see /readyz)",
                                   {"Retry-After": "1"})
            compressed = compressed_body(request.headers)
            if compressed is not None:
                raise RequestError(415, "UnsupportedMediaType", compressed)
            request.state.model = name
            try:
                request.state.cam = cam_request(request.query_params, service.specs[name].num_classes)
            except UsageError as exc:
                raise RequestError(400, type(exc).__name__, str(exc)) from None
            try:
                return await service.within(answer(request, name, topk, url, deadline), deadline)
            except asyncio.TimeoutError:
                raise RequestError(504, "DeadlineExceeded",
                                   f"no answer within the deadline of {deadline:g} s; try again, or send fewer or "
                                   "smaller images") from None
        except RequestError as exc:
            return error(exc)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it: it is there for the metrics and the access log
        except Overloaded as exc:
            return error(overloaded(str(exc), exc.retry_after))
        except Exception as exc:  # noqa: BLE001 (an engine failure, or a bug: one JSON line, not a traceback page)
            _log.error("%s: %s", type(exc).__name__, exc)
            return error(RequestError(500, type(exc).__name__, str(exc) if isinstance(exc, MixnetError) else
                                      f"unexpected {type(exc).__name__}: {exc} (a bug; please report it)"))

    async def answer(request: Any, name: str, topk: int, url: str | None, deadline: float) -> Any:
        ends = asyncio.get_running_loop().time() + deadline
        with service.admitted(name) as hold:
            return await answer_admitted(request, name, topk, url, deadline, ends, hold)

    async def answer_admitted(request: Any, name: str, topk: int, url: str | None, deadline: float, ends: float,
                              hold: Callable[[int], None]) -> Any:
        content_type = request.headers.get("content-type", "")
        multipart = content_type.startswith("multipart/form-data")
        body = await read_body(request.receive, service.options.max_body_bytes, request.headers.get("content-length"),
                               service.bodies)
        images: list[tuple[str, ImageLoader]]
        if url is not None:
            from ..base import settings

            fetch_deadline = min(deadline, settings.url_deadline())
            images = [(url, lambda: service.fetch(url, fetch_deadline))]
        elif multipart:
            parts = await asyncio.get_running_loop().run_in_executor(
                None, multipart_images, body, content_type, service.options.max_queue)
            del body  # the parts hold their bytes; the body's copy can go now
            images = [(filename, bytes_loader(data)) for filename, data in parts]
        elif body:
            images = [("-", bytes_loader(body))]
        else:
            raise RequestError(400, "UsageError", "empty request: send an image as the body "
                               "(curl --data-binary @cat.jpg) or as multipart 'image' fields")
        request.state.images = len(images)
        hold(len(images))
        # The body is read: from here the only message left is the client hanging up, which ends the work.
        results = await until_client_gone(service.classify(name, topk, images, deadline=ends,
                                                           cam=request.state.cam), request.receive)
        failed = [result.error for result in results if result.error is not None]
        status = image_error_status(failed[0]) if failed else 200
        rows = [result.to_dict() for result in results]
        return JSONResponse(rows if multipart else rows[0], status_code=status)

    async def home(request: Any) -> Any:
        """The service's own page (one static file, no data in it): photos in, top-5 bars and heat maps out."""
        from .maps import page

        html, headers = page()
        return Response(html, media_type="text/html; charset=utf-8", headers=headers)

    async def healthz(request: Any) -> Any:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Any) -> Any:
        if service.draining:
            return JSONResponse({"status": "stopping", "models": service.model_names}, status_code=503)
        if service.ready:
            return JSONResponse({"status": "ready", "models": service.model_names})
        return JSONResponse({"status": "loading", "models": service.model_names}, status_code=503,
                            headers={"Retry-After": "1"})

    async def limits(request: Any) -> Any:
        try:
            service.check_query("/v1/limits", request.query_params)
        except RequestError as exc:
            return error(exc)
        return JSONResponse(service.limits())

    async def metrics(request: Any) -> Any:
        content, media_type = service.metrics.render()
        return Response(content, media_type=media_type)

    async def openapi(request: Any) -> Any:
        return JSONResponse(openapi_document(service))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        service.loop = asyncio.get_running_loop()
        service.start_loading()
        yield
        await service.close()

    app = Starlette(routes=[
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/v1/limits", limits, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/", home, methods=["GET"]),
        # The Open Inference Protocol v2, on the same models, batchers and limits.
        *oip_routes(service, image_status=image_error_status, read_body=lambda request: read_body(
            request.receive, service.options.max_body_bytes, request.headers.get("content-length"),
            service.bodies)),
        *routes,
    ], lifespan=lifespan, exception_handlers={HTTPException: routing_error})
    # Starlette answers /v1/limits/ with a 307 to a Location built from the client's Host header: here a path the
    # service lacks is its JSON 404, like any other.
    app.router.redirect_slashes = False
    return ServiceGate(app, service)


class ServiceGate:
    """ASGI middleware in front of every endpoint, of whatever module: the token (401 without it, except on
    :data:`PUBLIC_PATHS`), the shutdown (from SIGTERM a new request is 503 and every answer closes its
    connection), and every HTTP request counted and timed in the metrics and, when asked, logged (one line on
    stderr, text or JSON; credentials in a URL blotted out)."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        answered = False
        scope.setdefault("state", {})
        service = self.service
        path = scope.get("path", "")

        async def observe(message: dict[str, Any]) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = int(message["status"])
                answered = True
                waiting = scope["state"].get(NEXT_REQUEST_WAITING)
                unfinished = scope["state"].get(BODY_UNFINISHED)
                if (service.draining and not (waiting is not None and waiting())) or (
                        unfinished is not None and unfinished()):
                    # h11 closes the connection after an answer that says so: no next request on it. One already
                    # pipelined behind this one is read instead, and refused (503) with this header. An answer
                    # given before its request's body ended closes too (after a linger: see connections.py),
                    # rather than read the rest of a body nobody will use, however long it takes.
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            refusal = self.refusal(scope, path)
            if refusal is not None:
                await error_response(refusal, path)(scope, receive, observe)
            else:
                await self.app(scope, receive, observe)
        except asyncio.CancelledError:
            if not service.draining:
                raise
            # The server stops and cancels what is left (its graceful timeout, or a forced exit): the client gets
            # the JSON 503 rather than uvicorn's plain-text 500, and the log no traceback.
            if not answered:
                with contextlib.suppress(Exception):
                    await error_response(overloaded("the service is stopping; send the request to another "
                                                    "instance"), path)(scope, receive, observe)
        finally:
            if scope["state"].get(CLOSED_BY_SERVICE):
                # The guard closed the connection (a body slower than the minimum rate): not the client's hang-up
                # (499). Counted as nginx counts a body timeout, 408, and by its reason in connections_closed.
                status = 408
            elapsed = time.perf_counter() - started
            # A route may name its endpoint itself (the v2 ones: a template, not the model's name in the path).
            endpoint = scope["state"].get("endpoint") or (
                path if path in _ENDPOINTS else "/v2" if path.startswith("/v2/") else "other")
            service.trimmer.request_ended()
            metrics = service.metrics
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(elapsed)
            if service.options.access_log:
                self._log(scope, path, status, elapsed)

    def refusal(self, scope: dict[str, Any], path: str) -> RequestError | None:
        """Why this request is refused before any endpoint sees it (None: it is not)."""
        from starlette.datastructures import Headers

        service = self.service
        if not service.is_public(path) and not service.authorized(Headers(scope=scope)):
            return RequestError(401, "Unauthorized", "this service needs a token: send the header "
                                "'Authorization: Bearer <token>' with the token it was started with",
                                {"WWW-Authenticate": "Bearer"})
        if service.draining and path not in PUBLIC_PATHS:
            return overloaded("the service is shutting down; send the request to another instance")
        return None

    def _log(self, scope: dict[str, Any], path: str, status: int, elapsed: float) -> None:
        client = scope.get("client") or ("-", 0)
        state = scope.get("state", {})
        query = redact_credentials(scope.get("query_string", b"").decode("latin-1"))
        if self.service.options.log_format == "json":
            now = time.time()
            entry = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
                "client": client[0], "method": scope.get("method"), "path": path,
                "query": query, "status": status,
                "duration_ms": round(elapsed * 1000, 3), "model": state.get("model"), "images": state.get("images"),
            }
            access_log.info(json.dumps(entry))
        else:
            access_log.info('%s "%s %s%s" %d %.1f ms', client[0], scope.get("method"), _printable(path),
                            f"?{_printable(query)}" if query else "", status, elapsed * 1000)


def _printable(text: str) -> str:
    """``text`` escaped as the JSON log escapes it (control characters, quotes, backslashes, non-ASCII), so that
    a path with ``%0a`` in it cannot write a second, forged line into the text access log."""
    return json.dumps(text)[1:-1]


# user:password@ after http(s)://, plain or percent-encoded (as a URL in a query string is).
_URL_CREDENTIALS = re.compile(r"(?i)(https?(?::|%3A)(?:/|%2F){2})[^/?#&@]*?(?:@|%40)")


def redact_credentials(text: str) -> str:
    """``text`` with the user and password of every http(s) URL in it replaced by ``***``."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def openapi_document(service: Service) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the service's endpoints."""
    from .. import __version__
    from .oip import openapi_paths as oip_openapi_paths

    classes = max(spec.num_classes for spec in service.specs.values())
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["type", "message"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}
    result = {
        "type": "object", "required": ["input", "model"],
        "description": "The object `mixnet classify --json` prints: `predictions` or `error`, never both.",
        "properties": {
            "input": {"type": "string", "description": "file name of the part, '-' for a raw body, or the URL"},
            "model": {"type": "string"},
            "predictions": {"type": "array", "items": {"type": "object", "properties": {
                "class_id": {"type": "integer", "minimum": 0, "maximum": classes - 1},
                "label": {"type": "string"}, "score": {"type": "number"}}}},
            "error": error["properties"]["error"],
        },
    }
    json_error = {"content": {"application/json": {"schema": error}}}
    results = {"content": {"application/json": {"schema": {"oneOf": [result, {"type": "array", "items": result}]}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "mixnet serve", "version": __version__,
                 "description": "ImageNet-1k classification with PaddleClas's MixNet models." if
                 service.options.weights is None else
                 f"Classification into {classes} classes with your own fine-tuned MixNet."},
        "paths": {
            "/v1/classify": {"post": {
                "summary": "Classify one image (raw body) or several (multipart 'image' fields, answered as a list "
                           "in request order)",
                "parameters": [
                    {"name": "model", "in": "query", "schema": {"type": "string", "enum": service.model_names},
                     "description": f"default {service.model_names[0]}; S, M, L spellings are accepted"},
                    {"name": "topk", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": classes,
                                                                "default": min(DEFAULT_TOPK, classes)}},
                    {"name": "deadline_ms", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_DEADLINE_MS},
                     "description": "a shorter deadline than the service's own"},
                    {"name": "url", "in": "query", "schema": {"type": "string"},
                     "description": "an http(s) image URL to fetch instead of a body (only with --allow-urls)"},
                    *OPENAPI_PARAMETERS,
                ],
                "requestBody": {"content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {"schema": {"type": "object", "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
                }},
                "responses": {
                    "200": {"description": "every image classified", **results},
                    "400": {"description": "a bad parameter, an unknown one, a model not served, or a URL the "
                                           "service does not fetch", **json_error},
                    "401": {"description": "a token is required and was not sent", **json_error},
                    "405": {"description": "a method other than POST", **json_error},
                    "413": {"description": "body over the size limit, more images or parts than a request may "
                                           "hold (see /v1/limits), or an image over the pixel limit",
                            **json_error},
                    "415": {"description": "a compressed body (Content-Encoding)", **json_error},
                    "422": {"description": "an image that cannot be read (the body holds every image's object)",
                            **results},
                    "503": {"description": "not ready, the queue is full, or shutting down (see Retry-After)",
                            **json_error},
                    "504": {"description": "not answered within the deadline", **json_error},
                },
            }},
            "/": OPENAPI_PATH,
            "/healthz": {"get": {"summary": "The process answers", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Every model is loaded", "responses": {
                "200": {"description": "ready"}, "503": {"description": "still loading, or shutting down"}}}},
            "/v1/limits": {"get": {"summary": "What a request may hold: images, body bytes, pixels, deadline",
                                   "responses": {"200": {"description": "limits", "content": {
                                       "application/json": {"schema": {"type": "object"}}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format)", "responses": {
                "200": {"description": "metrics", "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}},
            **oip_openapi_paths(service),
        },
    }


def run(options: ServeOptions) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, finish the requests in flight and return.

    Raises :class:`~mixnet_cli.base.errors.MixnetError` when the ``[serve]`` extra is missing or the address cannot
    be listened on, :class:`~mixnet_cli.base.errors.UsageError` or :class:`~mixnet_cli.base.errors.WeightsError` for your
    own weights or labels that cannot be served (before serving), and the error that stopped a model from loading
    (the service then shuts down).
    """
    missing = serve_missing()
    if missing is not None:
        raise MixnetError(missing)
    import uvicorn

    options.check()
    if options.access_log and not access_log.handlers:
        access_log.addHandler(_AccessLines())
        access_log.setLevel(logging.INFO)
        access_log.propagate = False  # the line alone, without the "mixnet: " of the library's notices

    # The socket first: an address in use is one line before anything loads, and port 0 gets its real number.
    listener = listen(options.host, options.port)
    host, port = listener.getsockname()[:2]
    server: Any = None

    def stop_on_failure(exc: BaseException) -> None:
        server.should_exit = True

    try:
        service = Service(options, on_load_failure=stop_on_failure, url=_url(host, port))
    except BaseException:
        listener.close()  # your own weights or labels refused: nothing was served
        raise
    from .connections import guarded_protocol

    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="on", server_header=False,
                            # h11 with the header, body and connection limits uvicorn lacks (connections.py).
                            http=guarded_protocol(service.guard),
                            # No limit_concurrency: it counts connections, so idle ones would get every request a
                            # plain-text 503. Admission is by images in each model's queue, once a body is read.
                            timeout_keep_alive=max(1, int(math.ceil(options.keep_alive_s))),
                            timeout_graceful_shutdown=int(math.ceil(options.graceful_timeout_s)))

    class Server(uvicorn.Server):  # type: ignore[misc]
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT and service.loop is not None:
                # Ctrl-C during the drain: stop now, as uvicorn does, but answer every request in flight (the
                # JSON 503) first rather than let uvicorn cancel them into plain-text 500s and tracebacks. A
                # second SIGTERM changes nothing: the graceful timeout bounds the drain.
                service.loop.call_soon_threadsafe(self.force_stop)
                return
            super().handle_exit(sig, frame)
            if service.loop is not None:
                # From the signal handler to the loop: /readyz 503 and no new request from its next turn.
                service.loop.call_soon_threadsafe(service.drain)

        def force_stop(self) -> None:
            if service.forced:
                return
            _log.warning("interrupted again: answering the requests in flight 503 and stopping now")
            service.force_stop()
            # The answers are written on the next turns of the loop; then uvicorn stops waiting for anything.
            service.loop.call_later(_FORCED_EXIT_S, setattr, self, "force_exit", True)

    server = Server(config)
    if options.token is None and not _loopback(host):
        _log.warning("listening on %s without a token: anyone who can reach it can use it (--token-file or "
                     "MIXNET_SERVE_TOKEN)", service.url)
    _log.info("listening on %s (/readyz answers 200 once the models are loaded)", service.url)
    # uvicorn handles SIGTERM and SIGINT itself (stop accepting, finish requests in flight), then raises the
    # signal again for the handler that was there before: a no-op one, so that a clean stop exits 0.
    previous = {number: signal.signal(number, lambda *_: None) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[listener])
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        listener.close()
    if service.load_error is not None:
        raise service.load_error
    _log.info("stopped")


class _AccessLines(logging.Handler):
    """Access log lines on whatever ``sys.stderr`` is when each is written, one per line."""

    def emit(self, record: logging.LogRecord) -> None:
        import sys

        try:
            sys.stderr.write(record.getMessage() + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 (a log line must never take a request down)
            self.handleError(record)


def listen(host: str, port: int) -> "socket.socket":
    """A TCP socket bound to ``host:port`` (0: any free port); :class:`MixnetError` when it cannot be."""
    import socket

    try:
        family, kind, protocol = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
    except socket.gaierror as exc:
        raise MixnetError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    # The protocol named (IPPROTO_TCP, not 0): asyncio turns Nagle's algorithm off only on sockets that say they
    # are TCP, and with it on, a response's headers and body, written apart, wait out a delayed ACK (40 ms).
    listener = socket.socket(family, kind, protocol)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise MixnetError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or "
                          "--host") from None
    return listener


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

"""``mixnet serve``: a local HTTP classification service, on Starlette and uvicorn (the ``[serve]`` extra).

Models are loaded (downloaded, converted, compiled for every batch size the batcher runs) in a thread while the
server already answers ``/healthz``; ``/readyz`` says 503 until they are. ``POST /v1/classify`` takes one image
as the raw body, or several as multipart ``image`` fields, and answers with the objects ``mixnet classify --json``
prints (one object, or a list in request order). Each image is decoded in a thread of its own pool while the
engine runs, and waits for its forward pass in its model's :class:`~mixnet_cli.service.batching.DynamicBatcher`.

Limits, each answered at once: a full queue (503 with ``Retry-After``), a body over the size limit (413), an
image over the pixel limit of ``classify`` (413), a request not answered within its deadline (504), a bad
parameter or a model not served (400, with the CLI's one-line message), bytes that are not an image (422).
The service never reads a local path: images arrive as bytes, or, only with ``allow_urls``, from http(s) URLs
fetched with the deadline and size cap of ``classify``.

Your own fine-tuned MixNet (``weights``, with ``labels``) is served alone, named as ``classify`` names it (its
architecture: ``MixNet_S``...), with its own classes: ``topk`` and the answers' labels follow them.

Starlette, uvicorn and prometheus_client are imported inside the functions that need them, so the rest of the
package (and ``mixnet --help``) works without the extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

from .batching import DynamicBatcher
from ..base.errors import ImageError, ImageTooLargeError, MixnetError, Overloaded, UsageError

if TYPE_CHECKING:
    import socket

    from ..classifier import ClassificationResult, Classifier
    from ..base.manifest import ModelSpec

SERVE_EXTRA = 'pip install "mixnet-cli[serve]"'
DEFAULT_TOPK = 5
# Measured in BENCHMARKS.md ("Serve", the batching options): on a 2-core CPU, 8 and 16 were slower than 4 at 16
# clients in every run, and 1, 2 and 4 were within the noise of each other (a forward pass of 4 costs about 4 of
# one there); 4 keeps batching where it pays (more cores, OpenVINO, a GPU) and is `classify`'s batch size. 2 ms of
# waiting lets requests that arrive together share a pass and adds at most 2 ms to one alone.
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_MAX_WAIT_MS = 2.0
DEFAULT_MAX_QUEUE = 64
DEFAULT_DEADLINE_S = 30.0
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Latency buckets (seconds) from a warm single image (~10 ms) to the default deadline.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_IMAGES_PER_S_WINDOW = 10.0

_log = logging.getLogger(__name__)
access_log = logging.getLogger("mixnet_cli.access")


def serve_missing() -> str | None:
    """The line that says what to install when the ``[serve]`` extra is missing (None: it is installed)."""
    from ..base.third_party import module_installed

    # python-multipart is imported as python_multipart since 0.0.13, as multipart before.
    missing = [name for name, modules in (("starlette", ("starlette",)), ("uvicorn", ("uvicorn",)),
                                          ("python-multipart", ("python_multipart", "multipart")),
                                          ("prometheus-client", ("prometheus_client",)))
               if not any(module_installed(module) for module in modules)]
    if not missing:
        return None
    return f"mixnet serve needs the [serve] extra ({', '.join(missing)} missing): {SERVE_EXTRA}"


@dataclass(frozen=True)
class ServeOptions:
    """What ``mixnet serve`` runs: models (the first is the default of a request), where it listens, its limits.

    ``models`` are released models (none: MixNet_S). ``weights`` is your own fine-tuned MixNet (.pdparams), served
    as the only model; ``models`` then names at most one, the architecture the file must be (none: read from it).
    ``labels`` is a label file for the served classes (PaddleClas's ``<id> <name>`` per line, or one name per line).
    ``max_wait_ms`` is how long a batch waits for more images after its first; ``max_queue`` bounds the images
    admitted per model and not yet answered; ``deadline_s`` bounds each request (a request may ask for less with
    ``deadline_ms``); ``workers`` is the number of decode threads, ``threads`` the CPU threads of a forward pass
    (both default to the physical cores).
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

    def check(self) -> None:
        """Raise :class:`UsageError` for a value no service can run with."""
        if self.weights is not None and len(self.models) > 1:
            # With --weights, --model names the file's architecture (as for classify): one file, one architecture.
            raise UsageError(f"--weights {self.weights} is served alone: give at most one --model (its architecture, "
                             "S, M or L), or none to read it from the file; serve released models from another "
                             "process")
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise UsageError("--max-batch-size and --max-queue must be at least 1")
        if self.max_wait_ms < 0 or not math.isfinite(self.max_wait_ms):
            raise UsageError(f"--max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        if self.deadline_s <= 0 or self.max_body_bytes < 1:
            raise UsageError("--deadline and --max-body-mb must be above 0")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535, got {self.port}")
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
        self.ready = Gauge("mixnet_ready", "1 once every model is loaded", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_ENDPOINTS = ("/v1/classify", "/healthz", "/readyz", "/metrics", "/openapi.json")


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
        self._inference: ThreadPoolExecutor | None = None
        self._loader: threading.Thread | None = None

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
        self._inference = ThreadPoolExecutor(max_workers=sum(c.engine.parallel for c in classifiers),
                                             thread_name_prefix="mixnet-infer")
        for classifier in classifiers:
            name = classifier.model_name

            def on_batch(size: int, seconds: float, name: str = name) -> None:
                self.metrics.batch_size.labels(name).observe(size)
                self.metrics.batch_seconds.labels(name).observe(seconds)
                self.metrics.images.labels(name).inc(size)
                self.metrics.throughput.add(size)

            batcher = DynamicBatcher(classifier.probabilities, self._inference,
                                     max_batch_size=options.max_batch_size, max_wait_s=options.max_wait_ms / 1000.0,
                                     max_queue=options.max_queue, parallel=classifier.engine.parallel,
                                     on_batch=on_batch)
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
        """After the server has finished its requests: stop the batchers and the threads."""
        for model in self.models.values():
            await model.batcher.close()
        self.decoders.shutdown(wait=True, cancel_futures=True)
        if self._inference is not None:
            self._inference.shutdown(wait=True, cancel_futures=True)

    # -- one request --------------------------------------------------------------------------------------------

    def parameters(self, query: Any) -> tuple[str, int, float, str | None]:
        """Model name, top-k, deadline (seconds) and URL from a request's query; :class:`RequestError` (400)
        with the CLI's message for a bad one."""
        from ..classifier import check_topk
        from ..base.manifest import resolve_model

        try:
            requested = query.get("model")
            name = resolve_model(requested).name if requested else self.model_names[0]
            if name not in self.model_names and self.options.weights is not None:
                raise UsageError(f"model {name} is not served here; this service serves your own weights alone, as "
                                 f"{self.model_names[0]}")
            if name not in self.model_names:
                raise UsageError(f"model {name} is not served here; served: {', '.join(self.model_names)} "
                                 "(start the service with --model to add it)")
            raw_topk = query.get("topk")
            # Default 5, or every class of a model with fewer, as for classify.
            topk = check_topk(None if raw_topk in (None, "") else _whole_number(raw_topk, "topk", DEFAULT_TOPK),
                              self.specs[name].num_classes)
            deadline = self.options.deadline_s
            if query.get("deadline_ms") is not None:
                asked = _whole_number(query.get("deadline_ms"), "deadline_ms", 0)
                if asked < 1:
                    raise UsageError(f"deadline_ms must be at least 1, got {asked}")
                deadline = min(deadline, asked / 1000.0)
            url = query.get("url")
            if url is not None:
                from ..images.inputs import is_url

                if not self.options.allow_urls:
                    raise UsageError("fetching image URLs is off in this service; send the image's bytes instead "
                                     "(or start it with --allow-urls)")
                if not is_url(url):
                    raise UsageError(f"url must start with http:// or https://, got {url!r}")
        except UsageError as exc:
            raise RequestError(400, type(exc).__name__, str(exc)) from None
        return name, topk, deadline, url

    @contextlib.contextmanager
    def admitted(self, model_name: str) -> Iterator[Callable[[int], None]]:
        """Room in the model's queue for one request: one image from the start, before its body is read (so a
        flood is refused before it fills memory), as many as it holds through the function given (call it with
        the count once known); all of it given back when the request ends, however it ends. Raises
        :class:`Overloaded` when the queue has no room."""
        batcher = self.models[model_name].batcher
        batcher.admit(1)
        held = 1

        def hold(count: int) -> None:
            nonlocal held
            if count > held:
                batcher.admit(count - held)
                held = count

        try:
            yield hold
        finally:
            batcher.release(held)

    async def classify(self, model_name: str, topk: int, images: list[tuple[str, Callable[[], bytes]]]
                       ) -> list["ClassificationResult"]:
        """Classify named images (each a loader of its encoded bytes, run in a decode thread) with one model,
        room for them held with :meth:`admitted`. An image that cannot be read gets its error in its place."""
        from ..classifier import ClassificationResult

        model = self.models[model_name]
        loop = asyncio.get_running_loop()

        def prepare(name: str, load: Callable[[], bytes]) -> Any:
            return model.classifier.preprocess(load(), name)

        async def one(name: str, load: Callable[[], bytes]) -> ClassificationResult:
            try:
                array = await loop.run_in_executor(self.decoders, prepare, name, load)
                row = await model.batcher.submit(array)
                return model.classifier.result(name, row, topk)
            except ImageError as exc:
                return ClassificationResult(input=name, model=model_name, error=exc)

        return list(await asyncio.gather(*(one(name, load) for name, load in images)))


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


def _whole_number(raw: str | None, name: str, default: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, got {raw!r}") from None


async def _read_body(receive_stream: Any, limit: int, declared: str | None) -> bytes:
    """The request body, refused with 413 as soon as it is known to pass ``limit`` bytes (declared or read)."""
    too_large = RequestError(413, "RequestTooLarge",
                             f"the request body is over the service's limit of {limit} bytes; send smaller or "
                             "fewer images per request")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in receive_stream:
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _form_images(request: Any, body: bytes) -> list[tuple[str, bytes]]:
    """The ``image`` fields of a multipart body, in order, as (file name, bytes)."""
    from starlette.requests import Request

    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=10_000, max_fields=10_000)
    except Exception as exc:  # noqa: BLE001 (python-multipart's errors vary by version)
        raise RequestError(400, "UsageError", f"cannot parse the multipart body ({exc})") from None
    images = []
    for index, (key, value) in enumerate(form.multi_items()):
        if key != "image":
            continue
        if isinstance(value, str):
            raise RequestError(400, "UsageError", "the 'image' field must be a file upload (curl -F image=@cat.jpg)")
        images.append((value.filename or f"image{index}", await value.read()))
    await form.close()
    if not images:
        raise RequestError(400, "UsageError", "no 'image' field in the form; send files as -F image=@cat.jpg")
    return images


def create_app(service: Service) -> Any:
    """The Starlette application of ``service``: routes, access log and metrics."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def error(exc: RequestError) -> Any:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def routing_error(request: Any, exc: Any) -> Any:
        """Starlette's router answers a path it lacks (404) or a method a route does not take (405) in plain
        text: here they get the error object every other refusal has, saying what the service does answer."""
        path = request.url.path
        if exc.status_code == 404:
            return error(RequestError(404, "NotFound", f"no endpoint {path}; this service answers POST /v1/classify "
                                      "and GET /healthz, /readyz, /metrics, /openapi.json", exc.headers))
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            return error(RequestError(405, "MethodNotAllowed", f"{request.method} is not allowed on {path}; use "
                                      f"{allowed or 'another method'}", exc.headers))
        return error(RequestError(exc.status_code, "HTTPError", str(exc.detail), exc.headers))

    async def classify(request: Any) -> Any:
        try:
            name, topk, deadline, url = service.parameters(request.query_params)
            if not service.ready:
                raise RequestError(503, "NotReady", "the models are still loading; try again shortly (see /readyz)",
                                   {"Retry-After": "1"})
            request.state.model = name
            try:
                return await asyncio.wait_for(answer(request, name, topk, url, deadline), deadline)
            except asyncio.TimeoutError:
                raise RequestError(504, "DeadlineExceeded",
                                   f"no answer within the deadline of {deadline:g} s; try again, or send fewer or "
                                   "smaller images") from None
        except RequestError as exc:
            return error(exc)
        except Overloaded as exc:
            return error(RequestError(503, "Overloaded", str(exc), {"Retry-After": str(exc.retry_after)}))
        except Exception as exc:  # noqa: BLE001 (an engine failure, or a bug: one JSON line, not a traceback page)
            _log.error("%s: %s", type(exc).__name__, exc)
            return error(RequestError(500, type(exc).__name__, str(exc) if isinstance(exc, MixnetError) else
                                      f"unexpected {type(exc).__name__}: {exc} (a bug; please report it)"))

    async def answer(request: Any, name: str, topk: int, url: str | None, deadline: float) -> Any:
        with service.admitted(name) as hold:
            return await answer_admitted(request, name, topk, url, deadline, hold)

    async def answer_admitted(request: Any, name: str, topk: int, url: str | None, deadline: float,
                              hold: Callable[[int], None]) -> Any:
        multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
        body = await _read_body(request.stream(), service.options.max_body_bytes, request.headers.get("content-length"))
        images: list[tuple[str, Callable[[], bytes]]]
        if url is not None:
            from ..base import settings
            from ..images.inputs import fetch_image_url

            # classify's fetcher (the weights' HTTP layer: timeouts, size cap), within the request's deadline too.
            within = min(deadline, settings.url_deadline())
            images = [(url, lambda: fetch_image_url(url, deadline_s=within))]
        elif multipart:
            images = [(filename, (lambda data=data: data)) for filename, data in await _form_images(request, body)]
        elif body:
            images = [("-", lambda: body)]
        else:
            raise RequestError(400, "UsageError", "empty request: send an image as the body "
                               "(curl --data-binary @cat.jpg) or as multipart 'image' fields")
        request.state.images = len(images)
        hold(len(images))
        results = await service.classify(name, topk, images)
        failed = [result.error for result in results if result.error is not None]
        status = image_error_status(failed[0]) if failed else 200
        rows = [result.to_dict() for result in results]
        return JSONResponse(rows if multipart else rows[0], status_code=status)

    async def healthz(request: Any) -> Any:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Any) -> Any:
        if service.ready:
            return JSONResponse({"status": "ready", "models": service.model_names})
        return JSONResponse({"status": "loading", "models": service.model_names}, status_code=503,
                            headers={"Retry-After": "1"})

    async def metrics(request: Any) -> Any:
        content, media_type = service.metrics.render()
        return Response(content, media_type=media_type)

    async def openapi(request: Any) -> Any:
        return JSONResponse(openapi_document(service))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        service.start_loading()
        yield
        await service.close()

    app = Starlette(routes=[
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ], lifespan=lifespan, exception_handlers={HTTPException: routing_error})
    return _Observed(app, service)


class _Observed:
    """ASGI middleware: every HTTP request is counted and timed in the metrics and, when asked, logged (one line
    on stderr, text or JSON)."""

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
        scope.setdefault("state", {})

        async def observe(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            elapsed = time.perf_counter() - started
            path = scope.get("path", "")
            endpoint = path if path in _ENDPOINTS else "other"
            metrics = self.service.metrics
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(elapsed)
            if self.service.options.access_log:
                self._log(scope, path, status, elapsed)

    def _log(self, scope: dict[str, Any], path: str, status: int, elapsed: float) -> None:
        client = scope.get("client") or ("-", 0)
        state = scope.get("state", {})
        if self.service.options.log_format == "json":
            now = time.time()
            entry = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
                "client": client[0], "method": scope.get("method"), "path": path,
                "query": scope.get("query_string", b"").decode("latin-1"), "status": status,
                "duration_ms": round(elapsed * 1000, 3), "model": state.get("model"), "images": state.get("images"),
            }
            access_log.info(json.dumps(entry))
        else:
            query = scope.get("query_string", b"").decode("latin-1")
            access_log.info('%s "%s %s%s" %d %.1f ms', client[0], scope.get("method"), path,
                            f"?{query}" if query else "", status, elapsed * 1000)


def openapi_document(service: Service) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the service's endpoints."""
    from .. import __version__

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
                    {"name": "deadline_ms", "in": "query", "schema": {"type": "integer", "minimum": 1},
                     "description": "a shorter deadline than the service's own"},
                    {"name": "url", "in": "query", "schema": {"type": "string"},
                     "description": "an http(s) image URL to fetch instead of a body (only with --allow-urls)"},
                ],
                "requestBody": {"content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {"schema": {"type": "object", "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
                }},
                "responses": {
                    "200": {"description": "every image classified", **results},
                    "400": {"description": "a bad parameter or a model not served", **json_error},
                    "405": {"description": "a method other than POST", **json_error},
                    "413": {"description": "body over the size limit, or an image over the pixel limit",
                            **json_error},
                    "422": {"description": "an image that cannot be read (the body holds every image's object)",
                            **results},
                    "503": {"description": "not ready, or the queue is full (see Retry-After)", **json_error},
                    "504": {"description": "not answered within the deadline", **json_error},
                },
            }},
            "/healthz": {"get": {"summary": "The process answers", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Every model is loaded", "responses": {
                "200": {"description": "ready"}, "503": {"description": "still loading"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format)", "responses": {
                "200": {"description": "metrics", "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}},
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
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="on", server_header=False,
                            # Connections beyond what the queues admit, plus room for probes and metrics, are
                            # answered 503 by uvicorn at once: a flood of uploads cannot fill memory with bodies.
                            limit_concurrency=options.max_queue * len(service.model_names) + 32,
                            # In-flight requests end within their deadline; then the server stops anyway.
                            timeout_graceful_shutdown=int(math.ceil(options.deadline_s)) + 5)
    server = uvicorn.Server(config)
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


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

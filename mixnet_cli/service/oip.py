"""The Open Inference Protocol v2 (KServe's and Triton's HTTP/REST API) beside ``/v1``: the routes, and how their
requests and answers are read and written. The images go the way ``/v1/classify``'s go (admission to the model's
queue, the decode pool, the model's batcher), through :class:`~mixnet_cli.service.serve.Service`.

What a client meets (the names are the protocol's):

- ``GET /v2`` (server metadata: name, version, the extensions ``classification``, ``binary_tensor_data`` and
  ``model_configuration``), ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}`` (model metadata),
  ``/v2/models/{name}/ready``, ``/v2/models/{name}/config`` (Triton's model configuration, which ``perf_analyzer``
  reads: ``max_batch_size`` is the most images a request may carry), ``POST /v2/models/{name}/infer``. Models
  are named by their full names (``MixNet_S``...); one version each, so the ``/versions/{v}`` paths are not
  offered. Health answers are 200 or 503 (with ``Retry-After``) with an empty body; the protocol says "4xx" for
  false, but a load balancer reads any status from 400 up as not ready, and 503 is what ``/readyz`` answers.
- One input, ``image``: datatype ``BYTES``, shape ``[N]`` (``[N, 1]`` too), N encoded image files. In JSON, each
  element of ``data`` is the file in base64 (JSON strings cannot carry arbitrary bytes; KServe's and TorchServe's
  v2 image examples send base64 the same way); with the binary-data extension (``Inference-Header-Content-Length``),
  the raw files, each behind its 4-byte little-endian length, as ``tritonclient`` serializes a BYTES tensor.
- One output, ``probabilities``: ``FP32``, shape ``[N, classes]``, the softmax ``mixnet classify`` ranks. With
  Triton's classification extension (``"parameters": {"classification": k}`` on the requested output, what
  ``tritonclient``'s ``InferRequestedOutput(..., class_count=k)`` sends) it is ``BYTES`` ``[N, k]`` instead:
  ``"score:class_id:label"`` strings, best first, ties in class order, the score in full (shortest round-trip)
  precision rather than Triton's six decimals, so that it equals ``classify --json``'s value for value.
  Pooled features are not offered here: a features engine is ONNX Runtime or torch only, and the service's
  engine is chosen for its speed (OpenVINO on most CPUs); requesting ``features`` is a 400 that says so.
- Errors are the protocol's ``{"error": "<message>"}``. The protocol has no per-image error inside an answer: an
  inference either answers every image or fails as a whole, so one unreadable image fails the request (422, 413
  over a size or pixel limit, as ``/v1`` answers that image), its message naming it (``image[2]: ...``). A request
  the protocol cannot read is 400; a model not served 404; a method a path does not take 405; a body over the
  service's limit 413; a compressed body (``Content-Encoding``) 415; not ready or a full queue 503
  (``Retry-After``); past the deadline 504; a client that hangs up 499 (in the metrics, as ``/v1`` counts it).
  Triton's ``timeout`` request parameter (microseconds) is, as in Triton, the time the request's images have
  (from its arrival) to be answered: an image whose answer would come later is dropped from its model's queue
  before its forward pass, and the request is 504. The service's deadline bounds the whole request, and after
  SIGTERM ends before the graceful timeout, as ``/v1``'s does. Other request parameters are free-form in the
  protocol and ignored.

Tokens: every route here needs what the rest of the service needs except :data:`PUBLIC_PATHS`, the health
endpoints, which probes reach without one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import struct
import contextlib
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import numpy as np

from ..base.errors import MixnetError, Overloaded, UsageError
from ..base.parsing import ascii_whole_number
from .handling import ClientGone, ImageLoader, bytes_loader, compressed_body, until_client_gone

# What a token must not guard: liveness and readiness probes (Kubernetes, load balancers) carry no credentials.
PUBLIC_PATHS = ("/v2/health/live", "/v2/health/ready")
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
EXTENSIONS = ("classification", "binary_tensor_data", "model_configuration")
HEADER_LENGTH = "Inference-Header-Content-Length"
# A JSON body this large (base64 of a few photos and up) is parsed in a thread, so the event loop keeps answering.
_PARSE_OFF_LOOP_BYTES = 256 * 1024
_ENCODE_OFF_LOOP_IMAGES = 8
_LENGTH_PREFIX = struct.Struct("<I")
# Triton's timeout is a uint64 of microseconds: the most a request may ask (the service's deadline caps it anyway).
MAX_TIMEOUT_US = 2 ** 64 - 1

_log = logging.getLogger(__name__)


class Host(Protocol):
    """What the v2 routes use of the service that mounts them (:class:`~mixnet_cli.service.serve.Service`, which
    imports this module: the routes know it by this shape alone, so the two never import each other)."""

    options: Any  # deadline_s, max_queue, max_batch_size, max_wait_ms: ServeOptions
    specs: dict[str, Any]  # the served models' specs, by full name
    model_names: list[str]
    models: dict[str, Any]  # the loaded models by name, each with its ``classifier``
    ready: bool

    def admitted(self, model_name: str) -> contextlib.AbstractContextManager[Callable[[int], None]]: ...

    async def within(self, work: Awaitable[Any], deadline_s: float) -> Any: ...

    async def classify(self, model_name: str, topk: int, images: list[tuple[str, ImageLoader]],
                       deadline: float | None = None, rows: bool = False) -> list[Any]: ...


class ProtocolError(MixnetError):
    """A v2 request refused as a whole: ``status`` its HTTP status, ``headers`` any extra ones; answered as the
    protocol's ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for: in binary (the binary-data extension) or in JSON, as probabilities or as
    the top ``classification`` classes (0: probabilities)."""

    binary: bool
    classification: int = 0


@dataclass(frozen=True)
class InferRequest:
    """A parsed ``infer`` request: its ``id`` (echoed), the encoded image files, the outputs to answer (in the
    order asked) and the deadline it asks for (seconds; None: the service's)."""

    id: str | None
    images: list[bytes]
    outputs: list[RequestedOutput]
    timeout_s: float | None = None


def parse_infer_request(body: bytes, header_length: str | None, num_classes: int) -> InferRequest:
    """Read an ``infer`` request body (JSON, or JSON then binary tensors when ``header_length``, the
    ``Inference-Header-Content-Length`` header, is given). Raises :class:`ProtocolError` (400) saying what is
    wrong with it."""
    binary = memoryview(b"")
    if header_length is not None:
        size = ascii_whole_number(header_length.strip())
        if size is None or not 0 < size <= len(body):
            raise ProtocolError(400, f"{HEADER_LENGTH} must be the byte length of the JSON at the start of the body "
                                f"(1 to {len(body)}), got {header_length[:24]!r}")
        binary = memoryview(body)[size:]
        body = body[:size]
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        hint = "" if header_length is not None else f" (binary tensors need the {HEADER_LENGTH} header)"
        raise ProtocolError(400, f"the request is not JSON: {exc}{hint}") from None
    except ValueError:  # int() refuses an integer of over 4300 digits (sys.get_int_max_str_digits)
        raise ProtocolError(400, "cannot parse the request: a number in its JSON has too many digits; send "
                            "numbers of ordinary size") from None
    except RecursionError:  # the parser recurses once per nested array or object
        raise ProtocolError(400, "cannot parse the request: its JSON is nested too deeply; send the protocol's "
                            "flat 'inputs' list") from None
    if not isinstance(request, dict):
        raise ProtocolError(400, "the request must be a JSON object with 'inputs'")
    parameters = _object(request.get("parameters"), "parameters")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(400, f"'inputs' must hold exactly one tensor, '{INPUT_NAME}' (BYTES, shape [N]: N "
                            "encoded image files)")
    images, used = _image_input(inputs[0], binary)
    if used != len(binary):
        raise ProtocolError(400, f"{len(binary) - used} bytes of binary data follow the inputs' binary_data_size; "
                            "send only the tensors the JSON announces")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ProtocolError(400, "parameters.binary_data_output must be true or false")
    outputs = _requested_outputs(request.get("outputs"), binary_default, num_classes)
    timeout = parameters.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                or not 1 <= timeout <= MAX_TIMEOUT_US):
        shown = repr(timeout) if not isinstance(timeout, int) or timeout < 10 ** 24 else "a number of over 24 digits"
        raise ProtocolError(400, f"parameters.timeout must be a whole number of microseconds from 1 to "
                            f"{MAX_TIMEOUT_US}, got {shown}")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, "'id' must be a string")
    return InferRequest(request_id, images, outputs, None if timeout is None else timeout / 1e6)


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(400, f"'{where}' must be a JSON object")
    return value


def _image_input(tensor: dict[str, Any], binary: memoryview) -> tuple[list[bytes], int]:
    """The encoded files of the ``image`` input, and how many bytes of ``binary`` they took."""
    name = tensor.get("name")
    if name != INPUT_NAME:
        raise ProtocolError(400, f"unknown input {name!r}; this model takes one input, '{INPUT_NAME}' (BYTES, "
                            "shape [N]: N encoded image files)")
    if tensor.get("datatype") != "BYTES":
        raise ProtocolError(400, f"input '{INPUT_NAME}' must have datatype BYTES (encoded image files), got "
                            f"{tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or len(shape) not in (1, 2) or shape[1:] not in ([], [1])
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape) or shape[0] < 1):
        raise ProtocolError(400, f"input '{INPUT_NAME}' must have shape [N] (N images, N >= 1), got {shape!r}")
    count = shape[0]
    parameters = _object(tensor.get("parameters"), "inputs[0].parameters")
    size = parameters.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
            raise ProtocolError(400, f"binary_data_size of '{INPUT_NAME}' must be a byte count within the "
                                f"{len(binary)} bytes after the JSON, got {size!r}")
        if "data" in tensor:
            raise ProtocolError(400, f"input '{INPUT_NAME}' has both 'data' and binary_data_size; send one")
        images = _deserialize_bytes(binary[:size])
        used = size
    else:
        images = _base64_elements(tensor.get("data"))
        used = 0
    if len(images) != count:
        raise ProtocolError(400, f"input '{INPUT_NAME}' has shape {shape} but holds {len(images)} elements")
    return images, used


def _deserialize_bytes(buffer: memoryview) -> list[bytes]:
    """A BYTES tensor in binary: each element its length (4 bytes, little-endian) then its bytes."""
    elements = []
    offset = 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise ProtocolError(400, f"binary '{INPUT_NAME}' ends inside an element's 4-byte length prefix")
        (length,) = _LENGTH_PREFIX.unpack_from(buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise ProtocolError(400, f"binary '{INPUT_NAME}' element {len(elements)} announces {length} bytes but "
                                f"only {len(buffer) - offset} follow")
        elements.append(bytes(buffer[offset:offset + length]))
        offset += length
    return elements


def _base64_elements(data: Any) -> list[bytes]:
    if not isinstance(data, list):
        raise ProtocolError(400, f"input '{INPUT_NAME}' needs 'data' (a list of base64 strings, one image file each) "
                            "or binary data (parameters.binary_data_size)")
    # Shape [N, 1] may come nested, one list per image.
    flat = [item[0] if isinstance(item, list) and len(item) == 1 else item for item in data]
    images = []
    for index, item in enumerate(flat):
        if not isinstance(item, str):
            raise ProtocolError(400, f"input '{INPUT_NAME}' element {index} must be a string: the image file in base64")
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise ProtocolError(400, f"input '{INPUT_NAME}' element {index} is not base64: in JSON each element is "
                                "an image file in base64 (or send the raw files as binary data)") from None
    return images


def _requested_outputs(outputs: Any, binary_default: bool, num_classes: int) -> list[RequestedOutput]:
    from ..classifier import check_topk

    if outputs is None:
        return [RequestedOutput(binary=binary_default)]
    if not isinstance(outputs, list) or not outputs:
        raise ProtocolError(400, f"'outputs' must be a list of requested outputs (this model has one, "
                            f"'{OUTPUT_NAME}'), or left out")
    requested = []
    for output in outputs:
        if not isinstance(output, dict):
            raise ProtocolError(400, "each of 'outputs' must be a JSON object with a 'name'")
        name = output.get("name")
        if name == "features":
            raise ProtocolError(400, "output 'features' is not offered by this service (pooled features come from "
                                "the ONNX Runtime or torch engines: use `mixnet classify --embed` or the Python "
                                "API); request 'probabilities'")
        if name != OUTPUT_NAME:
            raise ProtocolError(400, f"unknown output {name!r}; this model has one output, '{OUTPUT_NAME}'")
        parameters = _object(output.get("parameters"), f"outputs '{name}' parameters")
        unknown = sorted(set(parameters) - {"binary_data", "classification"})
        if unknown:
            raise ProtocolError(400, f"output parameters {', '.join(unknown)} are not offered (shared memory is "
                                "not); use binary_data and classification")
        binary = parameters.get("binary_data", binary_default)
        classification = parameters.get("classification", 0)
        if not isinstance(binary, bool):
            raise ProtocolError(400, "binary_data must be true or false")
        if isinstance(classification, bool) or not isinstance(classification, int):
            raise ProtocolError(400, f"classification must be a whole number of classes, got {classification!r}")
        if classification:
            try:
                check_topk(classification, num_classes, clamp=False)
            except UsageError as exc:
                raise ProtocolError(400, f"classification: {exc}") from None
        requested.append(RequestedOutput(binary=binary, classification=classification))
    return requested


def encode_infer_response(model_name: str, request: InferRequest, probabilities: np.ndarray,
                          top: Callable[[np.ndarray, int], Any]) -> tuple[bytes, dict[str, str]]:
    """The body and headers answering ``request`` from the images' probabilities (``N x classes``, the float64
    softmax ``classify`` ranks; answered as FP32);
    ``top(row, k)`` ranks one row as ``classify`` does (a result whose ``predictions`` are the best ``k``)."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for requested in request.outputs:
        tensor: dict[str, Any] = {"name": OUTPUT_NAME}
        if requested.classification:
            # Triton's classification extension: "score:class_id:label", best first.
            strings = [f"{p.score!r}:{p.class_id}:{p.label}" for row in probabilities
                       for p in top(row, requested.classification).predictions]
            tensor.update(datatype="BYTES", shape=[len(probabilities), requested.classification])
            if requested.binary:
                blob = b"".join(_LENGTH_PREFIX.pack(len(encoded)) + encoded
                                for encoded in (s.encode("utf-8") for s in strings))
            else:
                tensor["data"] = strings
        else:
            values = probabilities.astype(np.float32)  # FP32 on the wire, as Triton's classifiers answer
            tensor.update(datatype="FP32", shape=list(values.shape))
            if requested.binary:
                blob = values.tobytes()
            else:
                tensor["data"] = values.ravel().tolist()
        if requested.binary:
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        outputs.append(tensor)
    answer: dict[str, Any] = {"model_name": model_name}
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = outputs
    header = json.dumps(answer, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return header, {"content-type": "application/json"}
    return b"".join([header, *blobs]), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def model_metadata(service: Host, name: str) -> dict[str, Any]:
    """The protocol's model metadata: the ``image`` input and the ``probabilities`` output (-1: any batch)."""
    classes = service.specs[name].num_classes
    return {
        "name": name,
        "platform": "mixnet-cli",
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, classes]}],
    }


def model_config(service: Host, name: str) -> dict[str, Any]:
    """Triton's model configuration (its ``model_configuration`` extension), which ``perf_analyzer`` reads beside
    the metadata: ``max_batch_size`` is the most images one request may carry (the model's queue), and the
    dynamic batching is the service's own."""
    from .batching import batch_ladder

    options = service.options
    return {
        "name": name,
        "platform": "mixnet-cli",
        "max_batch_size": options.max_queue,
        # Each element is one encoded file: clients may send shape [N] or, in Triton's habit, [N, 1].
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}}],
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [service.specs[name].num_classes]}],
        "dynamic_batching": {"preferred_batch_size": batch_ladder(options.max_batch_size),
                             "max_queue_delay_microseconds": round(options.max_wait_ms * 1000)},
    }


def routes(service: Host, read_body: Callable[[Any], Awaitable[bytes]],
           image_status: Callable[[MixnetError], int]) -> list[Any]:
    """The v2 routes of ``service``, to mount on its application beside ``/v1``. ``read_body(request)`` reads a
    request's body within the service's limits (refusing with a :class:`MixnetError` that carries its HTTP
    ``status`` and ``headers``); ``image_status(error)`` is the status of an image that cannot be classified."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Match, Route

    def error(exc: ProtocolError) -> Any:
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)

    def not_ready() -> ProtocolError:
        return ProtocolError(503, "the models are still loading; try again shortly (see /v2/health/ready)",
                             {"Retry-After": "1"})

    def served(request: Request, endpoint: str) -> str:
        """The model a path names; a query (the protocol has none) or a model not served is refused."""
        request.state.endpoint = endpoint
        if request.query_params:
            raise ProtocolError(400, f"unknown query parameters: {', '.join(sorted(set(request.query_params)))}; "
                                "the v2 endpoints take none")
        name = request.path_params["name"]
        if name not in service.specs:
            raise ProtocolError(404, f"unknown model {name!r}; served: {', '.join(service.model_names)} (v2 names "
                                "models by their full names)")
        request.state.model = name
        return name

    def health(ok: bool) -> Any:
        return Response(status_code=200) if ok else Response(status_code=503, headers={"Retry-After": "1"})

    async def server_metadata(request: Request) -> Any:
        from .. import __version__

        request.state.endpoint = "/v2"
        return JSONResponse({"name": "mixnet-cli", "version": __version__, "extensions": list(EXTENSIONS)})

    async def live(request: Request) -> Any:
        request.state.endpoint = "/v2/health/live"
        return health(True)

    async def ready(request: Request) -> Any:
        request.state.endpoint = "/v2/health/ready"
        return health(service.ready)

    async def metadata(request: Request) -> Any:
        try:
            return JSONResponse(model_metadata(service, served(request, "/v2/models/{name}")))
        except ProtocolError as exc:
            return error(exc)

    async def config(request: Request) -> Any:
        try:
            return JSONResponse(model_config(service, served(request, "/v2/models/{name}/config")))
        except ProtocolError as exc:
            return error(exc)

    async def model_ready(request: Request) -> Any:
        try:
            served(request, "/v2/models/{name}/ready")
        except ProtocolError as exc:
            return error(exc)
        return health(service.ready)

    async def infer(request: Request) -> Any:
        arrived = asyncio.get_running_loop().time()
        deadline = service.options.deadline_s
        try:
            name = served(request, "/v2/models/{name}/infer")
            if not service.ready:
                raise not_ready()
            compressed = compressed_body(request.headers)
            if compressed is not None:
                raise ProtocolError(415, compressed)
            try:
                # /v1/classify's way: the deadline, cut to end before the graceful timeout after SIGTERM.
                return await service.within(answer(request, name, arrived), deadline)
            except asyncio.TimeoutError:
                within = min(deadline, getattr(request.state, "timeout_s", deadline))
                raise ProtocolError(504, f"no answer within the deadline of {within:g} s; try again, or send fewer "
                                    "or smaller images") from None
        except ProtocolError as exc:
            return error(exc)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it: it is there for the metrics and the access log
        except Overloaded as exc:
            return error(ProtocolError(503, str(exc), {"Retry-After": str(exc.retry_after)}))
        except Exception as exc:  # noqa: BLE001 (an engine failure, or a bug: one JSON line, not a traceback page)
            status = getattr(exc, "status", None)
            if isinstance(exc, MixnetError) and isinstance(status, int):  # the service's refusal (body too large)
                return error(ProtocolError(status, str(exc), getattr(exc, "headers", None)))
            _log.error("%s: %s", type(exc).__name__, exc)
            return error(ProtocolError(500, str(exc) if isinstance(exc, MixnetError) else
                                       f"unexpected {type(exc).__name__}: {exc} (a bug; please report it)"))

    async def answer(request: Request, name: str, arrived: float) -> Any:
        with service.admitted(name) as hold:
            body = await read_body(request)  # ClientGone if the client hangs up before its end
            classes = service.specs[name].num_classes
            parse: Callable[[], InferRequest] = lambda: parse_infer_request(  # noqa: E731
                body, request.headers.get(HEADER_LENGTH), classes)
            asked = await asyncio.to_thread(parse) if len(body) > _PARSE_OFF_LOOP_BYTES else parse()
            del body  # the images hold their bytes
            request.state.images = len(asked.images)
            hold(len(asked.images))
            if asked.timeout_s is not None:
                request.state.timeout_s = asked.timeout_s
            # Counted from the request's arrival, as the service's deadline is: past it, the batcher drops an
            # image before its forward pass.
            ends = arrived + min(service.options.deadline_s, asked.timeout_s or math.inf)
            images = [(f"image[{index}]", bytes_loader(data)) for index, data in enumerate(asked.images)]
            # The path /v1/classify's images take (decode pool, the model's batcher), answering rows, until the
            # client hangs up.
            results = await until_client_gone(service.classify(name, 0, images, deadline=ends, rows=True),
                                              request.receive)
            failed = [result.error for result in results if not isinstance(result, np.ndarray)]
            if failed:
                raise ProtocolError(image_status(failed[0]), f"{failed[0]} (an inference answers every image "
                                    "or none: send the others again without it)")
            classifier = service.models[name].classifier
            encode: Callable[[], tuple[bytes, dict[str, str]]] = lambda: encode_infer_response(  # noqa: E731
                name, asked, np.stack(results), lambda row, k: classifier.result("", row, k))
            # Rows of probabilities in JSON take about a millisecond per image to write: many, off the event loop.
            content, headers = await asyncio.to_thread(encode) if len(results) > _ENCODE_OFF_LOOP_IMAGES else encode()
            return Response(content, headers=headers)

    async def elsewhere(request: Request) -> Any:
        """A path under /v2 that no route takes, or a method a v2 path does not: the protocol's error object."""
        request.state.endpoint = "/v2/other"
        allowed = sorted({method for route in v2 if route.matches(request.scope)[0] == Match.PARTIAL
                          for method in (route.methods or ())})
        if allowed:
            return error(ProtocolError(405, f"{request.method} is not allowed on {request.url.path}; use "
                                       f"{', '.join(allowed)}", {"Allow": ", ".join(allowed)}))
        return error(ProtocolError(404, f"no endpoint {request.url.path}; v2 answers GET /v2, /v2/health/live, "
                                   "/v2/health/ready, /v2/models/{name}, /v2/models/{name}/ready, "
                                   "/v2/models/{name}/config and POST /v2/models/{name}/infer"))

    v2 = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{name}", metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/config", config, methods=["GET"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
    ]
    return [*v2, Route("/v2/{rest:path}", elsewhere,
                       methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])]


def openapi_paths(service: Host) -> dict[str, Any]:
    """The v2 endpoints' entries of the service's OpenAPI document."""
    error = {"content": {"application/json": {"schema": {
        "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}}
    model = {"name": "name", "in": "path", "required": True,
             "schema": {"type": "string", "enum": service.model_names}}
    health = {"200": {"description": "true (empty body)"}, "503": {"description": "false (empty body)"}}
    tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}}, "parameters": {"type": "object"},
        "data": {"type": "array"}}}
    return {
        "/v2": {"get": {"summary": "Server metadata (Open Inference Protocol v2)",
                        "responses": {"200": {"description": "name, version, extensions"}}}},
        "/v2/health/live": {"get": {"summary": "The process answers", "responses": health}},
        "/v2/health/ready": {"get": {"summary": "Every model is loaded", "responses": health}},
        "/v2/models/{name}": {"get": {
            "summary": "Model metadata: input 'image' (BYTES [N]), output 'probabilities' (FP32 [N, classes])",
            "parameters": [model],
            "responses": {"200": {"description": "metadata"}, "404": {"description": "not served", **error}}}},
        "/v2/models/{name}/ready": {"get": {"summary": "The model is loaded", "parameters": [model],
                                            "responses": {**health, "404": {"description": "not served", **error}}}},
        "/v2/models/{name}/config": {"get": {
            "summary": "Triton's model configuration: max_batch_size (the most images per request), dynamic batching",
            "parameters": [model],
            "responses": {"200": {"description": "configuration"}, "404": {"description": "not served", **error}}}},
        "/v2/models/{name}/infer": {"post": {
            "summary": "Classify N images: input 'image', BYTES [N] (base64 in JSON, raw with the binary-data "
                       "extension); output 'probabilities' FP32 [N, classes], or with parameters.classification "
                       "k, BYTES [N, k] 'score:class_id:label' strings, best first",
            "parameters": [model],
            "requestBody": {"content": {
                "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
                    "id": {"type": "string"}, "parameters": {"type": "object"},
                    "inputs": {"type": "array", "items": tensor},
                    "outputs": {"type": "array", "items": {"type": "object", "properties": {
                        "name": {"type": "string"}, "parameters": {"type": "object"}}}}}}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                             "description": f"JSON then binary tensors ({HEADER_LENGTH})"},
            }},
            "responses": {
                "200": {"description": "every image classified"},
                "400": {"description": "a request the protocol cannot read", **error},
                "404": {"description": "a model not served", **error},
                "413": {"description": "body over the size limit, or an image over the pixel limit", **error},
                "415": {"description": "a compressed request (Content-Encoding)", **error},
                "422": {"description": "an image that cannot be read (the request fails as a whole)", **error},
                "503": {"description": "not ready, or the queue is full (see Retry-After)", **error},
                "504": {"description": "not answered within the deadline", **error},
            }}},
    }

"""What ``mixnet serve`` adds for class activation maps: the ``cam`` and ``cam_class`` query parameters, answers with
maps, and the page at ``GET /`` (one static file of this package, ``page.html``). Kept apart from ``serve.py``, which
calls these from its routes."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ..base.errors import ImageError, UsageError
from ..base.parsing import whole_number
from .handling import ImageLoader

if TYPE_CHECKING:
    from ..classifier import ClassificationResult, Classifier

# The page GET / serves, a file of this package, with its script and style inline.
PAGE_FILE = "page.html"


@dataclass(frozen=True)
class CamRequest:
    """``?cam=1``: the class activation map of each image's top-1 class, or (``cam_class=ID``) of class ``class_id``."""

    class_id: int | None = None


def cam_request(query: Any, num_classes: int) -> CamRequest | None:
    """The maps a request's query asks for (None: none). Raises :class:`UsageError` for a ``cam`` other than 0 or 1
    and a ``cam_class`` that is not one of the model's classes (``cam_class`` alone implies ``cam=1``)."""
    raw, raw_class = query.get("cam"), query.get("cam_class")
    if raw in (None, "", "0", "false") and raw_class in (None, ""):
        return None
    if raw not in (None, "", "1", "true"):
        raise UsageError(f"cam must be 1 or 0, got {raw!r}")
    if raw_class in (None, ""):
        return CamRequest()
    return CamRequest(whole_number(raw_class, "cam_class (a class of the model)", 0, num_classes - 1))


async def classify_with_maps(classifier: "Classifier", model_name: str, topk: int,
                             images: list[tuple[str, ImageLoader]], cam: CamRequest,
                             decode: Callable[..., Awaitable[Any]]) -> list["ClassificationResult"]:
    """Each image loaded and run through the classifier's map engine (made on the first such request) by
    ``decode(data, work, *args)``, which runs ``work(*args)`` on the image file ``data`` in a decode thread within
    the service's pixel budget (:meth:`~mixnet_cli.service.serve.Service.decode`): the maps are an occasional
    request, so they take no part in the batcher, and a service never asked for one never builds that engine.
    An image that cannot be read gets its error in its place. When the request ends early (its deadline, a
    hang-up: this coroutine is cancelled), images not yet started are never decoded. Raises :class:`UsageError`
    when the service's engine gives no maps."""
    from ..classifier import ClassificationResult

    def failed(name: str, exc: ImageError) -> ClassificationResult:
        return ClassificationResult(input=name, model=model_name, error=exc, architecture=classifier.architecture)

    def run(name: str, data: bytes) -> ClassificationResult:
        try:
            return classifier.classify(data, topk=topk, name=name, cam=True, cam_class=cam.class_id)
        except ImageError as exc:
            return failed(name, exc)

    async def one(name: str, load: ImageLoader) -> ClassificationResult:
        try:
            data = await load()  # a URL is fetched here, its error kept for its image
        except ImageError as exc:
            return failed(name, exc)
        return await decode(data, run, name, data)

    tasks = [asyncio.ensure_future(one(name, load)) for name, load in images]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # one image failing the request (no maps here) ends the others' work
            task.cancel()


@functools.lru_cache(maxsize=1)
def page() -> tuple[bytes, dict[str, str]]:
    """The page and its headers. Its policy lets the browser run the page's own script and style only (named by
    their hashes: no injected script or inline event handler would run) and talk to this service only."""
    import base64
    import hashlib
    import re
    from importlib import resources

    html = resources.files(__package__).joinpath(PAGE_FILE).read_bytes()

    def hashes(tag: bytes) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'"
                        for body in re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", html, re.S))

    policy = (f"default-src 'none'; script-src {hashes(b'script')}; style-src {hashes(b'style')}; "
              "img-src blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


# The query parameters of POST /v1/classify, for the service's OpenAPI document.
OPENAPI_PARAMETERS = [
    {"name": "cam", "in": "query", "schema": {"type": "integer", "enum": [0, 1]},
     "description": "1: each answer also has `cam`, the class activation map of its top-1 class (7x7 `grid` over "
                    "the crop the network saw, `crop` in photo pixels)"},
    {"name": "cam_class", "in": "query", "schema": {"type": "integer", "minimum": 0},
     "description": "the map of this class instead of the top-1 (implies cam=1)"},
]
OPENAPI_PATH = {"get": {"summary": "A page to try the service in a browser: photos in, top-5 and heat maps out",
                        "responses": {"200": {"description": "the page", "content": {"text/html": {}}}}}}

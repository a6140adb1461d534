"""What ``mixnet serve`` adds for class activation maps: the ``cam`` and ``cam_class`` query parameters, answers with
maps, and the page at ``GET /`` (one static file of this package, ``page.html``). Kept apart from ``serve.py``, which
calls these from its routes."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..base.errors import ImageError, UsageError

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
    if not (raw_class.isascii() and raw_class.isdigit()) or not 0 <= int(raw_class) < num_classes:
        raise UsageError(f"cam_class must be a class of the model, 0 to {num_classes - 1}, got {raw_class!r}")
    return CamRequest(int(raw_class))


async def classify_with_maps(classifier: "Classifier", model_name: str, topk: int,
                             images: list[tuple[str, Callable[[], bytes]]], cam: CamRequest,
                             threads: Executor) -> list["ClassificationResult"]:
    """Each image decoded and run through the classifier's map engine (made on the first such request) in one of
    ``threads``: the maps are an occasional request, so they take no part in the batcher, and a service never
    asked for one never builds that engine. An image that cannot be read gets its error in its place. Raises
    :class:`UsageError` when the service's engine gives no maps."""
    from ..classifier import ClassificationResult

    loop = asyncio.get_running_loop()

    def run(name: str, load: Callable[[], bytes]) -> ClassificationResult:
        try:
            return classifier.classify(load(), topk=topk, name=name, cam=True, cam_class=cam.class_id)
        except ImageError as exc:
            return ClassificationResult(input=name, model=model_name, error=exc,
                                        architecture=classifier.architecture)

    return list(await asyncio.gather(*(loop.run_in_executor(threads, run, name, load) for name, load in images)))


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

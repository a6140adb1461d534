"""What the endpoint modules of ``mixnet serve`` (``serve.py``'s ``/v1``, ``oip.py``'s v2) share in handling one
request, written once: the client hanging up, a compressed body refused, and images handed to
:meth:`Service.classify` as loaders.

A client that hangs up gets no answer, so its work is cancelled (its images leave the queue before their forward
pass) and the request is counted as 499, nginx's "client closed request": no error, no warning. While the body
is read, ASGI says so with an ``http.disconnect`` message in its place (``serve.read_body`` raises
:class:`ClientGone`); after it, the only message left is that one, which :func:`until_client_gone` races against
the work. No third-party import: ``oip.py`` and ``serve.py`` both import this module, never each other.

Bodies in transit are bounded by a :class:`BodyBudget` of bytes, apart from the images' admission: a request is
admitted to its model's queue only once its body is in (its images known), so slow uploads hold no place in the
queue, and what they cost while they arrive (memory) is bounded by the budget instead.

A request's work cancelled because its deadline passed is cancelled with the message :data:`DEADLINE_PASSED`, so
that the images it leaves unanswered are counted as dropped (not as a client hang-up).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")
# The message of the cancellation of a request's work whose deadline passed (``Task.cancel(msg=...)``).
DEADLINE_PASSED = "deadline passed"
Receive = Callable[[], Awaitable[dict[str, Any]]]
# An image's encoded bytes, when awaited: at hand (an upload) or fetched (a URL).
ImageLoader = Callable[[], Awaitable[bytes]]


class ClientGone(Exception):
    """The client hung up before its answer: counted as 499 (nginx's "client closed request"), no work left."""


async def client_gone(receive: Receive) -> None:
    """Return when the client hangs up (call it once the body is read; until then it would take body chunks)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_client_gone(work: Awaitable[T], receive: Receive) -> T:
    """``work``'s result, or :class:`ClientGone` as soon as the client hangs up first (``work`` is then
    cancelled). Call it once the request's body is read."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(client_gone(receive))
    why: tuple[Any, ...] = ()
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError as exc:
        why = exc.args  # the deadline's message, passed on to the work
        raise
    finally:
        gone.cancel()
        if not task.done():
            task.cancel(*why)  # the client left, or this request was cancelled (its deadline): no more work for it
    if not task.done() or task.cancelled():
        raise ClientGone
    return task.result()


def compressed_body(headers: Any) -> str | None:
    """Why a request whose body is compressed (``Content-Encoding`` other than identity) is refused with 415,
    or None when it is not: the service does not decompress (a small body could unpack to gigabytes)."""
    encoding = (headers.get("content-encoding") or "identity").strip().lower()
    if encoding == "identity":
        return None
    return (f"Content-Encoding {encoding[:40]} is not accepted; send the request uncompressed (images are "
            "compressed already)")


def bytes_loader(data: bytes) -> ImageLoader:
    """The loader of an image whose bytes are at hand (an upload, a v2 tensor element)."""
    async def load() -> bytes:
        return data

    return load


def cancelled_by_deadline(exc: BaseException) -> bool:
    """Whether ``exc`` (a :class:`asyncio.CancelledError`) cancels work because its request's deadline passed."""
    return isinstance(exc, asyncio.CancelledError) and DEADLINE_PASSED in exc.args


class BodyBudget:
    """Bytes of request bodies being received, bounded: each request takes what arrives as it arrives, and gives
    it all back when its body is in (or it ends). Counting bytes received, not bytes declared, bounds the memory
    the bodies hold without letting a few senders block every upload by declaring large bodies and sending them
    slowly: a slow sender holds only what it has sent (and the minimum body rate closes a drip); filling the
    budget takes sending that many bytes at once. Use it on the event loop.

    ``reserve`` bytes of the ``total`` are kept for small bodies (``small`` bytes or fewer, declared or read): large
    bodies sent fast and then stalled (until the body idle timeout closes them) cannot shut out a photo."""

    def __init__(self, total: int, on_body: Callable[[int], None] | None = None, reserve: int = 0,
                 small: int = 0) -> None:
        self.total = total
        self.reserve = reserve
        self.small = small
        self.used = 0
        self.on_body = on_body  # told the bytes of each body once read, or refused part-way

    def fits(self, size: int, body_size: int = 0) -> bool:
        """Whether ``size`` more bytes fit now, for a body of ``body_size`` bytes once they are in (its declared
        length, or what it has sent with them): one over ``small`` may not take the reserve."""
        limit = self.total if body_size <= self.small else self.total - self.reserve
        return self.used + size <= limit

    def take(self, size: int) -> None:
        self.used += size

    def give_back(self, size: int) -> None:
        self.used = max(0, self.used - size)

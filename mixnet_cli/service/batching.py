"""Dynamic batching for one in-process model: images that arrive together run as one forward pass.

A :class:`DynamicBatcher` sits between request handlers (on an asyncio event loop) and an engine (blocking calls,
run in threads). Handlers first :meth:`~DynamicBatcher.admit` their images against a bounded queue (a full queue
raises :class:`Overloaded` at once, so memory and waiting stay bounded), decode them wherever they like, then
``await`` :meth:`~DynamicBatcher.submit` for each preprocessed image. One loop per model forms batches: it waits for
the first image, gathers more for at most ``max_wait_s`` or until ``max_batch_size`` are there, and hands the
batch to the engine in a thread; each caller gets its own row back as soon as its batch is done. While a batch
runs, the next one gathers, so decoding and inference overlap.

Batches take only sizes on a ladder (1, 2, 4, ... up to ``max_batch_size``): OpenVINO runs each batch size on a
model compiled for it, and a handful of sizes, compiled while the service starts, keep compiling out of the
request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from ..base.errors import Overloaded

T = TypeVar("T")


def batch_ladder(max_batch_size: int) -> list[int]:
    """The batch sizes a batcher runs: powers of two below ``max_batch_size``, and ``max_batch_size`` itself."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


@dataclass
class _Waiting:
    array: np.ndarray
    future: "asyncio.Future[np.ndarray]"
    deadline: float = math.inf  # the loop's clock: past it, nobody waits for the answer
    queued_at: float = field(default_factory=time.perf_counter)


class PixelBudget:
    """Pixels decoded at once, bounded: :meth:`run` waits (on the event loop, holding no thread) until an
    image's pixels fit beside those being decoded. A smaller image may pass a larger one that does not fit yet,
    so small photos keep flowing while huge ones are decoded a few at a time. Create it on the event loop."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiting: deque[tuple[int, "asyncio.Future[None]"]] = deque()

    async def run(self, pixels: int, threads: Executor, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in one of ``threads``, holding ``pixels`` until it returns. Cancelled while it
        waits for room, it never starts; cancelled while it runs (its request is gone), the thread cannot be
        stopped and keeps its memory until it ends, so the pixels stay held until then, not until the
        cancellation."""
        pixels = await self._take(pixels)
        loop = asyncio.get_running_loop()
        try:
            job = threads.submit(function, *args)
        except BaseException:
            self._give_back(pixels)
            raise

        def ended(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for room any more
                loop.call_soon_threadsafe(self._give_back, pixels)

        job.add_done_callback(ended)
        return await asyncio.wrap_future(job)

    async def _take(self, pixels: int) -> int:
        """Wait until ``pixels`` (at most the whole budget) fit, take them, and return how many were taken."""
        pixels = min(max(1, pixels), self.total)
        if self.used + pixels <= self.total:
            self.used += pixels
            return pixels
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((pixels, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._give_back(pixels)  # granted just as the request gave up
            raise
        return pixels

    def _give_back(self, pixels: int) -> None:
        self.used -= pixels
        for entry in list(self._waiting):
            size, future = entry
            if future.done():
                self._waiting.remove(entry)
            elif self.used + size <= self.total:
                self.used += size
                self._waiting.remove(entry)
                future.set_result(None)


class DynamicBatcher:
    """Batches preprocessed images (``3 x S x S`` float32 each) for ``run_batch``, which maps a list of them to an
    ``N x C`` array (one row per image, e.g. probabilities), in a thread of ``executor``.

    ``max_queue`` bounds the images admitted and not yet answered (decoding, waiting or in a batch);
    ``parallel`` is how many batches may run at once (an engine's ``parallel``); ``on_batch(size, seconds)`` is
    called after each batch, ``on_drop()`` for each image dropped past its deadline (for metrics). Create it on
    the event loop that will call :meth:`submit`.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[np.ndarray]], np.ndarray],
        executor: Executor,
        *,
        max_batch_size: int = 8,
        max_wait_s: float = 0.002,
        max_queue: int = 64,
        parallel: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or parallel < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size, max_queue and parallel must be at least 1, max_wait_s at least 0")
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.ladder = batch_ladder(max_batch_size)
        self._on_batch = on_batch
        self._on_drop = on_drop
        self._pending = 0  # admitted, not yet released
        self._waiting: deque[_Waiting] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(parallel)
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self.batch_seconds = 0.0  # how long the last forward pass took
        self.dropped = 0  # images dropped before their forward pass, past their deadline

    @property
    def depth(self) -> int:
        """Images admitted and not yet answered."""
        return self._pending

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._form_batches())

    def check_room(self, count: int) -> None:
        """Raise :class:`Overloaded` when the queue cannot take ``count`` more images now (reserves nothing)."""
        if self._closing:
            raise Overloaded("the service is shutting down", retry_after=1)
        if self._pending + count > self.max_queue:
            raise Overloaded(f"the queue is full ({self._pending} of {self.max_queue} images waiting); "
                             "try again shortly", retry_after=1)

    def admit(self, count: int) -> None:
        """Reserve room for ``count`` images, or raise :class:`Overloaded` when the queue cannot take them.
        Every admitted image must be given back with :meth:`release`, answered or not."""
        self.check_room(count)
        self._pending += count

    def release(self, count: int) -> None:
        self._pending = max(0, self._pending - count)

    async def submit(self, array: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """This image's row of ``run_batch``'s output, once its batch has run. Cancelling the caller (a deadline,
        a client gone) takes the image out of a batch that has not started. With ``deadline`` (the loop's clock),
        an image whose batch would end past it is dropped before its forward pass: :class:`asyncio.TimeoutError`."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(array, future, math.inf if deadline is None else deadline))
        self._arrived.set()
        return await future

    async def close(self) -> None:
        """Finish the batches that are running and stop; images still waiting get an error."""
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._waiting:
            item = self._waiting.popleft()
            if not item.future.done():
                item.future.set_exception(Overloaded("the service is shutting down"))

    def _live_waiting(self) -> int:
        # An image whose request gave up (cancelled) or whose answer would come after its deadline (a batch takes
        # about as long as the last one did) costs no forward pass.
        too_late = asyncio.get_running_loop().time() + self.batch_seconds
        for item in self._waiting:
            if not item.future.done() and item.deadline < too_late:
                item.future.set_exception(asyncio.TimeoutError())
                self.dropped += 1
                if self._on_drop is not None:
                    self._on_drop()
        while self._waiting and self._waiting[0].future.done():
            self._waiting.popleft()
        return sum(1 for item in self._waiting if not item.future.done())

    async def _next_arrival(self, timeout: float | None) -> bool:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _form_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A free engine slot first: while every slot is busy, images gather into the next batch.
            await self._slots.acquire()
            try:
                while self._live_waiting() == 0:
                    await self._next_arrival(None)
                gather_until = loop.time() + self.max_wait_s
                while self._live_waiting() < self.max_batch_size:
                    left = gather_until - loop.time()
                    if left <= 0 or not await self._next_arrival(left):
                        break
            except BaseException:
                self._slots.release()
                raise
            available = self._live_waiting()
            size = max(s for s in self.ladder if s <= available)
            batch: list[_Waiting] = []
            while len(batch) < size:
                item = self._waiting.popleft()
                if not item.future.done():
                    batch.append(item)
            if self._waiting:
                self._arrived.set()  # what is left starts the next batch without waiting for a new arrival
            task = loop.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            rows = await loop.run_in_executor(self._executor, self._run_batch, [item.array for item in batch])
        except Exception as exc:  # noqa: BLE001 (every caller of the batch gets the engine's error)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            for item, row in zip(batch, rows):
                if not item.future.done():
                    item.future.set_result(row)
        finally:
            self._slots.release()
            self.batch_seconds = time.perf_counter() - started
            if self._on_batch is not None:
                self._on_batch(len(batch), self.batch_seconds)

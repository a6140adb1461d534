"""Memory a large request body leaves behind, given back to the operating system (glibc only).

A request body of tens of MB (a v2 JSON of base64 images) goes through several copies (the chunks, the joined
body, the parsed JSON, the decoded images); freed, they stay in glibc's heap arenas, fragmented among smaller
live objects, and the process's resident memory stays at its peak (measured: 16 concurrent 31 MB v2 bodies,
repeated, took it from 0.35 to 3.4 GB, and it never came down). ``malloc_trim(0)`` returns the free pages of
every arena. It runs after a request whose body was large has ended, in a thread (it walks the heaps), at most
one at a time. Where the C library has no ``malloc_trim`` (musl, macOS, Windows) nothing is done.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

_log = logging.getLogger(__name__)

# Bodies at least this large are followed by a trim (a photo's few MB are not worth one).
TRIM_AFTER_BYTES = 8 * 1024 * 1024


def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's C library
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class MemoryTrimmer:
    """Calls ``malloc_trim(0)`` in a thread after requests with large bodies end. Use it on the event loop."""

    def __init__(self) -> None:
        self._trim = _malloc_trim()
        self.pending = False  # a large body was read since the last trim began
        self._running = False

    def body_read(self, size: int) -> None:
        """A request body of ``size`` bytes was read."""
        if size >= TRIM_AFTER_BYTES and self._trim is not None:
            self.pending = True

    def request_ended(self) -> None:
        """A request ended (its memory freed): trim if a large body was read since the last trim."""
        if not self.pending or self._running or self._trim is None:
            return
        self.pending = False
        self._running = True
        future = asyncio.get_running_loop().run_in_executor(None, self._trim, 0)
        future.add_done_callback(self._done)

    def _done(self, future: "asyncio.Future[int]") -> None:
        self._running = False
        if future.exception() is not None:  # never expected; a trim must not take a request down
            _log.debug("malloc_trim failed: %s", future.exception())
        self.request_ended()  # a large request that ended during this trim freed its memory after it began

"""Every ``MIXNET_*`` environment variable is read here and nowhere else.

Precedence everywhere is: command-line flag, then environment variable, then the default below. Functions (not
module constants) so that a test or a long-running program sees changes to the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def home() -> Path:
    """Cache root: ``MIXNET_HOME`` or the platform's user cache directory for ``mixnet``."""
    explicit = os.environ.get("MIXNET_HOME", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    import platformdirs  # cheap, but only needed here

    return Path(platformdirs.user_cache_dir("mixnet", appauthor=False))


def mirrors() -> list[str]:
    """Mirror URL prefixes from ``MIXNET_MIRROR``: one or more, separated by commas or whitespace."""
    raw = os.environ.get("MIXNET_MIRROR", "")
    return [part for part in raw.replace(",", " ").split() if part]


def offline() -> bool:
    """``MIXNET_OFFLINE=1``: never touch the network."""
    return _flag("MIXNET_OFFLINE")


def debug() -> bool:
    """``MIXNET_DEBUG=1``: show tracebacks instead of one-line errors."""
    return _flag("MIXNET_DEBUG")


def device() -> str | None:
    """Default for ``--device`` from ``MIXNET_DEVICE`` (auto, cpu, gpu, gpu:N)."""
    return os.environ.get("MIXNET_DEVICE", "").strip() or None


def engine() -> str | None:
    """Default for ``--engine`` from ``MIXNET_ENGINE`` (auto, onnxruntime, paddle, dygraph)."""
    return os.environ.get("MIXNET_ENGINE", "").strip() or None


def download_timeout() -> float:
    """Seconds to wait for the server to connect or send the next bytes (``MIXNET_TIMEOUT``, default 30)."""
    raw = os.environ.get("MIXNET_TIMEOUT", "").strip()
    try:
        return float(raw) if raw else 30.0
    except ValueError:
        return 30.0


def _number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        return default
    return value if value >= minimum else default  # also rejects nan


def download_retries() -> int:
    """How many times a failed download is retried (``MIXNET_RETRIES``, default 4; 0 disables retries).

    Retried: connection failures, timeouts, HTTP 429 and 5xx. Each retry resumes where the last one stopped.
    """
    return int(_number("MIXNET_RETRIES", 4, 0))


def download_backoff() -> float:
    """Seconds before the first retry, doubling after each (``MIXNET_BACKOFF``, default 1; 0 retries at once)."""
    return _number("MIXNET_BACKOFF", 1.0, 0.0)


def download_backoff_max() -> float:
    """The longest single wait between retries, also for a server's ``Retry-After`` (``MIXNET_BACKOFF_MAX``, default 30)."""
    return _number("MIXNET_BACKOFF_MAX", 30.0, 0.0)

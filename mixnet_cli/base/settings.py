"""Every ``MIXNET_*`` environment variable is read here and nowhere else.

Precedence everywhere is: command-line flag, then environment variable, then the default below. Functions (not
module constants) so that a test or a long-running program sees changes to the environment.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

from .errors import UsageError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise UsageError(f"environment variable {name}={os.environ[name]!r} is not a yes/no value; set it to 1 or 0")


def home_source() -> str:
    """Where the cache root comes from: ``MIXNET_HOME`` or the user cache directory."""
    return "MIXNET_HOME" if os.environ.get("MIXNET_HOME", "").strip() else "user cache directory"


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


VERIFY_MODES = ("changed", "always")


def verify_mode() -> str:
    """When a cached weights file or converted model is hashed in full again (``MIXNET_VERIFY``): ``changed``
    (default) when its size, modification time or inode differ from those recorded when it was last hashed;
    ``always`` on every use."""
    raw = os.environ.get("MIXNET_VERIFY", "").strip().lower()
    if not raw:
        return "changed"
    if raw not in VERIFY_MODES:
        raise UsageError(f"environment variable MIXNET_VERIFY={os.environ['MIXNET_VERIFY']!r} must be one of "
                         f"{', '.join(VERIFY_MODES)}")
    return raw


def choose(flag: str | None, variable: str, check: Callable[[str], str], default: str) -> str:
    """The precedence of every setting: the flag, else the environment variable ``variable``, else ``default``;
    ``check`` normalises the value or raises :class:`UsageError` (one from the variable says so)."""
    if flag:
        return check(flag)
    from_environment = os.environ.get(variable, "").strip()
    if from_environment:
        try:
            return check(from_environment)
        except UsageError as exc:
            raise UsageError(f"{exc} (from the environment variable {variable})") from None
    return default


def device() -> str | None:
    """Default for ``--device`` from ``MIXNET_DEVICE`` (auto, cpu, gpu, gpu:N)."""
    return os.environ.get("MIXNET_DEVICE", "").strip() or None


def engine() -> str | None:
    """Default for ``--engine`` from ``MIXNET_ENGINE`` (auto, onnxruntime, paddle, dygraph)."""
    return os.environ.get("MIXNET_ENGINE", "").strip() or None


def download_timeout() -> float:
    """Seconds to wait for the server to connect or send the next bytes (``MIXNET_TIMEOUT``, default 30)."""
    return _number("MIXNET_TIMEOUT", 30.0, 0.0, strictly_above=True)


def _number(name: str, default: float, minimum: float, strictly_above: bool = False) -> float:
    """A number from the environment; a value that is not one, or is out of range, is a usage error naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    too_small = value <= minimum if strictly_above else value < minimum
    if math.isnan(value) or math.isinf(value) or too_small:
        bound = f"above {minimum:g}" if strictly_above else f"{minimum:g} or more"
        raise UsageError(f"environment variable {name}={os.environ[name]!r} must be a number {bound} (default {default:g})")
    return value


def cpu_threads() -> int | None:
    """CPU threads per forward pass when neither ``--threads`` nor the API says: ``OMP_NUM_THREADS`` (the variable
    every numerical library honours) when set to a positive whole number, else None (the engines take the
    physical cores)."""
    # OpenMP also takes a list for nested levels ("4,2"): the first is the one a forward pass uses.
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 1024:
        raise UsageError(f"environment variable OMP_NUM_THREADS={value!r} must be a whole number from 1 to 1024")
    return int(value)


def serve_token() -> str | None:
    """The token ``mixnet serve`` requires and ``classify --server`` sends when no ``--token-file`` is given
    (``MIXNET_SERVE_TOKEN``; unset or blank: none)."""
    return os.environ.get("MIXNET_SERVE_TOKEN", "").strip() or None


def url_deadline() -> float:
    """Seconds an image URL may take from the first connection to the last byte, retries included
    (``MIXNET_URL_DEADLINE``, default 60): past it, that input fails and the run goes on."""
    return _number("MIXNET_URL_DEADLINE", 60.0, 0.0, strictly_above=True)


def download_retries() -> int:
    """How many times a failed download is retried (``MIXNET_RETRIES``, default 4; 0 disables retries).

    Retried: connection failures, timeouts, HTTP 429 and 5xx (not a host name that does not resolve). Each retry
    resumes where the last one stopped.
    """
    return int(_number("MIXNET_RETRIES", 4, 0))


def download_backoff() -> float:
    """Seconds before the first retry, doubling after each (``MIXNET_BACKOFF``, default 1; 0 retries at once)."""
    return _number("MIXNET_BACKOFF", 1.0, 0.0)


def download_backoff_max() -> float:
    """The longest single wait between retries, also for a server's ``Retry-After`` (``MIXNET_BACKOFF_MAX``, default 30)."""
    return _number("MIXNET_BACKOFF_MAX", 30.0, 0.0)


def load_token(token_file: Path | None) -> str | None:
    """The token of ``mixnet serve`` (and of ``classify --server``): the first line of ``token_file`` (surrounding
    spaces dropped), else
    ``MIXNET_SERVE_TOKEN``, else None. Raises :class:`UsageError` for a file that cannot be read or is empty."""
    if token_file is None:
        return serve_token()
    try:
        lines = token_file.read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--token-file {token_file}: cannot read it ({getattr(exc, 'strerror', None) or exc}); "
                         "give a readable text file holding the token") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise UsageError(f"--token-file {token_file}: the file is empty; put the token on its first line")
    return token

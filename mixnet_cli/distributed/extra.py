"""The ``[ray]`` extra's libraries, imported only when a function needs them, with the one-line error that says
what to install without them; and pyarrow's filesystem for a URI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..base.errors import EngineError, UsageError

if TYPE_CHECKING:
    import pyarrow.fs


def _ray_missing_hint() -> str:
    from ..base.third_party import install_hint

    return f"the Ray route needs the [ray] extra: {install_hint('ray')}"


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 (fails beside numpy 1.x: pyarrow needs numpy 2)
    except ImportError as exc:
        raise EngineError(f"{_ray_missing_hint()} ({exc})") from None
    return ray


def _import_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.csv  # noqa: F401
        import pyarrow.fs  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise EngineError(f"{_ray_missing_hint()} ({exc})") from None
    return pyarrow


def _filesystem(uri: str) -> tuple["pyarrow.fs.FileSystem", str]:
    pa = _import_pyarrow()
    try:
        return pa.fs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise UsageError(f"{uri}: no filesystem pyarrow can open ({exc})") from None

"""Importing the heavy third-party libraries without their side effects on the user's machine.

Running ``mixnet`` must print nothing but its own output and write nothing outside its cache. On import,
paddle warns about ccache and creates ``~/.cache/paddle/``, faiss (pulled in by paddleclas) logs at INFO, OpenVINO sends a usage event and writes
``~/intel/``, and ONNX Runtime writes a device id and an event store under ``~/.cache/Microsoft/`` and a
session file, ``.ses``, in the temporary folder. This is the
one place that imports them, and contains each of those.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
import tempfile
import warnings
from types import ModuleType
from typing import Iterator


def _writable(directory: "os.PathLike[str]") -> bool:
    """Whether ``directory`` exists or can be made, and can be written."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


@contextlib.contextmanager
def _stderr_without(word: str, *, unless: bool = False) -> Iterator[None]:
    """Hold back the lines containing ``word`` that C++ libraries write to file descriptor 2 in this block (Python's
    own ``sys.stderr`` is flushed first and works as usual); the other lines are written out after it. Only for a
    short block in which no other thread writes to stderr (an import on the main thread)."""
    if unless:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True) if word.encode() not in line]
            if kept:
                os.write(2, b"".join(kept))


def _contain_onnxruntime_import(module: str) -> ModuleType:
    # ONNX Runtime places its telemetry files under XDG_CACHE_HOME, read while it loads: point that into our
    # cache for the duration of the import, then turn its telemetry events off.
    from .cache import engine_home

    # Its telemetry also writes a session file, ".ses", into the temporary folder (TMPDIR, else /tmp) as it
    # loads: TMPDIR points into the same folder for the import too.
    home = engine_home("onnxruntime")
    previous = {name: os.environ.get(name) for name in ("XDG_CACHE_HOME", "TMPDIR")}
    os.environ["XDG_CACHE_HOME"] = str(home)
    os.environ["TMPDIR"] = str(home)
    try:
        # In a cache that cannot be written, ONNX Runtime prints a coloured warning that it cannot keep its
        # telemetry id there; that line goes, anything else it prints on import stays.
        with _stderr_without("telemetry", unless=_writable(home)):
            loaded = importlib.import_module(module)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    root = sys.modules["onnxruntime"]
    disable = getattr(root, "disable_telemetry_events", None)
    if disable is not None:
        disable()
    return loaded


def _contain_paddle_import(module: str) -> ModuleType:
    # `import paddle` creates ~/.cache/paddle/dataset (paddle.dataset.common, from HOME, read while it loads):
    # point HOME into our cache for the duration of the import.
    from .cache import engine_home

    # It also sets OMP_NUM_THREADS=1 for the whole process, which mixnet reads as the user's thread count: that
    # variable is put back as it was too.
    saved = {name: os.environ.get(name) for name in ("HOME", "OMP_NUM_THREADS")}
    os.environ["HOME"] = str(engine_home("paddle"))
    try:
        return importlib.import_module(module)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def import_quietly(module: str) -> ModuleType:
    """Import ``module`` (paddle, paddleclas, paddle2onnx, openvino, onnxruntime...) without its import-time noise,
    telemetry or files outside the cache."""
    # OpenVINO's `import openvino` sends a usage event through openvino_telemetry (and writes ~/intel/) unless
    # that package is missing; marking it missing makes OpenVINO use its own no-op stand-in.
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ccache.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # faiss (pulled in by paddleclas) logs "Loading faiss with AVX512 support" at INFO on import.
        logging.getLogger("faiss").setLevel(logging.WARNING)
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        root = module.split(".", 1)[0]
        if root == "onnxruntime" and "onnxruntime" not in sys.modules:
            return _contain_onnxruntime_import(module)
        if root in ("paddle", "paddleclas", "paddle2onnx") and "paddle" not in sys.modules:
            return _contain_paddle_import(module)
        if root == "openvino" and "openvino" not in sys.modules:
            return _skip_openvino_converter(module)
        return importlib.import_module(module)


def _skip_openvino_converter(module: str) -> ModuleType:
    # `import openvino` imports its model converter (openvino.tools.ovc, a tenth of a second, and a telemetry
    # event) only to offer openvino.convert_model, which mixnet never calls; openvino skips it when the import
    # fails. Marked missing for the duration of the import only: a later `import openvino.tools.ovc` works.
    sys.modules.setdefault("openvino.tools.ovc", None)  # type: ignore[arg-type]
    try:
        return importlib.import_module(module)
    finally:
        if sys.modules.get("openvino.tools.ovc", 0) is None:
            del sys.modules["openvino.tools.ovc"]


PADDLE_EXTRA = 'pip install "mixnet-cli[paddle]"'


def module_installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def distribution_installed(name: str) -> bool:
    """Whether the distribution ``name`` (``paddlepaddle-gpu``) is installed: its metadata folder
    (``<name>-<version>.dist-info``, or ``.egg-info``) in a folder of ``sys.path``, found as ``importlib.metadata``
    finds it (names compared normalised, case aside) but without importing it, which took a tenth of a cold
    one-image run on a loaded machine (``auto`` asks this on every run)."""
    wanted = re.sub(r"[-_.]+", "_", name).lower()
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:  # not a folder (a zip), or gone
            continue
        for found in names:
            lowered = found.lower()
            if lowered.endswith((".dist-info", ".egg-info")):
                # <name>-<version>.dist-info: the name is escaped (no "-" in it), so it ends at the first "-".
                if re.sub(r"[-_.]+", "_", lowered[:-len(".dist-info")].split("-", 1)[0]) == wanted:
                    return True
    return False


def paddle_missing() -> str | None:
    """What of the ``[paddle]`` extra is not installed (None: paddle and paddleclas both are), found without
    importing either."""
    missing = [name for name, module in (("paddlepaddle", "paddle"), ("paddleclas", "paddleclas"))
               if not module_installed(module)]
    if not missing:
        return None
    what = " and ".join(missing)
    if "paddleclas" in missing and sys.version_info >= (3, 12):
        return (f"{what}, which need Python 3.10 or 3.11 (paddleclas 2.6.0 pins numpy 1.24.4, which has no wheels "
                f"for Python 3.12+): in a Python 3.11 environment, {PADDLE_EXTRA}")
    return f"{what}: {PADDLE_EXTRA}"


def require_paddle(purpose: str) -> None:
    """Raise :class:`EngineError` naming what to install when the ``[paddle]`` extra is missing."""
    missing = paddle_missing()
    if missing is not None:
        from .errors import EngineError

        raise EngineError(f"{purpose} needs the [paddle] extra; missing {missing}")


def import_cv2(max_pixels: int) -> ModuleType:
    """OpenCV, quiet, with its decoders limited to ``max_pixels`` pixels.

    OpenCV's own log (``[ WARN:0@0.6] ... PNG input buffer is incomplete``) goes to stderr for every odd file it
    meets; mixnet reports each input's trouble itself, in one line. ``OPENCV_IO_MAX_IMAGE_PIXELS`` (default 2^30)
    is read by OpenCV on its first decode, so it is set, unless the user set it, before then: a header that
    lies about its size is refused instead of allocated. libpng's own warnings (``libpng warning: ...``) are
    printed by libpng itself and cannot be switched off from here.
    """
    if "cv2" not in sys.modules:
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(max_pixels))
    import cv2

    global _cv2_quiet
    if not _cv2_quiet:
        try:
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        except AttributeError:  # an OpenCV build without the logging module
            pass
        _cv2_quiet = True
    return cv2


_cv2_quiet = False

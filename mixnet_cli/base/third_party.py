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
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator


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
        restore_stop_signals()


def restore_stop_signals() -> None:
    """Put the process's own handling of SIGTERM and SIGINT (Python's handlers, or the default) back in front of a
    C handler a library installed over it.

    Paddle's core installs one for SIGTERM when it loads: it prints a C++ "FatalError: Termination signal" block
    on stdout (into a JSON lines output) and exits, and in `mixnet serve` it would stop the service instead of
    draining it. Called after paddle's import; only on the main thread (Python sets handlers nowhere else), so a
    service that loads its models in a thread calls it again on its event loop."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    for number in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(number)
        if handler is not None:  # None: a handler Python did not install, left alone
            signal.signal(number, handler)


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


def install_command(extra: str | None = None, *, direct_url: dict[str, Any] | None = None, installed: bool = True,
                    checkout: Path | None = None) -> str:
    """The ``pip install`` line that gives mixnet-cli with ``extra`` from where this copy came (PEP 610's
    ``direct_url.json``, ``direct_url``): its checkout directory (``-e`` if it was editable), the Git URL and commit,
    or the wheel or archive URL. Installed without one (from an index), the index form; not installed at all (run
    from a checkout on ``PYTHONPATH``), that ``checkout``; knowing neither, both forms."""
    from urllib.parse import unquote, urlsplit

    suffix = f"[{extra}]" if extra else ""
    if direct_url and direct_url.get("url"):
        url = str(direct_url["url"])
        if "dir_info" in direct_url and url.startswith("file:"):
            editable = "-e " if direct_url["dir_info"].get("editable") else ""
            return f'pip install {editable}"{unquote(urlsplit(url).path)}{suffix}"'
        if "vcs_info" in direct_url:
            vcs = direct_url["vcs_info"]
            commit = f"@{vcs['commit_id']}" if vcs.get("commit_id") else ""
            return f'pip install "mixnet-cli{suffix} @ {vcs.get("vcs", "git")}+{url}{commit}"'
        return f'pip install "mixnet-cli{suffix} @ {url}"'
    if installed:
        return f'pip install "mixnet-cli{suffix}"'
    if checkout is not None:
        return f'pip install "{checkout}{suffix}"'
    return f'pip install "/path/to/mixnet-cli{suffix}" (a checkout), or pip install "mixnet-cli{suffix}" from an index that has it'


def install_hint(extra: str | None = None) -> str:
    """:func:`install_command` for this copy of mixnet-cli (its metadata read, nothing imported)."""
    import json
    from importlib import metadata

    try:
        distribution = metadata.distribution("mixnet-cli")
    except metadata.PackageNotFoundError:
        root = Path(__file__).resolve().parents[2]
        return install_command(extra, installed=False,
                               checkout=root if (root / "pyproject.toml").is_file() else None)
    try:
        direct_url = json.loads(distribution.read_text("direct_url.json") or "null")
    except (OSError, ValueError):
        direct_url = None
    return install_command(extra, direct_url=direct_url if isinstance(direct_url, dict) else None)


def torch_install_hint() -> str:
    """How to get the torch engine, and, where no NVIDIA GPU is visible, why a CPU is better served without it:
    torch from PyPI brings its CUDA wheels (gigabytes), and ONNX Runtime, the default, is faster on a CPU."""
    if Path("/dev/nvidiactl").exists() or sys.platform == "win32":
        return f"{install_hint('torch')} (for a GPU, a CUDA build of torch: see pytorch.org)"
    return (f"not needed on a CPU: ONNX Runtime (the default) is faster there; {install_hint('torch')} pulls "
            "torch's CUDA wheels, gigabytes, on Linux (for its CPU build, first: pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu)")


def paddle_install_hint() -> str:
    return install_hint("paddle")


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
                f"for Python 3.12+): in a Python 3.11 environment, {paddle_install_hint()}")
    return f"{what}: {paddle_install_hint()}"


def require_paddle(purpose: str) -> None:
    """Raise :class:`EngineError` naming what to install when the ``[paddle]`` extra is missing."""
    missing = paddle_missing()
    if missing is not None:
        from .errors import EngineError

        raise EngineError(f"{purpose} needs the [paddle] extra; missing {missing}")


# What to install for a system library that OpenCV's GUI build (opencv-python) links and slim containers lack.
_SYSTEM_PACKAGES = {"libGL.so": "libgl1", "libgthread-2.0.so": "libglib2.0-0", "libglib-2.0.so": "libglib2.0-0",
                    "libSM.so": "libsm6", "libXext.so": "libxext6", "libXrender.so": "libxrender1"}


def opencv_load_problem(exc: ImportError) -> tuple[str, str]:
    """What is wrong with an OpenCV that is installed but cannot load, and what to do, from its ImportError: the
    library the dynamic loader missed (``libGL.so.1: cannot open shared object file``) and the two fixes, the
    system package or the headless wheel, which links no GUI library."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    found = re.search(r"([\w.+-]+\.so(?:\.[\d.]+)?)\b", text)
    library = os.path.basename(found.group(1)) if found else None
    package = next((name for prefix, name in _SYSTEM_PACKAGES.items() if library and library.startswith(prefix)),
                   None)
    state = "is missing" if "cannot open shared object" in text else "cannot be loaded"
    what = f"the system library {library} {state} ({text})" if library else text
    system_fix = (f"install it (Debian/Ubuntu: apt-get install {package}), or " if package
                  else "install the system library it names, or ")
    return what, (f"{system_fix}switch to the headless OpenCV, which needs no GUI libraries: "
                  "pip uninstall -y opencv-python && pip install opencv-python-headless")


def import_cv2(max_pixels: int) -> ModuleType:
    """OpenCV, quiet, with its decoders limited to ``max_pixels`` pixels. Raises
    :class:`~mixnet_cli.base.errors.LibraryError` naming the missing system library and its fix when cv2 is
    installed but cannot load (``opencv-python`` on a machine without ``libGL.so.1``).

    OpenCV's own log (``[ WARN:0@0.6] ... PNG input buffer is incomplete``, ``imdecode_(''): can't read header``)
    goes to stderr for every odd file it meets; mixnet reports each input's trouble itself, in one line.
    ``OPENCV_LOG_LEVEL`` is set before the first import (messages logged while OpenCV loads are covered too) and
    the level is set again through ``cv2.utils.logging`` (the variable is read once; a user's own setting wins
    for the first, not the second). ``OPENCV_IO_MAX_IMAGE_PIXELS`` (default 2^30) is read by OpenCV on its first
    decode, so it is set, unless the user set it, before then: a header that lies about its size is refused
    instead of allocated.
    """
    if "cv2" not in sys.modules:
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(max_pixels))
        os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
    try:
        import cv2
    except ImportError as exc:
        from .errors import LibraryError

        if isinstance(exc, ModuleNotFoundError) and exc.name == "cv2":
            raise LibraryError("OpenCV (cv2) is not installed: reinstall mixnet-cli "
                               "(or pip install opencv-python-headless)") from None
        what, fix = opencv_load_problem(exc)
        raise LibraryError(f"OpenCV (cv2) cannot load: {what}; {fix}") from None

    global _cv2_quiet
    if not _cv2_quiet:
        try:
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        except AttributeError:  # an OpenCV build without the logging module
            pass
        _cv2_quiet = True
    return cv2


_cv2_quiet = False


# C libraries write their own messages to file descriptor 2 themselves: libpng ("libpng warning: gAMA: invalid",
# "libpng error: ..."), libjpeg ("Corrupt JPEG data: ..."), bundled statically inside OpenCV, where no handler of
# theirs can be reached from Python. Each input's trouble is already its one-line error, so while a decoder runs,
# descriptor 2 points to /dev/null. That is safe with the decode threads only because Python's own stderr
# (sys.stderr: mixnet's messages, logging, progress bars) was first moved to a duplicate of descriptor 2 by
# separate_native_stderr(): redirecting descriptor 2 then silences native writes alone, never a line of mixnet's.
# The redirection holds while any thread decodes (a count under a lock), so native messages of other threads in
# those moments go too; MIXNET_DEBUG=1 keeps them all. (The alternatives: a filtering thread reading a pipe
# would lose what is in the pipe when the process dies, exactly the messages that matter then; stripping
# ancillary PNG chunks first would change what OpenCV decodes and still leave libjpeg's and critical chunks' noise.)
_native_stderr_lock = threading.Lock()
_native_stderr_users = 0
_native_stderr_saved: int | None = None


def separate_native_stderr() -> None:
    """Move ``sys.stderr`` to its own duplicate of descriptor 2, so that :func:`native_stderr_silenced` can point
    descriptor 2 elsewhere without touching Python's output. For the command line (a process of its own); does
    nothing when ``sys.stderr`` is not descriptor 2 (captured by a test runner) or with MIXNET_DEBUG=1."""
    global _native_stderr_saved
    from . import settings

    if _native_stderr_saved is not None or settings.debug():
        return
    try:
        if sys.stderr is None or sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return
    sys.stderr.flush()
    duplicate = os.dup(2)
    os.set_inheritable(duplicate, False)
    sys.stderr = open(duplicate, "w", encoding=sys.stderr.encoding, errors=sys.stderr.errors,  # noqa: SIM115
                      buffering=1, closefd=False)
    _native_stderr_saved = duplicate


def stderr_fileno() -> int:
    """The descriptor Python's stderr writes to (2, or its duplicate after :func:`separate_native_stderr`): for
    messages written with ``os.write`` from a signal handler."""
    return _native_stderr_saved if _native_stderr_saved is not None else 2


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """While the block runs, C libraries' own writes to descriptor 2 go to /dev/null (only after
    :func:`separate_native_stderr`; otherwise nothing changes). Safe to enter from several threads at once."""
    global _native_stderr_users
    saved = _native_stderr_saved
    if saved is None:
        yield
        return
    with _native_stderr_lock:
        if _native_stderr_users == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        _native_stderr_users += 1
    try:
        yield
    finally:
        with _native_stderr_lock:
            _native_stderr_users -= 1
            if _native_stderr_users == 0:
                os.dup2(saved, 2)

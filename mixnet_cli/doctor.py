"""`mixnet doctor`: what a bug report needs, and what is wrong with this setup, one check per row."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any, Callable, Iterator

from . import settings

# Distributions whose versions matter for a bug report, in the order shown.
_DISTRIBUTIONS = (
    "mixnet-cli", "paddlepaddle", "paddlepaddle-gpu", "paddleclas", "openvino", "onnxruntime", "onnxruntime-gpu",
    "paddle2onnx", "onnx", "numpy", "opencv-python", "pillow",
)


@dataclass(frozen=True)
class Check:
    check: str
    value: str
    status: str  # "ok", "warn", "fail" or "info"
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _versions() -> Iterator[Check]:
    yield Check("python", f"{platform.python_version()} ({sys.executable})", "ok" if sys.version_info < (3, 12) else "fail",
                "" if sys.version_info < (3, 12) else "paddleclas needs numpy 1.24, which has no wheels for Python 3.12+")
    yield Check("platform", platform.platform(), "info")
    for name in _DISTRIBUTIONS:
        try:
            yield Check(name, metadata.version(name), "ok")
        except metadata.PackageNotFoundError:
            if name in ("mixnet-cli", "paddleclas", "numpy", "pillow", "opencv-python") or (
                name == "paddlepaddle" and not _installed("paddlepaddle-gpu")
            ):
                yield Check(name, "not installed", "fail", "reinstall mixnet-cli: pip install mixnet-cli")
            elif name in ("paddlepaddle-gpu", "onnxruntime-gpu"):
                continue
            else:
                yield Check(name, "not installed", "info")


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def _guarded(name: str, probe: Callable[[], Iterator[Check]]) -> Iterator[Check]:
    try:
        yield from probe()
    except Exception as exc:  # the point of doctor is to report broken installs, not crash on them
        yield Check(name, f"{type(exc).__name__}: {exc}".splitlines()[0][:200], "fail",
                    "reinstall in a fresh virtual environment: pip install mixnet-cli")


def _paddle() -> Iterator[Check]:
    from .engine import resolve_device
    from .imports import import_quietly

    paddle = import_quietly("paddle")
    compiled = paddle.device.is_compiled_with_cuda()
    yield Check("paddle CUDA", "compiled in" if compiled else "CPU-only build", "info")
    if compiled:
        count = paddle.device.cuda.device_count()
        names = [paddle.device.cuda.get_device_name(i) for i in range(count)]
        yield Check("GPUs visible to paddle", ", ".join(names) or "none", "ok" if count else "warn",
                    "" if count else "check nvidia-smi and CUDA_VISIBLE_DEVICES")
    choice = resolve_device("auto")
    yield Check("device auto picks", f"{choice.device} ({choice.reason})", "ok")


def _engine() -> Iterator[Check]:
    from .engine import choose_engine

    for variable, value in (("MIXNET_DEVICE", settings.device()), ("MIXNET_ENGINE", settings.engine())):
        if value:
            yield Check(variable, value, "info")
    choice = choose_engine(settings.engine() or "auto", settings.device() or "auto")
    yield Check("engine auto picks", f"{choice.engine} on {choice.device} ({choice.engine_reason})", "ok")


def _paddleclas() -> Iterator[Check]:
    from .manifest import load_manifest
    from .imports import import_quietly

    spec = next(iter(load_manifest().models.values()))
    import_quietly(spec.architecture.split(":", 1)[0])
    yield Check("MixNet architecture", "imports", "ok")


def _onnxruntime() -> Iterator[Check]:
    if not _installed("onnxruntime") and not _installed("onnxruntime-gpu"):
        return
    from .imports import import_quietly

    onnxruntime = import_quietly("onnxruntime")
    yield Check("onnxruntime providers", ", ".join(onnxruntime.get_available_providers()), "info")


def _cache() -> Iterator[Check]:
    from .cache import cache_root, weights_path
    from .manifest import load_manifest

    root = cache_root()
    source = "MIXNET_HOME" if os.environ.get("MIXNET_HOME", "").strip() else "user cache directory"
    yield Check("cache directory", f"{root} ({source})", "info")
    probe_dir = root
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
        yield Check("cache writable", "yes", "ok")
    except OSError as exc:
        yield Check("cache writable", f"no ({exc.strerror})", "warn",
                    "cached models still work; set MIXNET_HOME to a writable directory to download")
    for spec in load_manifest().models.values():
        path = weights_path(spec)
        yield Check(f"{spec.name} weights", f"cached, {path.stat().st_size} bytes" if path.is_file() else "not cached",
                    "info")


def _network() -> Iterator[Check]:
    from .manifest import load_manifest
    from .weights import candidate_urls

    offline = settings.offline()
    mirrors = settings.mirrors()
    yield Check("offline mode", "on (MIXNET_OFFLINE)" if offline else "off", "info")
    yield Check("mirrors", ", ".join(mirrors) + " (MIXNET_MIRROR)" if mirrors else "none (PaddleClas's server)", "info")
    if offline:
        yield Check("weights URLs", "not checked (offline)", "info")
        return
    import requests

    for spec in load_manifest().models.values():
        for url in candidate_urls(spec):
            try:
                response = requests.head(url, timeout=5, allow_redirects=True)
                ok = response.status_code == 200
                size = response.headers.get("Content-Length", "?")
                yield Check(f"{spec.name} URL", f"{url}: HTTP {response.status_code}, {size} bytes",
                            "ok" if ok else "fail", "" if ok else "check the mirror, or use `mixnet download --from FILE`")
            except requests.RequestException as exc:
                yield Check(f"{spec.name} URL", f"{url}: {type(exc).__name__}", "fail",
                            "no network? use --mirror, or `mixnet download --from FILE`, then MIXNET_OFFLINE=1")


def run_checks() -> Iterator[Check]:
    """Every check, in order; each one is independent, so a broken part does not hide the others."""
    yield from _versions()
    yield from _guarded("paddle", _paddle)
    yield from _guarded("engine", _engine)
    yield from _guarded("paddleclas", _paddleclas)
    yield from _guarded("onnxruntime", _onnxruntime)
    yield from _guarded("cache", _cache)
    yield from _guarded("network", _network)

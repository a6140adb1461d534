"""`mixnet doctor`: what a bug report needs, and what is wrong with this setup, one check per row."""

from __future__ import annotations

import platform
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any, Callable, Iterator

from .base import settings
from .base.third_party import distribution_installed, install_hint

# Distributions whose versions matter for a bug report, in the order shown; the core needs those in _CORE.
_DISTRIBUTIONS = (
    "mixnet-cli", "numpy", "onnx", "openvino", "onnxruntime", "onnxruntime-gpu", "opencv-python",
    "opencv-python-headless", "pillow", "paddlepaddle", "paddlepaddle-gpu", "paddleclas", "torch",
)
_CORE = ("mixnet-cli", "numpy", "onnx", "pillow")
_OPENCV = ("opencv-python", "opencv-python-headless")


@dataclass(frozen=True)
class Check:
    check: str
    value: str
    status: str  # "ok", "warn", "fail" or "info"
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _versions() -> Iterator[Check]:
    yield Check("python", f"{platform.python_version()} ({sys.executable})", "ok")
    yield Check("platform", platform.platform(), "info")
    opencv = [name for name in _OPENCV if distribution_installed(name)]
    for name in _DISTRIBUTIONS:
        try:
            yield Check(name, metadata.version(name), "ok")
        except metadata.PackageNotFoundError:
            if name in _CORE:
                yield Check(name, "not installed", "fail", f"reinstall mixnet-cli: {install_hint()}")
            elif name in ("paddlepaddle-gpu", "onnxruntime-gpu") or (name in _OPENCV and opencv):
                continue
            elif name in _OPENCV:
                yield Check(name, "not installed", "fail", f"reinstall mixnet-cli: {install_hint()}")
            else:
                yield Check(name, "not installed", "info")
    if len(opencv) > 1:
        yield Check("OpenCV", " and ".join(opencv), "fail",
                    f"two OpenCV distributions overwrite each other's cv2: pip uninstall {' '.join(opencv)}, "
                    "then reinstall mixnet-cli")


def _opencv() -> Iterator[Check]:
    """OpenCV imported, as every classification needs it: an installed one that cannot load (opencv-python
    without the system's libGL.so.1) fails here, with its fix."""
    if not any(distribution_installed(name) for name in _OPENCV):
        return  # the versions' row says it is not installed
    from .base.third_party import import_cv2, opencv_load_problem
    from .images.preprocess import MAX_PIXELS

    try:
        cv2 = import_cv2(MAX_PIXELS)
    except ImportError as exc:  # LibraryError is one; its cause is the loader's message
        cause = exc.__cause__ or exc.__context__
        what, fix = opencv_load_problem(cause if isinstance(cause, ImportError) else exc)
        yield Check("OpenCV loads", f"no: {what}", "fail", fix)
        return
    yield Check("OpenCV loads", f"yes (cv2 {cv2.__version__})", "ok")


def _engines() -> Iterator[Check]:
    from .engines import ENGINES

    for info in ENGINES.values():
        missing = info.missing()
        if missing is None:
            yield Check(f"engine {info.name}", "ready", "ok")
            continue
        # missing() is "<what>: <what to do>": the value says what, the hint what to do, each once
        what, _, fix = missing.partition(": ")
        yield Check(f"engine {info.name}", f"needs {what}", "info", fix or info.install_line())


def _guarded(name: str, probe: Callable[[], Iterator[Check]]) -> Iterator[Check]:
    try:
        yield from probe()
    except Exception as exc:  # the point of doctor is to report broken installs, not crash on them
        yield Check(name, f"{type(exc).__name__}: {exc}".splitlines()[0][:200], "fail",
                    f"reinstall in a fresh virtual environment: {install_hint()}")


def _paddle() -> Iterator[Check]:
    from .base.third_party import import_quietly

    if not distribution_installed("paddlepaddle") and not distribution_installed("paddlepaddle-gpu"):
        return
    paddle = import_quietly("paddle")
    compiled = paddle.device.is_compiled_with_cuda()
    yield Check("paddle CUDA", "compiled in" if compiled else "CPU-only build", "info")
    if compiled:
        count = paddle.device.cuda.device_count()
        names = [paddle.device.cuda.get_device_name(i) for i in range(count)]
        yield Check("GPUs visible to paddle", ", ".join(names) or "none", "ok" if count else "warn",
                    "" if count else "check nvidia-smi and CUDA_VISIBLE_DEVICES")


def _torch() -> Iterator[Check]:
    if not distribution_installed("torch"):
        return
    from .base.third_party import import_quietly

    torch = import_quietly("torch")
    if torch.version.cuda is None:
        yield Check("torch CUDA", f"CPU build ({torch.__version__})", "info")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    yield Check("torch CUDA", f"CUDA {torch.version.cuda}", "info")
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    yield Check("GPUs visible to torch", ", ".join(names) or "none", "ok" if count else "warn",
                "" if count else "check nvidia-smi and CUDA_VISIBLE_DEVICES")


def _engine() -> Iterator[Check]:
    from .engines.base import physical_cores
    from .engines.choice import choose_engine, native_bf16
    from .engines.speed import machine_key, measured_speeds, record_path

    for variable, value in (("MIXNET_DEVICE", settings.device()), ("MIXNET_ENGINE", settings.engine())):
        if value:
            yield Check(variable, value, "info")
    engine, device = settings.engine() or "auto", settings.device() or "auto"
    threads = settings.cpu_threads() or physical_cores()
    choice = choose_engine(engine, device, threads=threads)
    yield Check("device auto picks", f"{choice.device} ({choice.device_reason})", "ok")
    key = machine_key(threads)
    yield Check("CPU", f"{key['cpu']}, {threads} thread(s), {' '.join(key['flags']) or 'flags unknown'}", "info")
    # Per model: what auto runs, and why (this machine's measurement, or the rule).
    for model in ("MixNet_S", "MixNet_M", "MixNet_L"):
        picked = choose_engine(engine, device, model=model, threads=threads)
        yield Check("engine auto picks" if model == "MixNet_S" else f"engine auto picks for {model}",
                    f"{picked.engine} on {picked.device} ({picked.engine_reason})", "ok")
    speeds, why_not = measured_speeds("MixNet_S", threads)
    yield Check("engine speed measured here", str(record_path()) if speeds else why_not, "ok" if speeds else "info",
                "" if speeds else "mixnet doctor --measure times the installed CPU engines (about 5 s per model)")
    flag = native_bf16()
    yield Check("--precision bf16", f"available (OpenVINO, {flag})" if flag else
                "not on this CPU (no avx512_bf16 or AMX: bf16 would be emulated)", "info")


def _paddleclas() -> Iterator[Check]:
    from .base.third_party import import_quietly
    from .base.manifest import load_manifest

    if not distribution_installed("paddleclas"):
        return
    spec = next(iter(load_manifest().models.values()))
    import_quietly(spec.architecture.paddleclas.split(":", 1)[0])
    yield Check("paddleclas MixNet", "imports", "ok")


def _onnxruntime() -> Iterator[Check]:
    if not distribution_installed("onnxruntime") and not distribution_installed("onnxruntime-gpu"):
        return
    from .base.third_party import import_quietly

    onnxruntime = import_quietly("onnxruntime")
    yield Check("onnxruntime providers", ", ".join(onnxruntime.get_available_providers()), "info")


def _cache() -> Iterator[Check]:
    from .base.cache import cache_root, weights_path
    from .base.manifest import load_manifest

    root = cache_root()
    source = settings.home_source()
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
    from .base.manifest import load_manifest
    from .weights.store import candidate_urls

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
    yield from _guarded("OpenCV", _opencv)
    yield from _guarded("engines", _engines)
    yield from _guarded("paddle", _paddle)
    yield from _guarded("torch", _torch)
    yield from _guarded("engine", _engine)
    yield from _guarded("paddleclas", _paddleclas)
    yield from _guarded("onnxruntime", _onnxruntime)
    yield from _guarded("cache", _cache)
    yield from _guarded("network", _network)

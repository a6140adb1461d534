"""How fast each CPU engine runs MixNet on this machine: a short measurement, made on request and kept in the
cache root (``engine-speed.json``), that ``auto`` reads (:mod:`mixnet_cli.engines.choice`).

The probe (:func:`measure_engine_speeds`, ``mixnet doctor --measure``) times every installed fp32 CPU engine on
each model at batch 1 and 8, interleaved, and keeps the medians with what was measured: the CPU's model name and
the flags that decide the engines' kernels, the threads, and the engines' versions. ``auto`` trusts the record only
while all of those still hold (:func:`measured_speeds`); a record of another CPU or other versions is ignored and
``auto`` falls back to its rule (the table's ranks and CPU flags in :mod:`mixnet_cli.engines`) until the probe runs
again. Speed does not depend on the weights' values: the probe builds each network in memory from fixed
pseudo-random parameters, so it needs no download and writes nothing but the record (OpenVINO's fixed-batch
copies and compiled blobs go to a temporary folder, deleted at the end). It takes about 3-6 s per model on a
2-core machine (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from .base import SPEED_FLAGS, cpu_flags, cpu_model

_log = logging.getLogger(__name__)

RECORD_NAME = "engine-speed.json"
RECORD_VERSION = 1
# The engines the probe compares: the fp32 CPU engines that run mixnet's ONNX graph (all held to the same 1e-4
# answers; Paddle Inference and torch are several times slower on the CPU, BENCHMARKS.md).
PROBED_ENGINES = ("onnxruntime", "openvino")
PROBE_BATCHES = (1, 8)
_PACKAGES = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "openvino": ("openvino",)}


def record_path() -> Path:
    from ..base import cache

    return cache.cache_root() / RECORD_NAME


def machine_key(threads: int) -> dict[str, Any]:
    """What a measurement holds for: this CPU, its kernel-deciding flags, ``threads``, the engines' versions (read
    from the installed distributions' metadata: nothing is imported)."""
    from importlib import metadata

    versions = {}
    for engine, packages in _PACKAGES.items():
        for package in packages:
            try:
                versions[engine] = metadata.version(package)
                break
            except metadata.PackageNotFoundError:
                continue
    flags = cpu_flags()
    return {"cpu": cpu_model(), "flags": [flag for flag in SPEED_FLAGS if flag in flags], "threads": threads,
            "versions": versions}


def _read() -> dict[str, Any] | None:
    try:
        raw = json.loads(record_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) and raw.get("record_version") == RECORD_VERSION else None


def measured_speeds(model: str, threads: int) -> tuple[dict[str, dict[int, float]] | None, str]:
    """This machine's measured milliseconds per forward pass for ``model`` (engine -> batch size -> fastest ms),
    or None with the reason there is none usable (no record, another CPU, other versions or threads)."""
    record = _read()
    if record is None:
        return None, "not measured on this machine (mixnet doctor --measure)"
    if record.get("machine") != machine_key(threads):
        return None, "the measurement is of another CPU, thread count or engine versions (mixnet doctor --measure)"
    figures = record.get("models", {}).get(model)
    try:
        speeds = {engine: {int(batch): float(ms) for batch, ms in batches.items()}
                  for engine, batches in figures.items()}
    except (AttributeError, TypeError, ValueError):
        return None, f"{model} is not measured on this machine (mixnet doctor --measure)"
    return (speeds or None), "" if speeds else f"{model} is not measured on this machine (mixnet doctor --measure)"


def _probe_state(model: str) -> dict[str, Any]:
    """Fixed pseudo-random parameters of ``model`` (He-scaled kernels, unit variances): speed does not depend on
    the values, only their finiteness."""
    import numpy as np

    from ..network.architecture import architecture_of

    rng = np.random.default_rng(0)
    state = {}
    for name, shape in architecture_of(model).shapes().items():
        if name.endswith("_variance"):
            state[name] = np.ones(shape, np.float32)
        elif name.endswith(("_mean", ".bias")):
            state[name] = np.zeros(shape, np.float32)
        elif name.endswith("bn.weight") or len(shape) == 1:
            state[name] = np.ones(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            state[name] = rng.normal(0.0, (2.0 / fan_in) ** 0.5, shape).astype(np.float32)
    return state


def _engines(model: str, directory: Path, threads: int, engines: Sequence[str]) -> dict[str, Any]:
    from ..network.architecture import architecture_of
    from ..network.onnx_graph import build_onnx

    path = directory / f"{model}.onnx"
    path.write_bytes(build_onnx(architecture_of(model), _probe_state(model), check=False).SerializeToString())
    from . import ENGINES

    # Through the table, as every engine is loaded (the engines' modules import the choice, which reads this one).
    built: dict[str, Any] = {}
    if "onnxruntime" in engines:
        built["onnxruntime"] = ENGINES["onnxruntime"].load().OnnxRuntimeEngine(path, "cpu", threads)
    if "openvino" in engines:
        built["openvino"] = ENGINES["openvino"].load().OpenVinoEngine(path, "cpu", threads, directory)
    return built


def measure_engine_speeds(models: Sequence[str], threads: int, *, rounds: int = 6,
                          engines: Sequence[str] | None = None) -> dict[str, Any]:
    """Time the installed fp32 CPU engines on each of ``models`` at batch 1 and 8 (``rounds`` interleaved
    rounds, engines in a new random order each, 2 back-to-back runs per turn; the fastest run is kept: on a
    shared machine other processes only ever slow a run down, so the fastest is the engine's own speed) and keep
    them in the cache root's record with what was measured; returns the record. Raises :class:`OSError` when the
    record cannot be written (the figures are logged first)."""
    import numpy as np

    from . import ENGINES

    names = [name for name in (engines or PROBED_ENGINES) if ENGINES[name].missing() is None]
    key = machine_key(threads)
    previous = _read()
    figures: dict[str, Any] = dict(previous["models"]) if previous and previous.get("machine") == key else {}
    started = time.perf_counter()
    for model in models:
        directory = Path(tempfile.mkdtemp(prefix="mixnet-speed-"))
        try:
            built = _engines(model, directory, threads, names)
            samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in PROBE_BATCHES} for name in built}
            for batch_size in PROBE_BATCHES:
                batch = np.random.default_rng(batch_size).uniform(-2.1, 2.6, (batch_size, 3, 224, 224)).astype(
                    np.float32)
                for engine in built.values():  # warm-up: compiles the batch size's model
                    engine.run(batch)
                for _ in range(rounds):
                    for name in random.sample(list(built), len(built)):
                        for _ in range(2):
                            start = time.perf_counter()
                            built[name].run(batch)
                            samples[name][batch_size].append((time.perf_counter() - start) * 1000.0)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        figures[model] = {name: {str(b): round(min(v), 3) for b, v in by_batch.items()}
                          for name, by_batch in samples.items()}
        _log.info("engine speed of %s (ms per forward pass): %s", model, "; ".join(
            f"{name} " + ", ".join(f"batch {b} {ms:g}" for b, ms in by_batch.items())
            for name, by_batch in figures[model].items()))
    record = {
        "record_version": RECORD_VERSION,
        "machine": key,
        "models": figures,
        "how": f"fastest of {rounds} interleaved rounds of 2 runs, batch sizes "
               f"{', '.join(map(str, PROBE_BATCHES))}, milliseconds per forward pass, fixed pseudo-random weights",
        "seconds": round(time.perf_counter() - started, 1),
        "measured_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    from ..base import cache, files

    cache.ensure_dir(cache.cache_root())
    files.write_text(record_path(), json.dumps(record, indent=2) + "\n")
    return record

"""What every engine shares: the :class:`Engine` protocol, the device a choice settled on, CPU cores, and the
check that holds an engine to the reference logits before its answers are trusted."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..base.errors import EngineError
from ..base.manifest import ModelSpec


class Engine(Protocol):
    name: str  # what --engine takes (a key of the registry)
    device: str  # cpu or gpu:N
    threads: int | None  # CPU threads of one forward pass (None: the library's default, or a GPU)
    detail: str  # for people: provider, threads, accelerations
    parallel: int  # how many run() calls proceed at once, each from its own thread (more queue)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a float32 ``N x 3 x S x S`` batch; safe to call from several threads."""
        ...

    def throughput(self, batch_size: int = 1) -> "Engine":
        """The engine to use for many batches of mostly ``batch_size`` images (itself, or a sibling on the same
        model tuned for bulk work)."""
        ...


class OneBatchAtATime:
    """For engines that run one batch at a time on all their threads, whatever the workload."""

    parallel = 1

    def throughput(self, batch_size: int = 1) -> "Engine":
        return self  # type: ignore[return-value]


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cpu" or "gpu:N"
    reason: str


class EngineFailed(EngineError):
    """The engine itself could not run a good model (not the model's fault): ``auto`` may try the next engine."""


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthreads share a core's arithmetic units, so don't count)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text()
        except OSError:
            return max(1, len(cpus))
        cores.add(siblings.strip())
    return max(1, len(cores))


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (``avx2``, ``avx512f``, ``avx512_bf16``, ``amx_bf16``...);
    empty where /proc/cpuinfo cannot be read (then nothing is assumed about the CPU)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name (``AMD EPYC 9R14``...), or the machine type where /proc/cpuinfo cannot be read."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.machine()


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


# The CPU flags that decide how the engines' kernels compute (and so which engine is fastest, and whether bf16 is
# native): a change in any of them is another CPU for the engine-speed record.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
               "amx_int8", "avx_vnni")
# bf16 arithmetic in hardware: without one of these, OpenVINO would emulate bf16 (slower than f32, so refused).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def gpu_index(device: str) -> int:
    """``gpu:3`` -> 3, ``gpu`` -> 0."""
    return int(device.split(":", 1)[1]) if ":" in device else 0


def check(engine: Engine, spec: ModelSpec, reference: np.ndarray, marks: Path | None, version: str,
          *, whole_batch: bool = True) -> None:
    """Hold ``engine`` to the reference logits, and remember in ``marks`` that it passed at this ``version``
    (None, a read-only cache: it is checked every time). Raises :class:`EngineError` when it fails."""
    from .conversion import check_engine, mark_engine_checked

    result = check_engine(engine, spec, reference, whole_batch=whole_batch)
    if marks is not None:
        mark_engine_checked(marks, engine.name, version, result)

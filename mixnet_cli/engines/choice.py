"""Choosing and starting an engine: which engine runs on which device, and why.

The engines themselves live in :mod:`mixnet_cli.engines`, one module each, listed in its table: this module reads
that table to check ``--engine`` and ``--device``, to let ``auto`` pick the fastest engine installed for the
device, and to fall back to the next one when an engine ``auto`` picked cannot start. Every engine takes an
``N x 3 x S x S`` float32 array and returns ``N x 1000`` float32 logits for the same weights;
:mod:`mixnet_cli.classifier` does the softmax and top-k, so engines can be compared value for value.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from . import ENGINES, EngineInfo, canonical_name, engine_names, ranked
from .base import DeviceChoice, Engine, EngineFailed
from ..base.errors import DeviceError, EngineError, MixnetError, UsageError
from ..base.manifest import ModelSpec

if TYPE_CHECKING:
    from ..weights.store import VerifiedWeights

_log = logging.getLogger(__name__)
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|gpu|gpu:\d+)$")


@dataclass(frozen=True)
class EngineChoice:
    """Which engine runs on which device, and why (``engine_auto``: chosen for the user, so a fallback is fine)."""

    engine: str
    device: str
    engine_reason: str
    device_reason: str
    engine_auto: bool = False
    precision: str = "fp32"  # the arithmetic (engines' ``precisions``); only fp32 is held to the reference
    compiled: bool = False  # compile the network where the engine can (torch.compile; for benchmark)
    # What ``auto`` weighed on the CPU (a fallback orders the engines the same way): the model's name and the
    # threads of a forward pass (None: the cores).
    model: str | None = None
    threads: int | None = None
    # The job ahead, when the caller knows it is a bulk one: batches of this size in the engine's throughput mode
    # (``Engine.throughput``). An engine that loads in the background loads that mode first, and its one-image
    # (latency) mode only if it is used (OpenVINO: one compiled model fewer before the first batch).
    bulk_batch: int | None = None

    @property
    def device_choice(self) -> DeviceChoice:
        return DeviceChoice(self.device, self.device_reason)


def check_device_name(requested: str) -> str:
    """``requested`` as ``auto``, ``cpu``, ``gpu`` or ``gpu:N``; torch's spelling (``cuda``, ``cuda:1``) is taken as
    the GPU it names. :class:`UsageError` for anything else."""
    name = requested.strip().lower()
    if name == "cuda" or name.startswith("cuda:"):
        name = "gpu" + name[len("cuda"):]
    if not _DEVICE_PATTERN.match(name):
        raise UsageError(f"unknown device '{requested}': use auto, cpu, gpu or gpu:N (N a GPU index; cuda and cuda:N mean the same)")
    return name


def check_engine_name(requested: str) -> str:
    name = canonical_name(requested)
    if name is None:
        raise UsageError(f"unknown engine '{requested}': use {', '.join(engine_names())}")
    return name


def require_engine(name: str) -> None:
    """Raise :class:`EngineError` naming what to install when engine ``name`` cannot run here."""
    missing = ENGINES[name].missing()
    if missing is not None:
        raise EngineError(f"the {name} engine needs {missing}")


def choose_engine(engine: str = "auto", device: str = "auto", precision: str = "fp32",
                  compiled: bool = False, *, model: str | None = None,
                  threads: int | None = None) -> EngineChoice:
    """Settle engine and device together: ``auto`` is the fastest engine installed for the device that offers
    ``precision`` (``fp32``, the only one held to the reference, unless ``benchmark`` asks for another) and, with
    ``compiled`` (``benchmark --compile``), compiles the network.

    On the CPU :func:`_cpu_order` orders them: by this machine's measurement (:mod:`mixnet_cli.engines.speed`) or
    the table's rule, for ``model`` (default MixNet_S) and ``threads``; then Paddle Inference and torch. On a GPU
    PyTorch with CUDA, then ONNX Runtime with onnxruntime-gpu, then Paddle Inference with a CUDA build of paddle.
    Nothing here imports paddle or torch unless an engine of theirs is asked for or could drive the GPU. A GPU asked for that no installed engine can drive is an error naming what to install,
    never a silent fallback; ``auto`` on a machine without one says why in its device reason (``-v``).
    ``bf16`` on the CPU needs bf16 arithmetic (:func:`refuse_emulated_bf16`).
    Raises :class:`UsageError` for unknown names, :class:`EngineError` and :class:`DeviceError`.
    """
    engine_name = check_engine_name(engine)
    device_name = check_device_name(device)
    precision = check_precision(precision, engine_name)
    if compiled and not (ENGINES[engine_name].compiles if engine_name != "auto" else any(
            info.compiles for info in ENGINES.values())):
        compilers = " or ".join(info.name for info in ENGINES.values() if info.compiles)
        raise UsageError(f"--compile needs an engine that compiles the network: --engine {compilers}")
    workload = {"model": model, "threads": threads}
    choice = _choose(engine_name, device_name, device, precision, compiled, workload)
    if precision == "tf32" and choice.device == "cpu":
        raise UsageError("--precision tf32 is a GPU's (tensor cores); on the CPU use fp32, bf16 or fp16")
    if precision == "bf16" and choice.device == "cpu" and (choice.engine == "openvino" or choice.engine_auto):
        refuse_emulated_bf16()
    return choice


def native_bf16() -> str | None:
    """The CPU flag that gives this CPU bf16 arithmetic (``avx512_bf16``, ``amx_bf16``), or None."""
    from .base import NATIVE_BF16_FLAGS, cpu_flags

    flags = cpu_flags()
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def refuse_emulated_bf16() -> None:
    """Raise :class:`DeviceError` on a CPU without bf16 arithmetic: emulated bf16 is slower than fp32 and less
    exact, so it is never run (the torch engine's bf16, asked for by name, is ``benchmark``'s own)."""
    if native_bf16() is None:
        raise DeviceError("--precision bf16 needs a CPU with bf16 arithmetic (avx512_bf16 or AMX), and this one has "
                          "neither (mixnet does not emulate it, which is slower than fp32): use --precision fp32")


def _choose(engine_name: str, device_name: str, device: str, precision: str, compiled: bool,
            workload: dict[str, Any]) -> EngineChoice:
    if engine_name != "auto":
        require_engine(engine_name)
        chosen = ENGINES[engine_name].load().resolve_device(device_name, device)
        return EngineChoice(engine_name, chosen.device, f"asked for {engine_name}", chosen.reason,
                            precision=precision, compiled=compiled)
    if device_name == "cpu":
        return _cpu_auto("asked for the CPU", precision=precision, compiled=compiled, **workload)
    problems = []
    for info in ranked("gpu", precision, compiled):
        missing = info.missing()
        problem = f"{info.name} is not installed" if missing is not None else info.load().gpu_problem()
        if problem is not None:
            problems.append(problem)
            continue
        chosen = info.load().resolve_device(device_name, device)
        if chosen.device != "cpu":
            return EngineChoice(info.name, chosen.device, f"fastest installed engine for the GPU ({info.name})",
                                chosen.reason, engine_auto=True, precision=precision, compiled=compiled)
        problems.append(chosen.reason)
    if device_name != "auto":
        raise DeviceError(
            f"device '{device}' needs an engine that drives a GPU, and none is installed here ({'; '.join(problems)}): "
            "install a CUDA build of torch (pytorch.org), or onnxruntime-gpu (pip uninstall onnxruntime && pip "
            "install onnxruntime-gpu), or paddlepaddle-gpu with paddleclas; or use --device cpu"
        )
    return _cpu_auto("no GPU engine: " + "; ".join(problems), precision=precision, compiled=compiled, **workload)


def check_precision(requested: str, engine: str = "auto") -> str:
    """``requested`` (``fp32``, ``tf32``, ``bf16``, ``fp16``, any case) when ``engine`` offers it, or ``auto``
    does through some engine; raises :class:`UsageError` otherwise."""
    name = requested.strip().lower()
    offered = ENGINES[engine].precisions if engine != "auto" else \
        tuple(dict.fromkeys(p for info in ENGINES.values() for p in info.precisions))
    if name not in offered:
        who = f"the {engine} engine" if engine != "auto" else "the engines"
        offers = [info.name for info in ENGINES.values() if name in info.precisions]
        hint = f"; {name} needs --engine {' or '.join(offers)}" if offers else ""
        raise UsageError(f"unknown precision '{requested}' for {who}: use {', '.join(offered)}{hint}")
    return name


def _cpu_order(precision: str, compiled: bool, model: str | None,
               threads: int | None) -> tuple[list[EngineInfo], str]:
    """The CPU engines ``auto`` tries, first choice first, and why the first leads.

    For fp32 (every engine held to the same answers) the order comes from this machine's measurement when there is
    one for these engine versions, CPU and threads (:mod:`mixnet_cli.engines.speed`): the lowest geometric mean
    of the batch 1 and batch 8 times. Without one, the rule: an engine whose ``cpu_fast_with`` flags this CPU has
    leads (OpenVINO on AVX-512), else the table's ranks.

    One engine per CPU and model, whatever the job: a few images, a bulk job and ``mixnet serve`` then give the
    same answers (a faster start for a few images would be ONNX Runtime's on AVX-512 CPUs, 25-45 ms, at the
    price of answers that differ in the seventh digit between a local run and the service; BENCHMARKS.md)."""
    candidates = ranked("cpu", precision, compiled)
    table = "fastest installed engine for the CPU"
    if precision != "fp32" or compiled or not candidates:
        return candidates, table
    installed = [info for info in candidates if info.missing() is None]
    from .base import cpu_flags, physical_cores
    from .speed import measured_speeds

    speeds, missing = measured_speeds(model or "MixNet_S", threads or physical_cores())
    timed = [info for info in installed if speeds and {1, 8} <= set(speeds.get(info.name, {}))]
    if speeds is not None and len(timed) > 1:
        measured = speeds

        def score(info: EngineInfo) -> float:
            return (measured[info.name][1] * measured[info.name][8]) ** 0.5

        best = min(timed, key=score)
        figures = ", ".join(f"{info.name} {speeds[info.name][1]:.1f}/{speeds[info.name][8]:.1f} ms"
                            for info in sorted(timed, key=score))
        why = (f"fastest here by this machine's measurement of {model or 'MixNet_S'} "
               f"({figures} at batch 1/8; engine-speed.json)")
        return [best] + [info for info in candidates if info is not best], why
    flags = cpu_flags()
    for info in installed:
        if info.cpu_fast_with and set(info.cpu_fast_with) <= flags:
            rest = [other for other in candidates if other is not info]
            return [info] + rest, (f"rule for CPUs with {' and '.join(info.cpu_fast_with)}: {info.name} runs MixNet "
                                   f"fastest there ({info.cpu_fast_note}); {missing}")
    return candidates, f"{table} (the table's order for this CPU; {missing})"


def _cpu_auto(device_reason: str, after: str | None = None, precision: str = "fp32",
              compiled: bool = False, model: str | None = None,
              threads: int | None = None) -> EngineChoice:
    """The fastest engine installed for the CPU (after ``after``, the one that failed, when given)."""
    candidates, first_reason = _cpu_order(precision, compiled, model, threads)
    if after is not None:
        names = [info.name for info in candidates]
        candidates = candidates[names.index(after) + 1:] if after in names else []
    for position, info in enumerate(candidates):
        if info.missing() is None:
            why = first_reason if position == 0 and after is None else \
                f"the next fastest engine for the CPU ({', '.join(i.name for i in candidates[:position]) or after} " \
                "not available)"
            if precision != "fp32" or compiled:
                why += " that offers " + " and ".join([precision] + (["compiling"] if compiled else []))
            return EngineChoice(info.name, "cpu", why, device_reason, engine_auto=True, precision=precision,
                                compiled=compiled, model=model, threads=threads)
    if precision != "fp32" or compiled:
        installs = "; ".join(info.install_line() for info in candidates) or "no engine offers it"
        raise EngineError(f"no engine installed here runs {precision}{' compiled' if compiled else ''}: {installs}")
    raise EngineError("no engine is installed for the CPU: pip install openvino onnxruntime (reinstall mixnet-cli)")


def resolve_device(requested: str = "auto", engine: str = "auto") -> DeviceChoice:
    """Map ``auto|cpu|gpu|gpu:N`` to a concrete device for ``engine``; a missing GPU is an error, never a fallback."""
    return choose_engine(engine, requested).device_choice


def _workload(choice: EngineChoice) -> dict[str, Any]:
    return {"model": choice.model, "threads": choice.threads}


def _fallback(choice: EngineChoice, exc: MixnetError) -> EngineChoice | None:
    """What ``auto`` tries after ``choice`` failed with ``exc`` (None: nothing better left, raise it)."""
    if not choice.engine_auto:
        return None
    if choice.device != "cpu" and isinstance(exc, DeviceError):
        cpu = _cpu_auto(f"{choice.engine} could not use the GPU: {exc}", precision=choice.precision,
                        compiled=choice.compiled, **_workload(choice))
        return replace(cpu, engine_reason=f"{cpu.engine_reason}; {choice.engine} could not use the GPU")
    if isinstance(exc, EngineFailed):  # the engine failed, not the model: the next engine may run it
        try:
            following = _cpu_auto(choice.device_reason, after=choice.engine, precision=choice.precision,
                                  compiled=choice.compiled, **_workload(choice))
        except EngineError:
            return None
        return replace(following, engine_reason=f"{choice.engine} failed: {exc}")
    if choice.engine != "dygraph" and choice.precision == "fp32" and not choice.compiled and \
            ENGINES["dygraph"].missing() is None:
        return replace(choice, engine="dygraph", engine_reason=f"{choice.engine} failed: {exc}")
    return None


def create_engine(
    spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice, *, threads: int | None = None,
    features: bool = False,
    feature_map: bool = False,
) -> tuple[Engine, EngineChoice]:
    """The engine ``choice`` names, on its device, for these verified weights; returns it with the final choice.

    An engine picked by ``auto`` that cannot start (a failed conversion or check, a GPU it cannot drive) gives
    way, with a warning on stderr, to the next that can; one the user asked for raises instead. ``features``:
    an engine whose ``run_with_features`` also returns the pooled features (ONNX Runtime, or torch);
    ``feature_map``: one whose ``run_with_feature_map`` also returns the final feature map (the same two).
    """
    if features or feature_map:
        return _extra_output_engine(spec, weights, choice, threads, "feature map" if feature_map else "features")
    try:
        require_engine(choice.engine)
        return ENGINES[choice.engine].load().build(spec, weights, choice, threads), choice
    except MixnetError as exc:
        fallback = _fallback(choice, exc)
        if fallback is None:
            raise
        _log.warning("%s; using %s on %s instead", exc, fallback.engine, fallback.device)
        return create_engine(spec, weights, fallback, threads=threads)


# What an engine can give besides the logits, from the same forward pass: the engine modules that have the builder
# (``build_with_features``, ``build_with_feature_map``) give it; the others (Paddle Inference's saved programs; the
# features also not OpenVINO's and dygraph's) do not, and ONNX Runtime gives it for them when ``auto`` chose them.
_EXTRA_OUTPUTS = {"features": ("build_with_features", "features"),
                  "feature map": ("build_with_feature_map", "class activation maps (the final feature map)")}


def _extra_output_engine(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice,
                         threads: int | None, output: str) -> tuple[Engine, EngineChoice]:
    """The engine that also returns ``output`` (``features``: the pooled features; ``feature map``: the final
    feature map): the chosen engine itself when it can give it (on its device), else, when ``auto`` chose it,
    ONNX Runtime on mixnet's graph with that extra output, on the CPU. An engine the user named that cannot give
    it is a :class:`UsageError` naming those that can."""
    builder, what = _EXTRA_OUTPUTS[output]
    if choice.precision != "fp32":
        asked = "--embed or --embed-npy" if output == "features" else "--cam"
        raise UsageError(f"{what} come in fp32 only: leave out --precision {choice.precision} with {asked}")
    if not choice.engine_auto:
        require_engine(choice.engine)  # a named engine that is not installed says what to install
    module = ENGINES[choice.engine].load() if ENGINES[choice.engine].missing() is None else None
    if module is not None and hasattr(module, builder):
        return getattr(module, builder)(spec, weights, choice, threads), choice
    if not choice.engine_auto:
        able = [name for name, info in ENGINES.items()
                if info.missing() is None and hasattr(info.load(), builder)]
        named = ", ".join(able[:-1]) + " or " + able[-1] if len(able) > 1 else "".join(able) or "onnxruntime"
        raise UsageError(f"--engine {choice.engine} gives no {what}; use --engine {named} (or leave --engine out)")
    require_engine("onnxruntime")
    # ONNX Runtime's device: the CPU (a GPU chosen for another engine may not be one ONNX Runtime can drive).
    fallback = replace(choice, engine="onnxruntime", device="cpu", engine_reason=f"{what} from ONNX Runtime")
    return getattr(ENGINES["onnxruntime"].load(), builder)(spec, weights, fallback, threads), fallback


@dataclass(frozen=True)
class Latency:
    """Wall time of one forward pass at one batch size, over ``repeats`` timed runs after ``warmup`` untimed ones."""

    batch_size: int
    repeats: int
    warmup: int
    median_ms: float
    min_ms: float
    max_ms: float
    p10_ms: float
    p90_ms: float

    @property
    def images_per_s(self) -> float:
        return self.batch_size * 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")


def measure_latency(engine: Engine, batch_size: int, size: int, *, warmup: int = 3, repeats: int = 10,
                    seed: int = 0) -> Latency:
    """Time ``engine.run`` on a random ``batch_size x 3 x size x size`` batch (input transfer included)."""
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise UsageError("batch size and repeats must be at least 1, warm-up at least 0")
    batch = np.random.default_rng(seed).uniform(-2.1, 2.6, (batch_size, 3, size, size)).astype(np.float32)
    for _ in range(warmup):
        engine.run(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.run(batch)
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    deciles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return Latency(batch_size, repeats, warmup, statistics.median(times), times[0], times[-1], deciles[0], deciles[-1])


@dataclass(frozen=True)
class Agreement:
    """How close an engine's answers in a faster precision are to the same engine's in fp32, on one batch:
    the largest probability difference, and the share of images whose top-1 label, and whose top-5 set, agree."""

    images: int
    max_abs_probability_diff: float
    top1_agreement: float
    top5_agreement: float


def measure_agreement(engine: Engine, reference: Engine, batch: np.ndarray) -> Agreement:
    """Compare ``engine``'s softmax with ``reference``'s (fp32) on a float32 ``N x 3 x S x S`` ``batch``."""
    from ..images.postprocess import softmax

    got = softmax(np.asarray(engine.run(batch), dtype=np.float64))
    expected = softmax(np.asarray(reference.run(batch), dtype=np.float64))
    top5 = lambda p: np.sort(np.argsort(-p, axis=1)[:, :5], axis=1)  # noqa: E731
    return Agreement(
        images=len(batch),
        max_abs_probability_diff=float(np.abs(got - expected).max()),
        top1_agreement=float(np.mean(got.argmax(1) == expected.argmax(1))),
        top5_agreement=float(np.mean(np.all(top5(got) == top5(expected), axis=1))),
    )

"""Inference engines: something that turns a batch of preprocessed images into logits, on a chosen device.

Every engine takes an ``N x 3 x S x S`` float32 array and returns ``N x 1000`` float32 logits for the same
weights; :mod:`mixnet_cli.classifier` does the softmax and top-k, so engines can be compared value for value.
:data:`ENGINES` lists them, with what each needs and where it runs: ``--engine``'s help, its check, the errors
and ``doctor`` read that table. ``auto`` is the fastest engine installed for the device, and choosing it for the
CPU imports no paddle.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import CacheError, DeviceError, EngineError, MixnetError, UsageError
from .manifest import ModelSpec
from .registry import ENGINE_NAMES, ENGINES, _ENGINE_ALIASES

if TYPE_CHECKING:
    from .weights import VerifiedWeights

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|gpu|gpu:\d+)$")


def require_engine(name: str) -> None:
    """Raise :class:`EngineError` naming what to install when engine ``name`` cannot run here."""
    missing = ENGINES[name].missing()
    if missing is not None:
        raise EngineError(f"the {name} engine needs {missing}")


class Engine(Protocol):
    name: str  # openvino, onnxruntime, paddle or dygraph (what --engine takes)
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


class _OneBatchAtATime:
    """For engines that run one batch at a time on all their threads, whatever the workload."""

    parallel = 1

    def throughput(self, batch_size: int = 1) -> "Engine":
        return self  # type: ignore[return-value]


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cpu" or "gpu:N"
    reason: str


@dataclass(frozen=True)
class EngineChoice:
    """Which engine runs on which device, and why (``engine_auto``: chosen for the user, so a fallback is fine)."""

    engine: str
    device: str
    engine_reason: str
    device_reason: str
    engine_auto: bool = False

    @property
    def device_choice(self) -> DeviceChoice:
        return DeviceChoice(self.device, self.device_reason)


def check_device_name(requested: str) -> str:
    name = requested.strip().lower()
    if not _DEVICE_PATTERN.match(name):
        raise UsageError(f"unknown device '{requested}': use auto, cpu, gpu or gpu:N (N a GPU index)")
    return name


def check_engine_name(requested: str) -> str:
    name = requested.strip().lower()
    name = _ENGINE_ALIASES.get(name, name)
    if name not in ENGINE_NAMES:
        raise UsageError(f"unknown engine '{requested}': use {', '.join(ENGINE_NAMES)}")
    return name


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


def _gpu_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _distribution_installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _onnxruntime_providers() -> list[str]:
    if not _installed("onnxruntime"):
        return []
    from .imports import import_quietly

    return list(import_quietly("onnxruntime").get_available_providers())


def _onnxruntime_may_have_cuda() -> bool:
    """Whether the installed onnxruntime ships its CUDA provider library, found without importing it (the
    import costs a tenth of the cold start, and a CPU-only build, the usual case, cannot have the provider)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(any((Path(location) / "capi").glob("*onnxruntime_providers_cuda*"))
               for location in spec.submodule_search_locations)


def _paddle_cuda() -> tuple[bool, int]:
    """Whether paddle is built with CUDA, and how many GPUs it sees (imports paddle: about a second)."""
    from .imports import import_quietly

    paddle = import_quietly("paddle")
    compiled = bool(paddle.device.is_compiled_with_cuda())
    return compiled, (paddle.device.cuda.device_count() if compiled else 0)


def _paddle_device(name: str, requested: str) -> DeviceChoice:
    """Device resolution for the paddle engines: a GPU that is not there is an error, never a fallback."""
    if name == "cpu":
        return DeviceChoice("cpu", "asked for the CPU")
    compiled, count = _paddle_cuda()
    if name == "auto":
        if count > 0:
            return DeviceChoice("gpu:0", f"paddle has CUDA and sees {count} GPU(s)")
        why = "paddle is built without CUDA" if not compiled else "no GPU is visible to paddle"
        return DeviceChoice("cpu", why)
    index = _gpu_index(name)
    if not compiled:
        raise DeviceError(
            f"device '{requested}' needs a CUDA build of paddle, but the installed paddlepaddle is CPU-only; "
            "install paddlepaddle-gpu or use --device cpu"
        )
    if index >= count:
        raise DeviceError(
            f"device '{requested}' is not available: paddle sees {count} GPU(s); "
            "check CUDA_VISIBLE_DEVICES and nvidia-smi, or use --device cpu"
        )
    return DeviceChoice(f"gpu:{index}", "asked for this GPU")


def _onnxruntime_device(name: str, requested: str) -> DeviceChoice:
    require_engine("onnxruntime")
    providers = _onnxruntime_providers()
    if name == "cpu":
        return DeviceChoice("cpu", "asked for the CPU")
    has_cuda = "CUDAExecutionProvider" in providers
    if name == "auto":
        if has_cuda:
            return DeviceChoice("gpu:0", "onnxruntime has the CUDA provider")
        return DeviceChoice("cpu", "onnxruntime has no CUDA provider (onnxruntime-gpu is not installed)")
    if not has_cuda:
        raise DeviceError(
            f"device '{requested}' needs onnxruntime-gpu, but the installed onnxruntime has only "
            f"{', '.join(providers)}; pip install onnxruntime-gpu (instead of onnxruntime), or use --engine paddle "
            "with paddlepaddle-gpu, or --device cpu"
        )
    return DeviceChoice(f"gpu:{_gpu_index(name)}", "asked for this GPU")


def _openvino_device(name: str, requested: str) -> DeviceChoice:
    require_engine("openvino")
    if name not in ("auto", "cpu"):
        raise DeviceError(
            f"device '{requested}': the openvino engine runs on the CPU only; for a GPU use --engine onnxruntime "
            "(with onnxruntime-gpu) or --engine paddle (with paddlepaddle-gpu)"
        )
    return DeviceChoice("cpu", "asked for the CPU" if name == "cpu" else "the openvino engine runs on the CPU")


def choose_engine(engine: str = "auto", device: str = "auto") -> EngineChoice:
    """Settle engine and device together: ``auto`` is the fastest engine installed for the device.

    For the CPU that is OpenVINO, then ONNX Runtime, then Paddle Inference; for a GPU, ONNX Runtime when
    onnxruntime-gpu is installed, else Paddle Inference when paddle has CUDA. Nothing here imports paddle unless
    a paddle engine, or a GPU only paddle could drive, is in question.
    """
    engine_name = check_engine_name(engine)
    device_name = check_device_name(device)
    if engine_name == "openvino":
        chosen = _openvino_device(device_name, device)
        return EngineChoice("openvino", chosen.device, "asked for openvino", chosen.reason)
    if engine_name == "onnxruntime":
        chosen = _onnxruntime_device(device_name, device)
        return EngineChoice("onnxruntime", chosen.device, "asked for onnxruntime", chosen.reason)
    if engine_name in ("paddle", "dygraph"):
        require_engine(engine_name)
        chosen = _paddle_device(device_name, device)
        return EngineChoice(engine_name, chosen.device, f"asked for {engine_name}", chosen.reason)

    ort_cuda = (device_name != "cpu" and _onnxruntime_may_have_cuda()
                and "CUDAExecutionProvider" in _onnxruntime_providers())
    if ort_cuda:
        chosen = _onnxruntime_device(device_name, device)
        return EngineChoice("onnxruntime", chosen.device, "fastest installed engine for the GPU", chosen.reason,
                            engine_auto=True)
    if device_name == "cpu":
        return _cpu_auto("asked for the CPU")
    if device_name == "auto" and (not _distribution_installed("paddlepaddle-gpu") or ENGINES["paddle"].missing()):
        # A CPU-only paddle can't drive a GPU: say so without the second it takes to import paddle.
        return _cpu_auto("no CUDA build of onnxruntime, or of paddle with paddleclas, is installed")
    if ENGINES["paddle"].missing() is not None:  # a GPU asked for, and nothing installed could drive it
        raise DeviceError(
            f"device '{device}' needs a CUDA engine: onnxruntime-gpu (pip uninstall onnxruntime && pip install "
            "onnxruntime-gpu), or paddlepaddle-gpu with paddleclas; or use --device cpu"
        )
    chosen = _paddle_device(device_name, device)
    if chosen.device != "cpu":
        return EngineChoice("paddle", chosen.device, "fastest installed engine for the GPU (Paddle Inference)",
                            chosen.reason, engine_auto=True)
    return _cpu_auto(chosen.reason)


def _cpu_auto(device_reason: str) -> EngineChoice:
    if _installed("openvino"):
        return EngineChoice("openvino", "cpu", "fastest installed engine for the CPU", device_reason,
                            engine_auto=True)
    if _installed("onnxruntime"):
        return EngineChoice("onnxruntime", "cpu", "fastest installed engine for the CPU (OpenVINO is not installed)",
                            device_reason, engine_auto=True)
    return EngineChoice("paddle", "cpu", "neither OpenVINO nor onnxruntime is installed; Paddle Inference is the "
                        "next fastest", device_reason, engine_auto=True)


def resolve_device(requested: str = "auto", engine: str = "auto") -> DeviceChoice:
    """Map ``auto|cpu|gpu|gpu:N`` to a concrete device for ``engine``; a missing GPU is an error, never a fallback."""
    return choose_engine(engine, requested).device_choice


class OpenVinoEngine:
    """OpenVINO on the ONNX model converted by paddle2onnx, on the CPU, computing in f32.

    f32 is asked for explicitly: on CPUs with bf16 units OpenVINO would otherwise compute in bf16, whose
    answers differ from paddle's in the third digit. Each batch size runs a model whose batch dimension is
    fixed (about 20% faster than a dynamic one at batch 1), made once per size from the checked model and kept
    with OpenVINO's compiled form in ``cache_dir``; the first two batches of a size that has no model yet run
    padded on a larger one (a last, partial batch), later ones get their own. Without ``cache_dir`` (a read-only
    cache) the dynamic model is compiled.

    The engine runs one batch at a time on all its threads (OpenVINO's latency mode): the quickest answer for
    one image. :meth:`throughput` gives its sibling for bulk work, which splits the threads into OpenVINO
    streams that each run a batch of their own: no stream waits for another's threads, so a stream keeps
    computing while the image decoders take a core (BENCHMARKS.md). Both compile the same cached blob.
    """

    name = "openvino"

    def __init__(self, model: Path, device: str = "cpu", threads: int | None = None,
                 cache_dir: Path | None = None, *, bulk: bool = False, warm_size: int = 1, core: Any = None) -> None:
        if device != "cpu":
            raise DeviceError(f"the openvino engine runs on the CPU only, not on {device}; use --device cpu")
        from .imports import import_quietly

        openvino = import_quietly("openvino")
        self.device = device
        self.threads = threads or physical_cores()
        self.version = openvino_version()
        self._model = model
        self._cache_dir = cache_dir
        self._bulk = bulk
        if core is None:
            core = openvino.Core()
            if cache_dir is not None:
                core.set_property({"CACHE_DIR": str(cache_dir / "compiled")})
        self._core = core
        self._config: dict[str, Any] = {
            # THROUGHPUT lets OpenVINO split the threads into streams (one per core on small machines).
            "PERFORMANCE_HINT": "THROUGHPUT" if bulk else "LATENCY",
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": "f32",
        }
        if not bulk:
            self._config["NUM_STREAMS"] = 1
        # batch size (0: dynamic) -> the idle infer requests of its compiled model (one per stream)
        self._idle: dict[int, queue.SimpleQueue[Any]] = {}
        self._uses: dict[int, int] = {}  # how often a size without its own model came
        self._compile_lock = threading.Lock()
        self._sibling: OpenVinoEngine | None = None
        self.parallel = 1
        # A model that does not load fails here; one image is the common case, and a sibling warms up the batch
        # size in use (which also tells how many streams OpenVINO made).
        self._request_for(warm_size)
        mode = f"{self.parallel} streams" if bulk else "latency mode"
        self.detail = f"OpenVINO {self.version} CPU, f32, {self.threads} thread(s), {mode}"

    def throughput(self, batch_size: int = 1) -> "OpenVinoEngine":
        """This engine in OpenVINO's throughput mode: ``run`` may be called from ``parallel`` threads at once.

        Made once, with the model for ``batch_size`` loaded (later sizes load on first use).
        """
        if self._bulk:
            return self
        with self._compile_lock:
            if self._sibling is None:
                self._sibling = OpenVinoEngine(self._model, self.device, self.threads, self._cache_dir, bulk=True,
                                               warm_size=batch_size, core=self._core)
        return self._sibling

    def _compile(self, path: Path) -> queue.SimpleQueue[Any]:
        try:
            compiled = self._core.compile_model(str(path), "CPU", self._config)
            streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) if self._bulk else 1
            idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
            for _ in range(max(1, streams)):
                idle.put(compiled.create_infer_request())
        except Exception as exc:  # openvino raises RuntimeError subclasses of its own
            raise EngineError(f"OpenVINO cannot load {path} ({str(exc).strip().splitlines()[0][:200]})") from None
        self.parallel = max(self.parallel, streams)
        return idle

    def _dynamic(self) -> tuple[int, queue.SimpleQueue[Any]]:
        if 0 not in self._idle:
            self._idle[0] = self._compile(self._model)
        return 0, self._idle[0]

    def _request_for(self, size: int) -> tuple[int, queue.SimpleQueue[Any]]:
        """The batch size to run ``size`` images at (larger: padded) and the idle requests of its model."""
        with self._compile_lock:
            if self._cache_dir is None:
                return self._dynamic()
            if size in self._idle:
                return size, self._idle[size]
            self._uses[size] = self._uses.get(size, 0) + 1
            larger = [s for s in self._idle if s > size]
            if larger and self._uses[size] <= 2:
                # A last, partial batch: padding it onto a model already compiled costs less than compiling one
                # for it. A size that keeps coming gets its own model.
                return min(larger), self._idle[min(larger)]
            from .conversion import fixed_batch_onnx

            try:
                path = fixed_batch_onnx(self._model, self._cache_dir, size)
            except OSError:  # a full or read-only disk: the dynamic model needs no new file
                return self._dynamic()
            try:
                self._idle[size] = self._compile(path)
            except EngineError:
                path.unlink(missing_ok=True)  # made here, so made again: once
                self._idle[size] = self._compile(fixed_batch_onnx(self._model, self._cache_dir, size))
            return size, self._idle[size]

    def run(self, batch: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(batch, dtype=np.float32)
        count = len(data)
        size, idle = self._request_for(count)
        if size > count:
            data = np.concatenate([data, np.zeros((size - count,) + data.shape[1:], dtype=np.float32)])
        request = idle.get()  # blocks while every stream of this model is busy
        try:
            logits = request.infer([data])[0]
            return np.array(logits[:count], dtype=np.float32)  # a copy: the request reuses its output buffer
        finally:
            idle.put(request)


class OnnxRuntimeEngine(_OneBatchAtATime):
    """ONNX Runtime on a model converted by paddle2onnx; ``InferenceSession.run`` is safe from several threads."""

    name = "onnxruntime"

    def __init__(self, model: Path | bytes, device: str = "cpu", threads: int | None = None) -> None:
        from .imports import import_quietly

        onnxruntime = import_quietly("onnxruntime")
        options = onnxruntime.SessionOptions()
        # A model cached by an older mixnet-cli carries unused constants that ONNX Runtime warns about on each load.
        options.log_severity_level = 3
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One convolution after another: parallel execution of the graph only adds scheduling here.
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        self.threads = (threads or physical_cores()) if device == "cpu" else None
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        # Spinning threads burn the cores the image decoders need, and collapse under any other load.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if device == "cpu":
            providers: list[Any] = ["CPUExecutionProvider"]
        else:
            providers = [("CUDAExecutionProvider", {"device_id": _gpu_index(device)}), "CPUExecutionProvider"]
        source = model if isinstance(model, bytes) else str(model)
        try:
            self._session = onnxruntime.InferenceSession(source, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files and devices
            where = "the model" if isinstance(model, bytes) else str(model)
            raise EngineError(f"onnxruntime cannot load {where} on {device} ({str(exc).splitlines()[0][:200]})") from None
        active = self._session.get_providers()
        if device != "cpu" and (not active or active[0] != "CUDAExecutionProvider"):
            raise DeviceError(
                f"onnxruntime could not use CUDA on {device} (it offered {', '.join(active)}); check the CUDA and "
                "cuDNN libraries onnxruntime-gpu needs, nvidia-smi, or use --device cpu"
            )
        self.device = device
        self.detail = f"{active[0]}, " + (f"{self.threads} thread(s)" if device == "cpu" else f"device {_gpu_index(device)}")
        self._input = self._session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(logits, dtype=np.float32)


class PaddleInferenceEngine(_OneBatchAtATime):
    """Paddle Inference on a ``paddle.jit.save`` model (``inference.json`` + ``inference.pdiparams``)."""

    name = "paddle"

    def __init__(self, program: Path, params: Path, device: str = "cpu", threads: int | None = None) -> None:
        from .imports import import_quietly

        inference = import_quietly("paddle.inference")
        self.version = str(import_quietly("paddle").__version__)
        self.device = device
        self.threads = (threads or physical_cores()) if device == "cpu" else None
        notes: list[str] = []

        def configure(tensorrt: bool) -> Any:
            config = inference.Config(str(program), str(params))
            if device == "cpu":
                config.disable_gpu()
                config.enable_onednn()
                config.set_cpu_math_library_num_threads(self.threads)
            else:
                config.enable_use_gpu(256, _gpu_index(device))
                if tensorrt:
                    config.enable_tensorrt_engine(
                        workspace_size=1 << 30, max_batch_size=64, min_subgraph_size=3,
                        precision_mode=inference.PrecisionType.Float32, use_static=False, use_calib_mode=False,
                    )
            config.switch_ir_optim(True)
            config.disable_glog_info()
            # Not enable_memory_optim(): on paddle 3.3 it fails with "Not find predictor_id ...".
            return config

        use_trt = device != "cpu" and tuple(inference.get_trt_runtime_version()) != (0, 0, 0)
        try:
            try:
                self._predictor = inference.create_predictor(configure(use_trt))
                if use_trt:
                    notes.append("TensorRT")
            except Exception:
                if not use_trt:
                    raise
                self._predictor = inference.create_predictor(configure(False))
        except Exception as exc:
            raise EngineError(f"Paddle Inference cannot load {program} on {device} ({str(exc).splitlines()[0][:200]})") from None
        self._input = self._predictor.get_input_handle(self._predictor.get_input_names()[0])
        self._output = self._predictor.get_output_handle(self._predictor.get_output_names()[0])
        # A predictor is not thread-safe.
        self._lock = threading.Lock()
        self.detail = ("oneDNN, " + f"{self.threads} thread(s)") if device == "cpu" else ", ".join(["CUDA"] + notes)

    def run(self, batch: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            self._input.reshape(list(data.shape))
            self._input.copy_from_cpu(data)
            self._predictor.run()
            return np.asarray(self._output.copy_to_cpu(), dtype=np.float32)


class PaddleDygraphEngine(_OneBatchAtATime):
    """The paddleclas network itself, run eagerly by paddle (the reference every other engine must match)."""

    name = "dygraph"

    def __init__(self, spec: ModelSpec, state: dict[str, np.ndarray], device: str, threads: int | None = None) -> None:
        from .imports import import_quietly
        from .model import load_network

        self._paddle = import_quietly("paddle")
        self._paddle.set_device(device)
        self.device = device
        self.threads = None  # paddle's own default
        self.detail = "paddle eager mode, " + ("CPU" if device == "cpu" else "CUDA")
        self._network = load_network(spec, state)

    def run(self, batch: np.ndarray) -> np.ndarray:
        paddle = self._paddle
        with paddle.no_grad():
            logits = self._network(paddle.to_tensor(np.ascontiguousarray(batch, dtype=np.float32)))
        return np.asarray(logits.numpy(), dtype=np.float32)


class _OpenVinoFailed(EngineError):
    """OpenVINO itself could not run the (good) ONNX model: ONNX Runtime can still take over."""


def _build(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice, threads: int | None) -> Engine:
    if choice.engine == "dygraph":
        from .weights import load_state

        return PaddleDygraphEngine(spec, load_state(weights), choice.device, threads)
    from . import cache
    from .conversion import engine_checked, ensure_converted, openvino_dir, reference_logits

    require_engine(choice.engine)
    sha256 = weights.record.sha256
    if choice.engine == "paddle":
        converted = ensure_converted(spec, weights.path, sha256, "paddle")
        program = converted.files.get("inference.json") or converted.file(".pdmodel")
        engine: Engine = PaddleInferenceEngine(program, converted.file(".pdiparams"), choice.device, threads)
        if not engine_checked(converted.directory, engine.name, engine.version):  # type: ignore[attr-defined]
            _check(engine, spec, reference_logits(spec, converted), converted.directory, engine.version)  # type: ignore[attr-defined]
        return engine
    try:
        converted = ensure_converted(spec, weights.path, sha256, "onnx")
    except CacheError:
        if choice.engine != "onnxruntime" and not choice.engine_auto:
            raise
        # A read-only cache without the model: build it in memory for this run (well under a second).
        from .conversion import onnx_bytes

        engine = OnnxRuntimeEngine(onnx_bytes(spec, weights.path), choice.device, threads)
        engine.detail += ", network built in memory (the cache is read-only)"
        return engine
    if choice.engine == "onnxruntime":
        # The reference logits are ONNX Runtime's own on this file: nothing to check again.
        return OnnxRuntimeEngine(converted.file(".onnx"), choice.device, threads)
    try:
        directory: Path | None = cache.ensure_dir(openvino_dir(sha256))
    except MixnetError:
        directory = None  # a read-only cache: compile every time
    try:
        version = openvino_version()
        if directory is not None and engine_checked(directory, "openvino", version):
            return OpenVinoEngine(converted.file(".onnx"), choice.device, threads, directory)
        # OpenVINO computes differently from ONNX Runtime, whose logits are the reference: it passes the check
        # once per OpenVINO version before its answers are trusted (one image at a time: its batch size is fixed
        # per compiled model). The reference (ONNX Runtime, on a first run) is computed in a thread while
        # OpenVINO compiles: both release the GIL, and the first run waits for the slower only.
        with ThreadPoolExecutor(max_workers=1) as pool:
            reference = pool.submit(reference_logits, spec, converted)
            engine = OpenVinoEngine(converted.file(".onnx"), choice.device, threads, directory)
            logits = reference.result()
        _check(engine, spec, logits, directory, version, whole_batch=False)
    except DeviceError:
        raise
    except EngineError as exc:
        raise _OpenVinoFailed(str(exc)) from None
    return engine


def _check(engine: Engine, spec: ModelSpec, reference: np.ndarray, marks: Path | None, version: str,
           *, whole_batch: bool = True) -> None:
    """Hold ``engine`` to the reference logits, and remember in ``marks`` that it passed at this ``version``
    (None, a read-only cache: it is checked every time). Raises :class:`EngineError` when it fails."""
    from .conversion import check_engine, mark_engine_checked

    check = check_engine(engine, spec, reference, whole_batch=whole_batch)
    if marks is not None:
        mark_engine_checked(marks, engine.name, version, check)


def openvino_version() -> str:
    """The installed OpenVINO's version (``2026.4.1``), as its engine reports it."""
    from .imports import import_quietly

    return str(import_quietly("openvino").get_version()).split("-", 1)[0]


def _fallback(choice: EngineChoice, exc: MixnetError) -> EngineChoice | None:
    """What ``auto`` tries after ``choice`` failed with ``exc`` (None: nothing better left, raise it)."""
    if not choice.engine_auto:
        return None
    if choice.device != "cpu" and isinstance(exc, DeviceError):
        cpu = _cpu_auto(f"{choice.engine} could not use the GPU: {exc}")
        return replace(cpu, engine_reason=f"{cpu.engine_reason}; {choice.engine} could not use the GPU")
    if isinstance(exc, _OpenVinoFailed) and _installed("onnxruntime"):
        return replace(choice, engine="onnxruntime", engine_reason=f"openvino failed: {exc}")
    if choice.engine != "dygraph" and ENGINES["dygraph"].missing() is None:
        return replace(choice, engine="dygraph", engine_reason=f"{choice.engine} failed: {exc}")
    return None


def create_engine(
    spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice, *, threads: int | None = None
) -> tuple[Engine, EngineChoice]:
    """The engine ``choice`` names, on its device, for these verified weights; returns it with the final choice.

    An engine picked by ``auto`` that cannot start (a failed conversion or check, a GPU it cannot drive) gives
    way, with a warning on stderr, to the next that can; one the user asked for raises instead.
    """
    try:
        return _build(spec, weights, choice, threads), choice
    except MixnetError as exc:
        fallback = _fallback(choice, exc)
        if fallback is None:
            raise
        print(f"Warning: {exc}; using {fallback.engine} on {fallback.device} instead", file=sys.stderr, flush=True)
        return create_engine(spec, weights, fallback, threads=threads)


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

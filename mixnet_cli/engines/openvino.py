"""The ``openvino`` engine: OpenVINO on mixnet's ONNX graph, on the CPU, in f32 (``auto``'s choice on AVX-512 CPUs:
BENCHMARKS.md), or in bf16 where asked for and the CPU has bf16 arithmetic."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..base.errors import CacheError, DeviceError, EngineError, MixnetError
from ..base.manifest import ModelSpec
from .base import DeviceChoice, Engine, EngineFailed, check, physical_cores

if TYPE_CHECKING:
    from .choice import EngineChoice
    from ..weights.store import VerifiedWeights


def resolve_device(name: str, requested: str) -> DeviceChoice:
    """Where OpenVINO runs: the CPU only; anything else is an error naming the GPU engines."""
    if name not in ("auto", "cpu"):
        raise DeviceError(
            f"device '{requested}': the openvino engine runs on the CPU only; for a GPU use --engine torch (with a "
            "CUDA build of torch), --engine onnxruntime (with onnxruntime-gpu) or --engine paddle (with "
            "paddlepaddle-gpu)"
        )
    return DeviceChoice("cpu", "asked for the CPU" if name == "cpu" else "the openvino engine runs on the CPU")


# --precision -> OpenVINO's inference precision hint.
_INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16"}
# What bf16 does to the answers, against fp32 (benchmarks/bf16.py: MixNet_S/M/L with weights whose logits look
# trained, 200 ImageNet photos, an AVX-512 EPYC with avx512_bf16): said by -v and in README.
BF16_AGREEMENT = "top-1 as fp32's on 97-98.5% of photos, top-5 set on 65-70%, probabilities within 0.04-0.17"


class OpenVinoEngine:
    """OpenVINO on mixnet's ONNX graph, on the CPU, computing in f32 (or, opt-in, bf16).

    f32 is asked for explicitly: on CPUs with bf16 units OpenVINO would otherwise compute in bf16, whose
    answers differ from paddle's in the third digit. ``precision="bf16"`` asks for bf16 through the same hint
    (on CPUs with bf16 arithmetic only: :func:`mixnet_cli.engines.choice.refuse_emulated_bf16`). Each batch size runs a model whose batch dimension is
    fixed (about 20% faster than a dynamic one at batch 1), made once per size from the checked model and kept
    with OpenVINO's compiled form in ``cache_dir``; the first two batches of a size that has no model yet run
    padded on a larger one (a last, partial batch), later ones get their own. Without ``cache_dir`` (a read-only
    cache) the dynamic model is compiled.

    The engine runs one batch at a time on all its threads (OpenVINO's latency mode): the quickest answer for
    one image. :meth:`throughput` gives its sibling for bulk work, which splits the threads into OpenVINO
    streams that each run a batch of their own: no stream waits for another's threads, so a stream keeps
    computing while the image decoders take a core (BENCHMARKS.md). Both compile the same cached blob.

    ``background=True`` (a model this OpenVINO compiled and checked before) loads the model for ``warm_size`` in
    a thread; the first batch waits for it, and compiles again itself (raising :class:`EngineError`) if it failed.
    With ``bulk_first`` (a batch size), that thread makes :meth:`throughput`'s sibling for that size instead, for a
    bulk job ahead; this engine's own model then loads on its first batch.
    """

    name = "openvino"

    def __init__(self, model: Path, device: str = "cpu", threads: int | None = None,
                 cache_dir: Path | None = None, *, bulk: bool = False, warm_size: int = 1, core: Any = None,
                 precision: str = "fp32", background: bool = False, bulk_first: int | None = None) -> None:
        if device != "cpu":
            raise DeviceError(f"the openvino engine runs on the CPU only, not on {device}; use --device cpu")
        from ..base.third_party import import_quietly

        openvino = import_quietly("openvino")
        self.device = device
        self.threads = threads or physical_cores()
        self.version = openvino_version()
        self._model = model
        self._cache_dir = cache_dir
        self._bulk = bulk
        if precision not in _INFERENCE_PRECISION:
            raise EngineError(f"the openvino engine computes in {' or '.join(_INFERENCE_PRECISION)}, not {precision}")
        self.precision = precision
        if core is None:
            core = openvino.Core()
            if cache_dir is not None:
                core.set_property({"CACHE_DIR": str(cache_dir / "compiled")})
        self._core = core
        self._config: dict[str, Any] = {
            # THROUGHPUT lets OpenVINO split the threads into streams (one per core on small machines).
            "PERFORMANCE_HINT": "THROUGHPUT" if bulk else "LATENCY",
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": _INFERENCE_PRECISION[precision],
        }
        if not bulk:
            self._config["NUM_STREAMS"] = 1
        # batch size (0: dynamic) -> the idle infer requests of its compiled model (one per stream)
        self._idle: dict[int, queue.SimpleQueue[Any]] = {}
        self._uses: dict[int, int] = {}  # how often a size without its own model came
        self._compile_lock = threading.Lock()
        self._sibling: OpenVinoEngine | None = None
        self._scratch: Any = None  # a temporary directory holding the model file, when the cache could not
        self.parallel = 1
        self._warming: threading.Thread | None = None
        if background:
            # A model this OpenVINO already compiled and passed the check with (build): loading it from the
            # cache takes 65-100 ms of one core with the GIL released, so it runs beside what the caller does
            # next (the classifier imports OpenCV, the CLI decodes the image) and the first batch waits for it.
            # Should it fail after all, the first batch compiles again and raises that error.
            if bulk_first is not None and not bulk:
                # A bulk job ahead (``bulk_first``: its batch size): the sibling in throughput mode is what runs
                # it; this engine's own model loads on its first batch, if one ever comes.
                self._warming = threading.Thread(target=self._warm_sibling, args=(bulk_first,),
                                                 name="openvino-compile")
            else:
                self._warming = threading.Thread(target=self._warm_up, args=(warm_size,), name="openvino-compile")
            self._warming.start()
        else:
            # A model that does not load fails here; one image is the common case, and a sibling warms up the
            # batch size in use (which also tells how many streams OpenVINO made).
            self._request_for(warm_size)
        mode = f"{self.parallel} streams" if bulk else "latency mode"
        arithmetic = "f32" if precision == "fp32" else f"bf16 (opt-in; {BF16_AGREEMENT})"
        self.detail = f"OpenVINO {self.version} CPU, {arithmetic}, {self.threads} thread(s), {mode}"

    def throughput(self, batch_size: int = 1) -> "OpenVinoEngine":
        """This engine in OpenVINO's throughput mode: ``run`` may be called from ``parallel`` threads at once.

        Made once, with the model for ``batch_size`` loaded (later sizes load on first use).
        """
        if self._bulk:
            return self
        with self._compile_lock:
            if self._sibling is None:
                self._sibling = OpenVinoEngine(self._model, self.device, self.threads, self._cache_dir, bulk=True,
                                               warm_size=batch_size, core=self._core, precision=self.precision)
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

    def _warm_up(self, size: int) -> None:
        try:
            self._request_for(size)
        except Exception:  # noqa: BLE001 - the first batch compiles again, in the caller's thread, and raises
            pass

    def _warm_sibling(self, batch_size: int) -> None:
        try:
            self.throughput(batch_size)
        except Exception:  # noqa: BLE001 - the caller's own throughput() makes it again, and raises
            pass

    def _dynamic(self) -> tuple[int, queue.SimpleQueue[Any]]:
        if 0 not in self._idle:
            self._idle[0] = self._compile(self._model)
        return 0, self._idle[0]

    def _request_for(self, size: int) -> tuple[int, queue.SimpleQueue[Any]]:
        """The batch size to run ``size`` images at (larger: padded) and the idle requests of its model."""
        warming = self._warming
        if warming is not None and warming is not threading.current_thread():
            warming.join()  # its model (or its failure, met again below) first
            self._warming = None
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
            logits = _infer(request, data)[0]
            return np.array(logits[:count], dtype=np.float32)  # a copy: the request reuses its output buffer
        finally:
            idle.put(request)


    def run_with_feature_map(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (``N x classes``) and the final feature map (``N x 1536 x 7 x 7``), float32, from one forward
        pass; for an engine on the graph with the feature map output (:func:`build_with_feature_map`)."""
        data = np.ascontiguousarray(batch, dtype=np.float32)
        count = len(data)
        size, idle = self._request_for(count)
        if size > count:
            data = np.concatenate([data, np.zeros((size - count,) + data.shape[1:], dtype=np.float32)])
        request = idle.get()
        try:
            outputs = _infer(request, data)
            if len(outputs) < 2:
                raise EngineError("this model has no feature map output; build it with build_with_feature_map")
            return (np.array(outputs[0][:count], dtype=np.float32), np.array(outputs[1][:count], dtype=np.float32))
        finally:
            idle.put(request)


# OpenVINO's Python bindings set up their view of numpy (pybind11's numpy API, and statics around it) on the first
# inference of the process, and two threads doing that at once can deadlock: one holds the set-up and waits for the
# GIL, the other holds the GIL and waits for the set-up (seen with two streams starting together; the process hangs
# for good). The first inference of the process runs alone; after it, nothing is left to set up.
_FIRST_INFERENCE = threading.Lock()
_bindings_ready = False


def _infer(request: Any, data: np.ndarray) -> Any:
    """``request.infer([data])``, the process's first one alone (see ``_FIRST_INFERENCE``)."""
    global _bindings_ready
    if _bindings_ready:
        return request.infer([data])
    with _FIRST_INFERENCE:
        outputs = request.infer([data])
        outputs[0]  # the output's numpy view: the rest of the bindings' numpy set-up
        _bindings_ready = True
        return outputs


def build_with_feature_map(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice,
                           threads: int | None) -> Engine:
    """OpenVINO on the graph with the final feature map as a second output (``run_with_feature_map``), written
    from the verified weights beside OpenVINO's other files of them (OpenVINO reads models from files; a cache
    that cannot be written gets a temporary file, kept as long as the engine), compiled with a dynamic batch, and
    held to the reference logits at each start. Raises :class:`EngineFailed` when OpenVINO fails."""
    import tempfile

    from ..base import cache, files
    from .conversion import ensure_converted, onnx_bytes, onnx_runtime_logits, openvino_dir, reference_logits

    # The reference first: a first conversion of these weights makes OpenVINO's directory afresh.
    try:
        reference = reference_logits(spec, ensure_converted(spec, weights.path, weights.record.sha256, "onnx"))
    except CacheError:
        reference = onnx_runtime_logits(spec, onnx_bytes(spec, weights.path))
    model = onnx_bytes(spec, weights.path, feature_map=True)
    scratch = None
    try:
        path = cache.ensure_dir(openvino_dir(weights.record.sha256)) / "feature_map.onnx"
        if not path.is_file() or path.read_bytes() != model:
            files.write_bytes(path, model)
    except (CacheError, OSError):  # a read-only cache
        scratch = tempfile.TemporaryDirectory(prefix="mixnet-openvino-")
        path = Path(scratch.name) / "feature_map.onnx"
        path.write_bytes(model)
    try:
        engine = OpenVinoEngine(path, choice.device, threads, None)
        engine.detail += ", with the feature map output"
        check(engine, spec, reference, None, engine.version)
    except DeviceError:
        raise
    except EngineError as exc:
        raise EngineFailed(str(exc)) from None
    engine._scratch = scratch  # its throughput sibling compiles the same file
    return engine


def build(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice, threads: int | None) -> Engine:
    """OpenVINO on the cached ONNX model of these weights (converted first when needed), checked once per
    OpenVINO version against ONNX Runtime's logits. Raises :class:`EngineFailed` when OpenVINO itself fails,
    or the cache cannot take the model."""
    from ..base import cache
    from .conversion import engine_checked, ensure_converted, openvino_dir, reference_logits

    try:
        converted = ensure_converted(spec, weights.path, weights.record.sha256, "onnx", openvino_copy=True)
    except CacheError as exc:
        if not choice.engine_auto:
            raise
        # A cache that cannot take the model (read-only): OpenVINO cannot run it; ONNX Runtime can, from memory.
        raise EngineFailed(str(exc)) from None
    try:
        directory: Path | None = cache.ensure_dir(openvino_dir(weights.record.sha256))
    except MixnetError:
        directory = None  # a read-only cache: compile every time
    try:
        version = openvino_version()
        if choice.precision != "fp32":
            # bf16 cannot pass the fp32 check (answers move by up to ~0.1 in probability); it is opt-in, and -v
            # and README give its measured agreement with fp32.
            return OpenVinoEngine(converted.file(".onnx"), choice.device, threads, directory,
                                  precision=choice.precision)
        if directory is not None and engine_checked(directory, "openvino", version):
            # Compiled and checked before by this OpenVINO: its cached form loads while the caller goes on (for a
            # bulk job, the throughput mode's model: the latency mode's would only delay the first batch).
            return OpenVinoEngine(converted.file(".onnx"), choice.device, threads, directory, background=True,
                                  bulk_first=choice.bulk_batch)
        # OpenVINO computes differently from ONNX Runtime, whose logits are the reference: it passes the check
        # once per OpenVINO version before its answers are trusted (one image at a time: its batch size is fixed
        # per compiled model). The reference (ONNX Runtime, on a first run) is computed in a thread while
        # OpenVINO compiles: both release the GIL, and the first run waits for the slower only.
        with ThreadPoolExecutor(max_workers=1) as pool:
            reference = pool.submit(reference_logits, spec, converted)
            engine = OpenVinoEngine(converted.file(".onnx"), choice.device, threads, directory)
            logits = reference.result()
        check(engine, spec, logits, directory, version, whole_batch=False)
    except DeviceError:
        raise
    except EngineError as exc:
        raise EngineFailed(str(exc)) from None
    return engine


def openvino_version() -> str:
    """The installed OpenVINO's version (``2026.4.1``), as its engine reports it."""
    from ..base.third_party import import_quietly

    return str(import_quietly("openvino").get_version()).split("-", 1)[0]

"""The ``onnxruntime`` engine: ONNX Runtime on mixnet's ONNX graph, on the CPU the quickest to start and the
fastest on AVX2 CPUs (``auto``'s choice there) (BENCHMARKS.md); CUDA with onnxruntime-gpu."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..base.errors import CacheError, DeviceError, EngineError
from ..base.manifest import ModelSpec
from .base import DeviceChoice, Engine, gpu_index, physical_cores

if TYPE_CHECKING:
    from .choice import EngineChoice
    from ..weights.store import VerifiedWeights


def available_providers() -> list[str]:
    """ONNX Runtime's execution providers (imports onnxruntime)."""
    from ..base.third_party import import_quietly

    return list(import_quietly("onnxruntime").get_available_providers())


def gpu_problem() -> str | None:
    """For ``auto``: why ONNX Runtime cannot drive a GPU here (None: it may). The CUDA provider's library is looked
    for without importing onnxruntime (the import costs a tenth of the cold start, and a CPU-only build, the usual
    case, cannot have the provider)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return "onnxruntime is not installed"
    if not any(any((Path(location) / "capi").glob("*onnxruntime_providers_cuda*"))
               for location in spec.submodule_search_locations):
        return "onnxruntime is the CPU build (not onnxruntime-gpu)"
    if "CUDAExecutionProvider" not in available_providers():
        return "onnxruntime-gpu cannot load its CUDA provider (CUDA or cuDNN libraries missing)"
    return None


def resolve_device(name: str, requested: str) -> DeviceChoice:
    """Where ONNX Runtime runs: a GPU only with its CUDA provider (onnxruntime-gpu); a missing one is an error."""
    providers = available_providers()
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
    return DeviceChoice(f"gpu:{gpu_index(name)}", "asked for this GPU")


class OnnxRuntimeEngine:
    """ONNX Runtime on mixnet's ONNX graph (a file, or the serialised model); ``run`` is safe from several threads.

    On the CPU the engine runs one batch at a time on all its threads: the quickest answer for one image.
    :meth:`throughput` gives its sibling for bulk work: a session with one thread, run from ``threads`` threads at
    once, so that each core computes a batch of its own and none waits for another's threads while the image
    decoders take a core (BENCHMARKS.md, "Bulk"). Creating a session costs a tenth of a second or two, so the
    sibling is made only when a job proves large.
    """

    name = "onnxruntime"

    def __init__(self, model: Path | bytes, device: str = "cpu", threads: int | None = None, *,
                 bulk: bool = False, note: str = "") -> None:
        from ..base.third_party import import_quietly

        onnxruntime = import_quietly("onnxruntime")
        self.device = device
        self.threads = (threads or physical_cores()) if device == "cpu" else None
        self._model = model
        self._bulk = bulk
        self._note = note
        self._sibling: OnnxRuntimeEngine | None = None
        self._sibling_lock = threading.Lock()
        # Bulk on the CPU: one thread per session call, as many calls at once as there are threads.
        self.parallel = self.threads if (bulk and self.threads) else 1
        options = onnxruntime.SessionOptions()
        # A model cached by an older mixnet-cli carries unused constants that ONNX Runtime warns about on each load.
        options.log_severity_level = 3
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One convolution after another: parallel execution of the graph only adds scheduling here.
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if self.threads is not None:
            options.intra_op_num_threads = 1 if bulk else self.threads
        # Spinning threads burn the cores the image decoders need, and collapse under any other load.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if device == "cpu":
            providers: list[Any] = ["CPUExecutionProvider"]
        else:
            providers = [("CUDAExecutionProvider", {"device_id": gpu_index(device)}), "CPUExecutionProvider"]
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
        if device != "cpu":
            mode = f"device {gpu_index(device)}"
        elif bulk:
            mode = f"{self.parallel} batches at once, 1 thread each"
        else:
            mode = f"{self.threads} thread(s), latency mode"
        self.detail = f"{active[0]}, {mode}" + (f", {note}" if note else "")
        self._input = self._session.get_inputs()[0].name
        self._outputs = [output.name for output in self._session.get_outputs()]
        self.has_features = len(self._outputs) > 1

    def run(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self._session.run(self._outputs[:1], {self._input: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(logits, dtype=np.float32)

    def run_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (``N x classes``) and pooled features (``N x 1536``), float32, from one forward pass; for a
        model built with features (:func:`mixnet_cli.engines.conversion.onnx_bytes`)."""
        if not self.has_features:
            raise EngineError("this model has no features output; build it with features=True")
        logits, features = self._session.run(self._outputs[:2],
                                             {self._input: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(logits, dtype=np.float32), np.asarray(features, dtype=np.float32)

    def throughput(self, batch_size: int = 1) -> "OnnxRuntimeEngine":
        """This engine for bulk work (made once): on the CPU with more than one thread, a one-thread session that
        ``parallel`` threads run at once; otherwise (one thread, a GPU) the engine itself."""
        if self._bulk or self.device != "cpu" or (self.threads or 1) < 2:
            return self
        with self._sibling_lock:
            if self._sibling is None:
                self._sibling = OnnxRuntimeEngine(self._model, self.device, self.threads, bulk=True,
                                                  note=self._note)
        return self._sibling


def build(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice, threads: int | None) -> Engine:
    """ONNX Runtime on the cached ONNX model of these weights (converted first when needed). Its logits on the
    test batch are the reference, so there is nothing to check again. A cache that cannot take the model
    (read-only) gets it built in memory for this run."""
    from .conversion import ensure_converted, onnx_bytes

    try:
        converted = ensure_converted(spec, weights.path, weights.record.sha256, "onnx")
    except CacheError:
        return OnnxRuntimeEngine(onnx_bytes(spec, weights.path), choice.device, threads,
                                 note="network built in memory (the cache is read-only)")
    return OnnxRuntimeEngine(converted.file(".onnx"), choice.device, threads)


def build_with_features(spec: ModelSpec, weights: "VerifiedWeights", device: str, threads: int | None) -> Engine:
    """ONNX Runtime on the graph with a second output, the pooled features (``run_with_features``), built in
    memory from the verified weights (well under a second; not cached)."""
    from .conversion import onnx_bytes

    return OnnxRuntimeEngine(onnx_bytes(spec, weights.path, features=True), device, threads,
                             note="with the features output")

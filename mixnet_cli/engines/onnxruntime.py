"""The ``onnxruntime`` engine: ONNX Runtime on mixnet's ONNX graph, on the CPU the quickest to start and the
fastest on AVX2 CPUs (``auto``'s choice there) (BENCHMARKS.md); CUDA with onnxruntime-gpu."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..base import cache, files, settings
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


# ONNX Runtime optimises a graph each time a session is made from it (fusing, and on the CPU rewriting the
# convolutions into its blocked NCHWc layout): 13-25 ms of a cold one-image call. The optimised graph, saved once
# in ONNX Runtime's own format (ORT), loads without that work and gives bit-identical logits. It may hold kernels
# for this CPU's instruction sets (ONNX Runtime's documentation says to run such a graph only where it was made),
# so it is kept per ONNX Runtime version and per CPU features:
#     onnx/<weights sha256>/onnxruntime-<version>-<cpu key>/<model>.ort   and its record.json
# checked like every converted model (sizes, sha256, the stat that spares the hash) and made from the ONNX model
# whose sha256 its record names.
OPTIMISED_RECORD_VERSION = 1
_LEFTOVER_AGE_S = 3600.0


def cpu_key() -> str:
    """12 hex digits naming this machine's CPU kind for ONNX Runtime's kernels: a hash of the architecture and
    the CPU's feature flags (``/proc/cpuinfo`` on Linux; the processor's name elsewhere)."""
    described = platform.machine() + " " + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith(("flags", "Features")):  # x86, ARM
                    described += " " + " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return hashlib.sha256(described.encode()).hexdigest()[:12]


def optimised_dir(onnx_model: Path, onnxruntime_version: str) -> Path:
    """Where the optimised graph of ``onnx_model`` (in its converted folder) is kept for this ONNX Runtime and CPU."""
    return onnx_model.parent / f"onnxruntime-{onnxruntime_version}-{cpu_key()}"


def cached_optimised(onnx_model: Path, onnx_sha256: str, onnxruntime_version: str) -> Path | None:
    """The optimised graph (``.ort``) of the ONNX model with this sha256, when cached for this ONNX Runtime and CPU
    and intact; else None."""
    directory = optimised_dir(onnx_model, onnxruntime_version)
    record = cache.read_directory_record(directory)
    if record is None or (record.get("record_version"), record.get("onnx_sha256"), record.get("onnxruntime")) != (
            OPTIMISED_RECORD_VERSION, onnx_sha256, onnxruntime_version):
        return None
    check = cache.check_directory(directory, record, full=settings.verify_mode() == "always")
    if check.problem is not None:
        return None  # replaced by the next session made from the ONNX model
    if check.new_stamps:
        # Best effort: a process replacing the folder meanwhile at worst leaves it without its file, which the
        # next run finds and replaces.
        try:
            files.write_text(directory / cache.DIRECTORY_RECORD,
                             json.dumps(cache.restamped(record, check.new_stamps), indent=2) + "\n")
        except OSError:
            pass
    return directory / f"{onnx_model.stem}.ort"


class _OptimisedWriter:
    """Where a session made from the ONNX model saves its optimised graph (a folder beside the final one), and
    moving it into place once the session exists. Best effort: a cache that cannot take it costs only the time
    to optimise the graph again next run."""

    def __init__(self, onnx_model: Path, onnx_sha256: str, onnxruntime_version: str) -> None:
        self.final = optimised_dir(onnx_model, onnxruntime_version)
        self.onnx_sha256 = onnx_sha256
        self.version = onnxruntime_version
        self.name = f"{onnx_model.stem}.ort"
        for leftover in onnx_model.parent.glob(f".{self.final.name}.*.incomplete"):
            # Of a process killed while saving (saving takes well under a second; an hour is far past it).
            try:
                if time.time() - leftover.stat().st_mtime > _LEFTOVER_AGE_S:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                pass
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".incomplete", dir=onnx_model.parent))

    def finish(self) -> None:
        try:
            written = self.tmp / self.name
            if written.is_file():
                record = {"record_version": OPTIMISED_RECORD_VERSION, "onnx_sha256": self.onnx_sha256,
                          "onnxruntime": self.version, "cpu_key": cpu_key(),
                          "files": {self.name: cache.file_entry(written)}}
                files.write_text(self.tmp / cache.DIRECTORY_RECORD, json.dumps(record, indent=2) + "\n")
                if self.final.exists():  # a damaged one (checked before this session was made)
                    shutil.rmtree(self.final, ignore_errors=True)
                files.adopt_directory(self.tmp, self.final)  # fails if another process put its copy first: fine
        except OSError:
            pass
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


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
                 bulk: bool = False, note: str = "", model_sha256: str | None = None) -> None:
        """``model_sha256``: the checked sha256 of the ``model`` file, for a model in mixnet's cache: then the
        optimised graph is kept beside it and loaded instead on the CPU (see ``OPTIMISED_RECORD_VERSION``)."""
        from ..base.third_party import import_quietly

        onnxruntime = import_quietly("onnxruntime")
        self.device = device
        self.threads = (threads or physical_cores()) if device == "cpu" else None
        self._model = model
        self._model_sha256 = model_sha256
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
        writer = None
        if isinstance(model, Path) and model_sha256 and device == "cpu":
            optimised = cached_optimised(model, model_sha256, onnxruntime.__version__)
            if optimised is not None:
                source = str(optimised)
            else:
                try:
                    writer = _OptimisedWriter(model, model_sha256, onnxruntime.__version__)
                    options.optimized_model_filepath = str(writer.tmp / writer.name)
                    options.add_session_config_entry("session.save_model_format", "ORT")
                except OSError:
                    writer = None  # a read-only cache: optimised in memory, as before
        try:
            self._session = onnxruntime.InferenceSession(source, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files and devices
            where = "the model" if isinstance(model, bytes) else str(model)
            raise EngineError(f"onnxruntime cannot load {where} on {device} ({str(exc).splitlines()[0][:200]})") from None
        finally:
            if writer is not None:
                writer.finish()
        self.optimised_cached = source != str(model) and not isinstance(model, bytes)
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
        if self.optimised_cached:
            mode += ", optimised graph from the cache"
        self.detail = f"{active[0]}, {mode}" + (f", {note}" if note else "")
        self._input = self._session.get_inputs()[0].name
        from ..network.onnx_graph import FEATURE_MAP_NAME, FEATURES_NAME

        self._outputs = [output.name for output in self._session.get_outputs()]
        self.has_features = FEATURES_NAME in self._outputs
        self.has_feature_map = FEATURE_MAP_NAME in self._outputs

    def run(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self._session.run(self._outputs[:1], {self._input: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(logits, dtype=np.float32)

    def run_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (``N x classes``) and pooled features (``N x 1536``), float32, from one forward pass; for a
        model built with features (:func:`mixnet_cli.engines.conversion.onnx_bytes`)."""
        if not self.has_features:
            raise EngineError("this model has no features output; build it with features=True")
        from ..network.onnx_graph import FEATURES_NAME

        logits, features = self._session.run([self._outputs[0], FEATURES_NAME],
                                             {self._input: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(logits, dtype=np.float32), np.asarray(features, dtype=np.float32)

    def run_with_feature_map(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (``N x classes``) and the final feature map (``N x 1536 x 7 x 7``), float32, from one forward
        pass; for a model built with the feature map (:func:`build_with_feature_map`)."""
        if not self.has_feature_map:
            raise EngineError("this model has no feature map output; build it with feature_map=True")
        from ..network.onnx_graph import FEATURE_MAP_NAME

        logits, feature_map = self._session.run([self._outputs[0], FEATURE_MAP_NAME],
                                                {self._input: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(logits, dtype=np.float32), np.asarray(feature_map, dtype=np.float32)

    def throughput(self, batch_size: int = 1) -> "OnnxRuntimeEngine":
        """This engine for bulk work (made once): on the CPU with more than one thread, a one-thread session that
        ``parallel`` threads run at once; otherwise (one thread, a GPU) the engine itself."""
        if self._bulk or self.device != "cpu" or (self.threads or 1) < 2:
            return self
        with self._sibling_lock:
            if self._sibling is None:
                self._sibling = OnnxRuntimeEngine(self._model, self.device, self.threads, bulk=True,
                                                  note=self._note, model_sha256=self._model_sha256)
        return self._sibling


def build(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice, threads: int | None) -> Engine:
    """ONNX Runtime on the cached ONNX model of these weights (converted first when needed). Its logits on the
    test batch are the reference, so there is nothing to check again. A cache that cannot take the model
    (read-only), or holds a newer mixnet-cli's conversion of it (left alone), gets it built in memory for this
    run."""
    from .conversion import NewerModelInCache, ensure_converted, onnx_bytes

    try:
        converted = ensure_converted(spec, weights.path, weights.record.sha256, "onnx")
    except CacheError as exc:
        why = "the cache is read-only"
        if isinstance(exc, NewerModelInCache):
            why = "a newer mixnet-cli's model is in the cache"
            logging.getLogger(__name__).info(
                "a newer mixnet-cli's conversion of %s is in the cache: this run builds the network in memory "
                "(upgrade mixnet-cli, or give this one a cache of its own: MIXNET_HOME)", spec.name)
        return OnnxRuntimeEngine(onnx_bytes(spec, weights.path), choice.device, threads,
                                 note=f"network built in memory ({why})")
    model = converted.file(".onnx")
    return OnnxRuntimeEngine(model, choice.device, threads, model_sha256=converted.record["files"][model.name]["sha256"])


def build_with_features(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice,
                        threads: int | None) -> Engine:
    """ONNX Runtime on the graph with a second output, the pooled features (``run_with_features``), built in
    memory from the verified weights (well under a second; not cached)."""
    from .conversion import onnx_bytes

    return OnnxRuntimeEngine(onnx_bytes(spec, weights.path, features=True), choice.device, threads,
                             note="with the features output")


def build_with_feature_map(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice,
                           threads: int | None) -> Engine:
    """ONNX Runtime on the graph with the final feature map as a second output (``run_with_feature_map``, for
    class activation maps), built in memory from the verified weights like the features one (well under a
    second; not cached)."""
    from .conversion import onnx_bytes

    return OnnxRuntimeEngine(onnx_bytes(spec, weights.path, feature_map=True), choice.device, threads,
                             note="with the feature map output")

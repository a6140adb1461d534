"""The ``torch`` engine: mixnet's network as PyTorch modules (:mod:`mixnet_cli.network.torch_network`), on a CUDA GPU or
the CPU. Needs ``torch`` (the ``[torch]`` extra, or the CUDA build many users have already).

Why PyTorch for the GPU: onnxruntime-gpu and paddlepaddle-gpu are wheels of hundreds of megabytes with CUDA
libraries of their own, while a CUDA build of PyTorch is what most machines with an NVIDIA GPU already have. The
network is built from the same architecture description and in the same form as the ONNX graph, so no converter
is involved, and it is held to the reference logits before its answers are trusted, like every engine.

On a GPU the engine replays each batch size's whole forward pass as one CUDA graph (captured on its first use):
MixNet is a hundred small kernels, and their launches, not the arithmetic, bound its latency. ``precision``:

* ``fp32``: true float32 (TF32 off), the reference's answers to 1e-4; the default, and the only one
  ``classify`` uses;
* ``tf32``: float32 tensors with TF32 tensor-core arithmetic (PyTorch's own default for convolutions);
* ``bf16`` and ``fp16``: the network and its input in that type (logits returned as float32).

``compile``: :func:`torch.compile` (Inductor) on top, for ``benchmark``; its caches go under mixnet's cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..base.errors import DeviceError, EngineError, MixnetError
from ..base.manifest import ModelSpec
from .base import DeviceChoice, Engine, OneBatchAtATime, check, gpu_index, physical_cores

if TYPE_CHECKING:
    from .choice import EngineChoice
    from ..weights.store import VerifiedWeights

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
INSTALL_CUDA = "a CUDA build of PyTorch (pip install torch; see pytorch.org for the CUDA version)"


def _torch() -> Any:
    from ..base.third_party import import_quietly

    return import_quietly("torch")


def _cuda_build_version() -> str | None:
    """The CUDA version the installed torch was built for (None: a CPU build), read from ``torch/version.py``
    without importing torch (that takes one to two seconds)."""
    spec = importlib.util.find_spec("torch")
    for location in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(location) / "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        for line in text.splitlines():
            if line.replace(" ", "").startswith("cuda:") or line.replace(" ", "").startswith("cuda="):
                value = line.split("=", 1)[-1].strip().strip("'\"")
                return None if value in ("", "None") else value
    return None


def _nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver with a device, by its device files (Linux: ``/dev/nvidia0``...,
    or WSL 2's ``/dev/dxg``), importing nothing. A CUDA build of torch is what ``pip install torch`` gives on
    Linux, GPU or not, so its build alone says little."""
    if os.name != "posix" or not Path("/dev").is_dir():
        return True  # not Linux: let torch say
    return (any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/dxg").exists()
            or any(Path("/proc/driver/nvidia/gpus").glob("*")))


def gpu_problem() -> str | None:
    """For ``auto``: why this engine cannot drive a GPU here (None: it may), found without importing torch."""
    cuda = _cuda_build_version()
    if cuda is None:
        return "torch is a CPU build"
    if not _nvidia_driver_present():
        return f"torch has CUDA {cuda}, but no NVIDIA GPU or driver is present"
    return None


def resolve_device(name: str, requested: str) -> DeviceChoice:
    """Where PyTorch runs: a GPU only with a CUDA build that sees it; a GPU asked for and missing is an error."""
    if name == "cpu":
        return DeviceChoice("cpu", "asked for the CPU")
    torch = _torch()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        if count:
            return DeviceChoice("gpu:0", f"torch has CUDA and sees {count} GPU(s)")
        return DeviceChoice("cpu", gpu_problem() or f"torch {torch.__version__} sees no GPU")
    index = gpu_index(name)
    if torch.version.cuda is None:
        raise DeviceError(f"device '{requested}' needs {INSTALL_CUDA}, but torch {torch.__version__} is a CPU "
                          "build; or use --device cpu")
    if index >= count:
        raise DeviceError(f"device '{requested}' is not available: torch sees {count} GPU(s); check "
                          "CUDA_VISIBLE_DEVICES and nvidia-smi, or use --device cpu")
    return DeviceChoice(f"gpu:{index}", "asked for this GPU")


class TorchEngine(OneBatchAtATime):
    """A :class:`~mixnet_cli.network.torch_network.MixNet` module run by PyTorch on ``device`` (``cpu`` or ``gpu:N``).

    ``run`` takes float32 ``N x 3 x S x S`` and returns float32 ``N x classes`` logits, one batch at a time (a
    lock: a CUDA graph's buffers and torch's thread settings are shared). Raises :class:`EngineError` for a
    precision this device cannot run.
    """

    name = "torch"

    def __init__(self, network: Any, device: str = "cpu", threads: int | None = None, *, precision: str = "fp32",
                 cuda_graphs: bool | None = None, compile: bool = False, features: bool = False,
                 feature_map: bool = False) -> None:
        torch = _torch()
        if precision not in PRECISIONS:
            raise EngineError(f"unknown precision '{precision}': use {', '.join(PRECISIONS)}")
        self._torch = torch
        self.device = device
        self.precision = precision
        self.version = str(torch.__version__)
        on_gpu = device != "cpu"
        if on_gpu and not torch.cuda.is_available():
            raise DeviceError(f"torch cannot use CUDA on {device}; check nvidia-smi, or use --device cpu")
        self._device = torch.device("cuda", gpu_index(device)) if on_gpu else torch.device("cpu")
        self.threads = (threads or physical_cores()) if not on_gpu else None
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # process-wide: torch has no per-module thread count
        if precision == "tf32" and not on_gpu:
            raise EngineError("precision tf32 is a GPU's (tensor cores); on the CPU use fp32, bf16 or fp16")
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        # Channels-last: cuDNN's and oneDNN's depthwise and tensor-core kernels take NHWC without a transpose.
        self._format = torch.channels_last
        self._network = network.to(device=self._device, dtype=self._dtype, memory_format=self._format).eval()
        # What one pass computes: the logits, or (``features``, ``feature_map``) the logits and the pooled features
        # or the final feature map, as a tuple.
        if features and feature_map:
            raise EngineError("a torch engine gives the features or the feature map, not both")
        self.has_features = features
        self.has_feature_map = feature_map
        self._forward = (self._network.forward_with_features if features else
                         self._network.forward_with_feature_map if feature_map else self._network)
        if compile:
            if features or feature_map:
                raise EngineError("the torch engine compiles the network for benchmark only, not with features")
            self._forward = _compiled(torch, self._network, on_gpu)
        # CUDA graphs by default on a GPU; not on top of torch.compile, whose GPU mode captures its own.
        self._graphs_on = on_gpu and not compile and (cuda_graphs if cuda_graphs is not None else
                                                       os.environ.get("MIXNET_CUDA_GRAPHS", "1") != "0")
        self._graphs: dict[tuple[int, ...], tuple[Any, Any, Any, Any]] = {}
        self._lock = threading.Lock()
        parts = ["CUDA " + torch.cuda.get_device_name(self._device) if on_gpu else f"{self.threads} thread(s)",
                 precision, "channels-last"]
        if self._graphs_on:
            parts.append("CUDA graphs")
        if compile:
            parts.append("torch.compile")
        self.detail = f"torch {self.version}, " + ", ".join(parts)

    @contextlib.contextmanager
    def _arithmetic(self) -> Iterator[None]:
        """TF32 on only for ``tf32``: PyTorch's default allows it for convolutions, which costs fp32 its 1e-4.
        Set around each call and put back after, so that a program using mixnet keeps its own settings."""
        torch = self._torch
        tf32 = self.precision == "tf32"
        # PyTorch 2.9+ has per-backend fp32_precision settings, and raises when a program mixes them with the
        # older allow_tf32 flags: use the newer where it exists (saving and restoring through it keeps either
        # kind of the caller's own settings readable), the older elsewhere.
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            flags = [(conv, "fp32_precision", "tf32" if tf32 else "ieee"),
                     (torch.backends.cuda.matmul, "fp32_precision", "tf32" if tf32 else "ieee")]
        else:
            flags = [(torch.backends.cudnn, "allow_tf32", tf32), (torch.backends.cuda.matmul, "allow_tf32", tf32)]
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in flags]
        for owner, name, value in flags:
            setattr(owner, name, value)
        try:
            with torch.no_grad():
                yield
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)

    def _graph_for(self, shape: tuple[int, ...]) -> tuple[Any, Any, Any, Any]:
        """The CUDA graph of one forward pass at this input shape, with its pinned host buffer, input and
        output (captured on first use, after warm-up runs on a side stream, as PyTorch's documentation asks)."""
        entry = self._graphs.get(shape)
        if entry is not None:
            return entry
        torch = self._torch
        static_input = torch.zeros(shape, device=self._device, dtype=self._dtype).contiguous(
            memory_format=self._format)
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._forward(static_input)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self._forward(static_input)
        host = torch.empty(shape, dtype=torch.float32).pin_memory()
        entry = (graph, host, static_input, static_output)
        self._graphs[shape] = entry
        return entry

    def _outputs(self, batch: np.ndarray) -> tuple[Any, ...]:
        """The pass's outputs on ``batch``, as float32 NumPy arrays (logits first)."""
        torch = self._torch
        data = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        with self._lock, self._arithmetic():
            if self._graphs_on:
                graph, host, static_input, static_output = self._graph_for(tuple(data.shape))
                host.copy_(data)
                static_input.copy_(host, non_blocking=True)  # converts to the network's dtype on the GPU
                graph.replay()
                outputs = static_output
            else:
                x = data.to(self._device).to(self._dtype).contiguous(memory_format=self._format)
                outputs = self._forward(x)
            if not isinstance(outputs, tuple):
                outputs = (outputs,)
            return tuple(output.float().cpu().numpy() for output in outputs)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._outputs(batch)[0]

    def run_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (``N x classes``) and pooled features (``N x 1536``), float32, from one forward pass; for an
        engine made with ``features=True``."""
        if not self.has_features:
            raise EngineError("this engine was made without features; build it with features=True")
        logits, features = self._outputs(batch)
        return logits, features

    def run_with_feature_map(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (``N x classes``) and the final feature map (``N x 1536 x 7 x 7``), float32, from one forward
        pass; for an engine made with ``feature_map=True``."""
        if not self.has_feature_map:
            raise EngineError("this engine was made without the feature map; build it with feature_map=True")
        logits, feature_map = self._outputs(batch)
        return logits, feature_map


def _compiled(torch: Any, network: Any, on_gpu: bool) -> Any:
    """``torch.compile`` of the network, its caches under mixnet's cache (Inductor and Triton write to /tmp and
    ~/.triton otherwise), unless the user has pointed them elsewhere."""
    from ..base import cache

    root = cache.engine_home("torch")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineError(f"torch.compile needs a writable cache ({root}: {exc.strerror or exc})") from None
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    mode = "reduce-overhead" if on_gpu else None  # on a GPU: CUDA graphs of Inductor's own
    return torch.compile(network, mode=mode, dynamic=False, fullgraph=True)


def network_for(spec: ModelSpec, weights_path: Path) -> Any:
    """The float32 PyTorch network of these verified weights, on the CPU."""
    from ..network.architecture import architecture_for
    from ..weights.pdparams import read_state_dict
    from ..network.torch_network import build_network

    return build_network(architecture_for(spec), read_state_dict(weights_path))


def build_with_features(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice,
                        threads: int | None) -> Engine:
    """As :func:`build`, with ``run_with_features`` (logits and the pooled features from one pass)."""
    return build(spec, weights, choice, threads, features=True)


def build_with_feature_map(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice,
                           threads: int | None) -> Engine:
    """As :func:`build`, with ``run_with_feature_map`` (logits and the final feature map from one pass)."""
    return build(spec, weights, choice, threads, feature_map=True)


def build(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice, threads: int | None, *,
          features: bool = False, feature_map: bool = False) -> Engine:
    """PyTorch on the network built from these weights (a fifth of a second; nothing cached), in
    ``choice.precision``, compiled when ``choice.compiled``; in fp32 held to the reference logits (ONNX Runtime's on the CPU, on mixnet's graph) at each start. Raises
    :class:`~mixnet_cli.engines.base.EngineFailed` when torch itself cannot run it, :class:`DeviceError` when
    the GPU cannot be used."""
    from .conversion import ensure_converted, onnx_bytes, onnx_runtime_logits, reference_logits
    from .base import EngineFailed

    try:
        engine = TorchEngine(network_for(spec, weights.path), choice.device, threads, precision=choice.precision,
                             compile=choice.compiled, features=features, feature_map=feature_map)
        if choice.precision == "fp32":
            try:
                converted = ensure_converted(spec, weights.path, weights.record.sha256, "onnx")
                reference = reference_logits(spec, converted)
            except MixnetError:  # a read-only cache: the reference from the graph built in memory
                reference = onnx_runtime_logits(spec, onnx_bytes(spec, weights.path))
            check(engine, spec, reference, None, engine.version)
    except DeviceError:
        raise
    except EngineError as exc:
        raise EngineFailed(str(exc)) from None
    except RuntimeError as exc:  # torch's own errors (CUDA out of memory, a kernel it lacks)
        raise EngineFailed(f"torch cannot run {spec.name} on {choice.device} ({str(exc).splitlines()[0][:200]})") from None
    return engine

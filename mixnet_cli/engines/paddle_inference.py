"""The ``paddle`` engine: Paddle Inference (oneDNN on the CPU; CUDA, and TensorRT where paddle has it, on a GPU)
on a model of paddleclas's network saved with ``paddle.jit.save``. Needs the [paddle] extra."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..base.errors import DeviceError, EngineError
from ..base.manifest import ModelSpec
from .base import DeviceChoice, Engine, OneBatchAtATime, check, gpu_index, physical_cores

if TYPE_CHECKING:
    from .choice import EngineChoice
    from ..weights.store import VerifiedWeights


def paddle_cuda() -> tuple[bool, int]:
    """Whether paddle is built with CUDA, and how many GPUs it sees (imports paddle: about a second)."""
    from ..base.third_party import import_quietly

    paddle = import_quietly("paddle")
    compiled = bool(paddle.device.is_compiled_with_cuda())
    return compiled, (paddle.device.cuda.device_count() if compiled else 0)


def resolve_device(name: str, requested: str) -> DeviceChoice:
    """Device resolution for the paddle engines: a GPU that is not there is an error, never a fallback."""
    if name == "cpu":
        return DeviceChoice("cpu", "asked for the CPU")
    compiled, count = paddle_cuda()
    if name == "auto":
        if count > 0:
            return DeviceChoice("gpu:0", f"paddle has CUDA and sees {count} GPU(s)")
        why = "paddle is built without CUDA" if not compiled else "no GPU is visible to paddle"
        return DeviceChoice("cpu", why)
    index = gpu_index(name)
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


class PaddleInferenceEngine(OneBatchAtATime):
    """Paddle Inference on a ``paddle.jit.save`` model (``inference.json`` + ``inference.pdiparams``)."""

    name = "paddle"

    def __init__(self, program: Path, params: Path, device: str = "cpu", threads: int | None = None) -> None:
        from ..base.third_party import import_quietly

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
                config.enable_use_gpu(256, gpu_index(device))
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


def gpu_problem() -> str | None:
    """For ``auto``: why the paddle engines cannot drive a GPU here (None: they may), found without importing
    paddle, which takes a second: a CPU-only paddle, the usual case, cannot drive a GPU."""
    from ..base.third_party import distribution_installed, paddle_missing

    if not distribution_installed("paddlepaddle-gpu"):
        return "paddlepaddle-gpu is not installed"
    return paddle_missing()


def build(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice, threads: int | None) -> Engine:
    """Paddle Inference on a ``paddle.jit.save`` model of paddleclas's network (made once, in a child process),
    checked once per paddle version against that network's own logits."""
    from .conversion import engine_checked, ensure_converted, reference_logits

    converted = ensure_converted(spec, weights.path, weights.record.sha256, "paddle")
    program = converted.files.get("inference.json") or converted.file(".pdmodel")
    engine = PaddleInferenceEngine(program, converted.file(".pdiparams"), choice.device, threads)
    if not engine_checked(converted.directory, engine.name, engine.version):
        check(engine, spec, reference_logits(spec, converted), converted.directory, engine.version)
    return engine

"""The table of engines: what each is, what it needs, where it runs.

``--engine``'s help and check, the errors that say what to install, ``doctor`` and ``auto`` read this table;
:mod:`mixnet_cli.engine` builds them. Nothing here imports more than the standard library, so ``mixnet --help``
stays fast.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class EngineInfo:
    """What an engine is, for people and for checks: its name (what ``--engine`` takes), other names it
    answers to, the devices it runs on, what runs its model and how to install it."""

    name: str
    aliases: tuple[str, ...]
    devices: str
    summary: str
    install: str  # what to run when it is missing

    def missing(self) -> str | None:
        """What is not installed for this engine (None: it can run), found without importing anything."""
        if self.name in ("paddle", "dygraph"):
            from .imports import paddle_missing

            return paddle_missing()
        return None if _installed(self.name) else f"{self.name} ({self.install})"


ENGINES: dict[str, EngineInfo] = {
    "openvino": EngineInfo(
        "openvino", ("ov",), "cpu",
        "OpenVINO on mixnet's ONNX graph, f32: the fastest on the CPU (BENCHMARKS.md)", "pip install openvino"),
    "onnxruntime": EngineInfo(
        "onnxruntime", ("ort", "onnx"), "cpu, gpu (with onnxruntime-gpu)",
        "ONNX Runtime on the same graph; CUDA with onnxruntime-gpu", "pip install onnxruntime"),
    "paddle": EngineInfo(
        "paddle", ("paddle-inference",), "cpu, gpu (with paddlepaddle-gpu)",
        "Paddle Inference on a paddle.jit.save model of paddleclas's network (oneDNN on the CPU; CUDA, TensorRT)",
        'pip install "mixnet-cli[paddle]"'),
    "dygraph": EngineInfo(
        "dygraph", ("paddle-dygraph",), "cpu, gpu (with paddlepaddle-gpu)",
        "paddleclas's network run eagerly by paddle: the reference every other engine is checked against",
        'pip install "mixnet-cli[paddle]"'),
}
ENGINE_NAMES = ("auto",) + tuple(ENGINES)
_ENGINE_ALIASES = {alias: info.name for info in ENGINES.values() for alias in info.aliases}



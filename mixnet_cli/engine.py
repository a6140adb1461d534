"""Inference engines: something that turns a batch of preprocessed images into logits, on a chosen device.

Every engine takes an ``N x 3 x S x S`` float32 array and returns ``N x 1000`` float32 logits for the same
weights; :mod:`mixnet_cli.classifier` does the softmax and top-k, so engines can be compared value for value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import DeviceError, UsageError
from .manifest import ModelSpec

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|gpu|gpu:\d+)$")


class Engine(Protocol):
    name: str
    device: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a float32 ``N x 3 x S x S`` batch."""
        ...


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cpu" or "gpu:N"
    reason: str


def check_device_name(requested: str) -> str:
    name = requested.strip().lower()
    if not _DEVICE_PATTERN.match(name):
        raise UsageError(f"unknown device '{requested}': use auto, cpu, gpu or gpu:N (N a GPU index)")
    return name


def resolve_device(requested: str = "auto") -> DeviceChoice:
    """Map ``auto|cpu|gpu|gpu:N`` to a concrete device; a GPU that is not there is an error, never a fallback."""
    name = check_device_name(requested)
    if name == "cpu":
        return DeviceChoice("cpu", "asked for the CPU")
    from .model import import_quietly

    paddle = import_quietly("paddle")
    compiled = paddle.device.is_compiled_with_cuda()
    count = paddle.device.cuda.device_count() if compiled else 0
    if name == "auto":
        if count > 0:
            return DeviceChoice("gpu:0", f"paddle has CUDA and sees {count} GPU(s)")
        why = "paddle is built without CUDA" if not compiled else "no GPU is visible to paddle"
        return DeviceChoice("cpu", why)
    index = int(name.split(":", 1)[1]) if ":" in name else 0
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


class PaddleDygraphEngine:
    """The paddleclas network itself, run eagerly by paddle (the reference every other engine must match)."""

    name = "paddle-dygraph"

    def __init__(self, spec: ModelSpec, state: dict[str, np.ndarray], device: str) -> None:
        from .model import import_quietly, load_network

        self._paddle = import_quietly("paddle")
        self._paddle.set_device(device)
        self.device = device
        self._network = load_network(spec, state)

    def run(self, batch: np.ndarray) -> np.ndarray:
        paddle = self._paddle
        with paddle.no_grad():
            logits = self._network(paddle.to_tensor(np.ascontiguousarray(batch, dtype=np.float32)))
        return np.asarray(logits.numpy(), dtype=np.float32)


def create_engine(spec: ModelSpec, state: dict[str, np.ndarray], device: str) -> Engine:
    return PaddleDygraphEngine(spec, state, device)

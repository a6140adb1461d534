"""The ``dygraph`` engine: paddleclas's own network run eagerly by paddle, the reference every other engine is
checked against. Needs the [paddle] extra; its devices are paddle's."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..base.manifest import ModelSpec
from . import paddle_inference
from .base import Engine, OneBatchAtATime

if TYPE_CHECKING:
    from .choice import EngineChoice
    from ..weights.store import VerifiedWeights


class PaddleDygraphEngine(OneBatchAtATime):
    """The paddleclas network itself, run eagerly by paddle (the reference every other engine must match)."""

    name = "dygraph"

    def __init__(self, spec: ModelSpec, state: dict[str, np.ndarray], device: str, threads: int | None = None) -> None:
        from ..base.third_party import import_quietly
        from ..network.paddle_network import load_network

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


# The same devices as Paddle Inference: paddle's.
resolve_device = paddle_inference.resolve_device
gpu_problem = paddle_inference.gpu_problem


def build(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice, threads: int | None) -> Engine:
    """paddleclas's network with these weights, run eagerly: no conversion, nothing to check."""
    from ..weights.store import load_state

    return PaddleDygraphEngine(spec, load_state(weights), choice.device, threads)

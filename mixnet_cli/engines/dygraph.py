"""The ``dygraph`` engine: paddleclas's own network run eagerly by paddle, the reference every other engine is
checked against. Needs the [paddle] extra; its devices are paddle's."""

from __future__ import annotations

import threading
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
        # One pass at a time: the service runs class activation maps from several threads, and an eager paddle
        # network is not documented as safe to call from more than one.
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        paddle = self._paddle
        with self._lock, paddle.no_grad():
            logits = self._network(paddle.to_tensor(np.ascontiguousarray(batch, dtype=np.float32)))
        return np.asarray(logits.numpy(), dtype=np.float32)

    def run_with_feature_map(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (``N x classes``) and paddleclas's own final feature map (``N x 1536 x 7 x 7``: its
        ``final_block``'s output, before ``final_pool``), float32, from one pass through its layers in order."""
        paddle = self._paddle
        network = self._network
        with self._lock, paddle.no_grad():
            x = paddle.to_tensor(np.ascontiguousarray(batch, dtype=np.float32))
            feature_map = None
            for name, layer in network.features.named_children():
                if name == "final_pool":
                    feature_map = x
                x = layer(x)
            logits = network.output(x.reshape(shape=[x.shape[0], -1]))
        assert feature_map is not None, "paddleclas's MixNet ends its features with final_pool"
        return (np.asarray(logits.numpy(), dtype=np.float32),
                np.asarray(feature_map.numpy(), dtype=np.float32))


# The same devices as Paddle Inference: paddle's.
resolve_device = paddle_inference.resolve_device
gpu_problem = paddle_inference.gpu_problem


def build(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice, threads: int | None) -> Engine:
    """paddleclas's network with these weights, run eagerly: no conversion, nothing to check."""
    from ..weights.store import load_state

    return PaddleDygraphEngine(spec, load_state(weights), choice.device, threads)


def build_with_feature_map(spec: ModelSpec, weights: "VerifiedWeights", choice: EngineChoice,
                           threads: int | None) -> Engine:
    """The same engine: paddleclas's network gives its feature map on request (``run_with_feature_map``)."""
    return build(spec, weights, choice, threads)

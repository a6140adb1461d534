"""The MixNet network from paddleclas, and loading a state dict into it only when it fits exactly.

paddle and paddleclas are imported inside these functions: they take seconds to import and are not needed to
print help, list models or manage the cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import WeightsError
from .imports import import_quietly
from .manifest import ModelSpec

if TYPE_CHECKING:
    import paddle


def build_network(spec: ModelSpec) -> "paddle.nn.Layer":
    """A freshly initialised network of ``spec``'s architecture (``module:function`` in the manifest)."""
    module_name, function_name = spec.architecture.split(":", 1)
    module = import_quietly(module_name)
    return getattr(module, function_name)(pretrained=False, class_num=1000)


def expected_shapes(network: "paddle.nn.Layer") -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(d) for d in tensor.shape) for name, tensor in network.state_dict().items()}


def check_state_dict(spec: ModelSpec, state: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> None:
    """Every key the architecture has is present with its exact shape, and there is nothing else.

    Raises :class:`WeightsError` with a message fragment saying what does not fit; the caller adds which file.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        key for key in set(expected) & set(state) if tuple(state[key].shape) != expected[key]
    )
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameters missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown parameters (e.g. {unexpected[0]})")
    if wrong:
        key = wrong[0]
        problems.append(
            f"{len(wrong)} of the wrong shape (e.g. {key}: {tuple(state[key].shape)}, expected {expected[key]})"
        )
    raise WeightsError(f"does not hold {spec.name} weights: " + "; ".join(problems))


def load_network(spec: ModelSpec, state: dict[str, np.ndarray]) -> "paddle.nn.Layer":
    """Build the network, check ``state`` against it and load it; returns the network in eval mode."""
    network = build_network(spec)
    check_state_dict(spec, state, expected_shapes(network))
    floats = {key: value.astype(np.float32, copy=False) for key, value in state.items()}
    network.set_state_dict(floats)
    network.eval()
    return network

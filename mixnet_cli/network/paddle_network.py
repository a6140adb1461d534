"""The MixNet network from paddleclas (the reference), loaded with a state dict only when it fits exactly.

paddle and paddleclas are imported inside these functions: they take seconds to import and are not needed to
print help, list models or manage the cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..base.third_party import import_quietly
from ..base.manifest import ModelSpec

if TYPE_CHECKING:
    import paddle


def build_network(spec: ModelSpec) -> "paddle.nn.Layer":
    """A freshly initialised paddleclas network of ``spec``'s architecture (``architecture.paddleclas`` in the manifest)."""
    module_name, function_name = spec.architecture.paddleclas.split(":", 1)
    module = import_quietly(module_name)
    return getattr(module, function_name)(pretrained=False, class_num=spec.num_classes)


def load_network(spec: ModelSpec, state: dict[str, np.ndarray]) -> "paddle.nn.Layer":
    """Build the network, check ``state`` against it and load it; returns the network in eval mode."""
    from .architecture import architecture_for

    architecture_for(spec).check_state_dict(state)
    network = build_network(spec)
    floats = {key: value.astype(np.float32, copy=False) for key, value in state.items()}
    network.set_state_dict(floats)
    network.eval()
    return network

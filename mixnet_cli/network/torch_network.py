"""The MixNet network as PyTorch modules, built from the architecture description and a verified state dict.

This is the ONNX graph of :mod:`mixnet_cli.network.onnx_graph` written as ``torch.nn`` modules, layer for layer and in
the same form (the same :func:`~mixnet_cli.network.onnx_graph.conv_plan`): mixed depthwise convolutions merged into one
with zero-padded kernels, mixed 1x1 convolutions as one grouped convolution, and batch norm folded into the
convolution before it (one kernel less per layer on a GPU; the same function up to float32 rounding). No paddle
and no ONNX is involved; the engine in :mod:`mixnet_cli.engines.pytorch` runs it, on the CPU or with CUDA.

The module takes ``x`` (``N x 3 x S x S`` normalised pixels) and returns ``N x classes`` logits, no softmax,
like paddleclas's dygraph network. It imports torch: only the PyTorch engine imports this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from .architecture import POOL_SIZE, Architecture, ConvBN, SqueezeExcite
from .onnx_graph import GraphForm, batch_norm_scale_shift, conv_plan

# Batch norm folded: on a GPU every layer is a kernel launch, and folding removes a third of them.
TORCH_FORM = GraphForm(merge_depthwise=True, group_pointwise=True, fold_batch_norm=True)


def _activation(kind: str | None, x: torch.Tensor) -> torch.Tensor:
    if kind is None:
        return x
    if kind == "relu":
        return functional.relu(x)
    if kind == "swish":
        return functional.silu(x)  # x * sigmoid(x), as paddleclas's Swish
    raise ValueError(f"unknown activation {kind!r}")


def _tensor(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


class ConvBNModule(nn.Module):
    """A :class:`ConvBN` layer: its convolution(s) with batch norm folded in, then its activation."""

    def __init__(self, layer: ConvBN, state: dict[str, np.ndarray]) -> None:
        super().__init__()
        param = lambda key: np.asarray(state[key], dtype=np.float32)  # noqa: E731
        plan = conv_plan(layer, [param(name) for name in layer.conv_weight_names()], TORCH_FORM)
        scale, shift = batch_norm_scale_shift(*(param(layer.bn_name(field))
                                                for field in ("weight", "bias", "_mean", "_variance")))
        self.activation = layer.activation
        self.splits = list(plan.splits) if plan.splits is not None else None
        self.convolutions = nn.ModuleList()
        start = 0
        for weight, groups, kernel in plan.convolutions:
            count = weight.shape[0]
            conv = nn.Conv2d(weight.shape[1] * groups, count, kernel, stride=layer.stride, padding=(kernel - 1) // 2,
                             groups=groups, bias=True)
            with torch.no_grad():
                conv.weight.copy_(_tensor(weight * scale[start:start + count].reshape(-1, 1, 1, 1)))
                conv.bias.copy_(_tensor(shift[start:start + count]))
            self.convolutions.append(conv)
            start += count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.splits is None:
            y = self.convolutions[0](x)
        else:
            parts = torch.split(x, self.splits, dim=1)
            y = torch.cat([conv(part) for conv, part in zip(self.convolutions, parts)], dim=1)
        return _activation(self.activation, y)


class SqueezeExciteModule(nn.Module):
    """Global average pool, 1x1 convolution with bias, activation, 1x1 with bias, sigmoid, multiply."""

    def __init__(self, se: SqueezeExcite, state: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.activation = se.activation
        self.reduce = nn.Conv2d(se.channels, se.mid_channels, 1)
        self.expand = nn.Conv2d(se.mid_channels, se.channels, 1)
        with torch.no_grad():
            for conv, name in ((self.reduce, "conv1"), (self.expand, "conv2")):
                conv.weight.copy_(_tensor(state[f"{se.prefix}.{name}.weight"]))
                conv.bias.copy_(_tensor(state[f"{se.prefix}.{name}.bias"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = functional.adaptive_avg_pool2d(x, 1)
        gate = self.expand(_activation(self.activation, self.reduce(pooled)))
        return x * torch.sigmoid(gate)


class UnitModule(nn.Module):
    """One MixNet unit: its layers in order, and the residual add when the shape allows."""

    def __init__(self, layers: list[nn.Module], residual: bool) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return y + x if self.residual else y


class MixNet(nn.Module):
    """The whole network; ``forward`` gives logits, ``features`` the pooled ``N x 1536`` vector before the
    classifier, ``forward_with_feature_map`` the logits and the final feature map."""

    def __init__(self, architecture: Architecture, state: dict[str, np.ndarray]) -> None:
        super().__init__()
        units: list[nn.Module] = [ConvBNModule(architecture.stem, state)]
        for unit in architecture.units:
            layers: list[nn.Module] = [SqueezeExciteModule(layer, state) if isinstance(layer, SqueezeExcite)
                                       else ConvBNModule(layer, state) for layer in unit.layers()]
            units.append(UnitModule(layers, unit.residual))
        units.append(ConvBNModule(architecture.final, state))
        self.body = nn.Sequential(*units)
        weight = np.asarray(state[architecture.classifier_weight], dtype=np.float32)  # [in, out], paddle's layout
        self.classifier = nn.Linear(weight.shape[0], weight.shape[1])
        with torch.no_grad():
            self.classifier.weight.copy_(_tensor(weight.T))
            self.classifier.bias.copy_(_tensor(state[architecture.classifier_bias]))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(self.body(x))

    @staticmethod
    def _pool(feature_map: torch.Tensor) -> torch.Tensor:
        return torch.flatten(functional.avg_pool2d(feature_map, POOL_SIZE, stride=1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the pooled features they were computed from, from one pass."""
        features = self.features(x)
        return self.classifier(features), features

    def forward_with_feature_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the final ``N x 1536 x 7 x 7`` feature map they were pooled from (after the last 1x1
        convolution, batch norm and ReLU), from one pass: the input of class activation maps."""
        feature_map = self.body(x)
        return self.classifier(self._pool(feature_map)), feature_map


def build_network(architecture: Architecture, state: dict[str, Any]) -> MixNet:
    """``architecture`` as a float32 ``torch.nn.Module`` on the CPU, in eval mode, with the parameters in
    ``state`` (names and shapes checked first). Raises :class:`~mixnet_cli.base.errors.WeightsError` when ``state``
    does not hold this architecture's parameters."""
    architecture.check_state_dict(state)
    return MixNet(architecture, state).eval()

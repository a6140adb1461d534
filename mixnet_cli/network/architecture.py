"""The MixNet architecture as data: every layer of MixNet_S, M and L, with its state-dict names and shapes.

This is the one description of the network in mixnet-cli. The ONNX graph (:mod:`mixnet_cli.network.onnx_graph`), the
check that a weights file holds the right parameters, and the parameter and FLOP counts are all read from it;
no paddle is needed. It transcribes PaddleClas 2.6.0's ``ppcls/arch/backbone/model_zoo/mixnet.py``
(``get_mixnet``, ``MixNet``, ``MixUnit``, ``MixConv``), itself after the paper (arXiv 1907.09595):

* stem: 3x3 convolution, stride 2, padding 1, batch norm, ReLU; then an unexpanded unit (3x3 depthwise, 1x1);
* a unit: optional 1x1 expansion (batch norm, activation), a mixed depthwise convolution (kernels 3, 5, 7...,
  padding ``(k - 1) / 2``, symmetric even at stride 2), batch norm, activation, squeeze-and-excite, a 1x1
  projection with batch norm, and a residual add when the shape allows (no activation after it);
* "mixed" 1x1 convolutions split their channels into equal groups, each with its own dense 1x1 kernel;
* channel splits give ``C // k`` to each part and the remainder to the first (3x3) part;
* ReLU in the stem and stage 1, Swish (``x * sigmoid(x)``) in stages 2 to 4, ReLU after the final 1x1
  convolution to 1536 channels, a 7x7 average pool, then a linear classifier stored as ``[in, out]``;
* stage 4 has its stride-2 unit in the middle; batch-norm epsilon is 1e-5; only the squeeze-and-excite
  convolutions and the classifier have biases.

Which block table and width a model uses is in the weights manifest (``architecture``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ..base.errors import ManifestError, WeightsError

if TYPE_CHECKING:
    from ..base.manifest import ModelSpec

BN_EPSILON = 1e-5
FINAL_CHANNELS = 1536
POOL_SIZE = 7  # the final average pool's window: the feature map of a 224 x 224 input

# PaddleClas get_mixnet's tables, per stage then per unit: output channels, and for each unit the kernel counts
# of the expansion (1x1), depthwise and projection (1x1) convolutions, the expansion factor and the
# squeeze-and-excite reduction (0: none). MixNet_L is the "m" table at width 1.3.
_BLOCK_TABLES: dict[str, dict[str, object]] = {
    "s": {
        "stem_channels": 16,
        "channels": [[24, 24], [40, 40, 40, 40], [80, 80, 80], [120, 120, 120, 200, 200, 200]],
        "exp_kernel_counts": [[2, 2], [1, 2, 2, 2], [1, 1, 1], [2, 2, 2, 1, 1, 1]],
        "dw_kernel_counts": [[1, 1], [3, 2, 2, 2], [3, 2, 2], [3, 4, 4, 5, 4, 4]],
        "proj_kernel_counts": [[2, 2], [1, 2, 2, 2], [2, 2, 2], [2, 2, 2, 1, 2, 2]],
        "exp_factors": [[6, 3], [6, 6, 6, 6], [6, 6, 6], [6, 3, 3, 6, 6, 6]],
        "se_factors": [[0, 0], [2, 2, 2, 2], [4, 4, 4], [2, 2, 2, 2, 2, 2]],
    },
    "m": {
        "stem_channels": 24,
        "channels": [[32, 32], [40, 40, 40, 40], [80, 80, 80, 80], [120, 120, 120, 120, 200, 200, 200, 200]],
        "exp_kernel_counts": [[2, 2], [1, 2, 2, 2], [1, 2, 2, 2], [1, 2, 2, 2, 1, 1, 1, 1]],
        "dw_kernel_counts": [[3, 1], [4, 2, 2, 2], [3, 4, 4, 4], [1, 4, 4, 4, 4, 4, 4, 4]],
        "proj_kernel_counts": [[2, 2], [1, 2, 2, 2], [1, 2, 2, 2], [1, 2, 2, 2, 1, 2, 2, 2]],
        "exp_factors": [[6, 3], [6, 6, 6, 6], [6, 6, 6, 6], [6, 3, 3, 3, 6, 6, 6, 6]],
        "se_factors": [[0, 0], [2, 2, 2, 2], [4, 4, 4, 4], [2, 2, 2, 2, 2, 2, 2, 2]],
    },
}
BLOCK_TABLES = tuple(_BLOCK_TABLES)


def round_channels(channels: float, divisor: int = 8) -> int:
    """PaddleClas's ``round_channels``: the nearest multiple of ``divisor``, never below 90% of ``channels``."""
    rounded = max(int(channels + divisor / 2.0) // divisor * divisor, divisor)
    if float(rounded) < 0.9 * channels:
        rounded += divisor
    return rounded


def split_channels(channels: int, parts: int) -> tuple[int, ...]:
    """``channels // parts`` each, the remainder to the first part (PaddleClas's ``MixConv.split_channels``)."""
    split = [channels // parts] * parts
    split[0] += channels - sum(split)
    return tuple(split)


@dataclass(frozen=True)
class ConvBN:
    """A convolution (possibly split into parts along the channels) followed by batch norm.

    ``prefix`` names its parameters: ``{prefix}.conv.weight`` (or ``{prefix}.conv.{i}.weight`` per part when
    ``mixed``) and ``{prefix}.bn.weight|bias|_mean|_variance``. ``kernels`` has one kernel size per part;
    ``depthwise`` convolutions have one filter per channel. ``activation`` is ``relu``, ``swish`` or None.
    """

    prefix: str
    in_channels: int
    out_channels: int
    kernels: tuple[int, ...]
    stride: int
    depthwise: bool
    mixed: bool  # PaddleClas's MixConvBlock (parts named conv.0, conv.1...) rather than ConvBlock
    activation: str | None

    @property
    def in_splits(self) -> tuple[int, ...]:
        return split_channels(self.in_channels, len(self.kernels))

    @property
    def out_splits(self) -> tuple[int, ...]:
        return split_channels(self.out_channels, len(self.kernels))

    def conv_weight_names(self) -> list[str]:
        if not self.mixed:
            return [f"{self.prefix}.conv.weight"]
        return [f"{self.prefix}.conv.{i}.weight" for i in range(len(self.kernels))]

    def bn_name(self, field: str) -> str:
        return f"{self.prefix}.bn.{field}"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for name, k, cin, cout in zip(self.conv_weight_names(), self.kernels, self.in_splits, self.out_splits):
            shapes[name] = (cout, 1 if self.depthwise else cin, k, k)
        for field in ("weight", "bias", "_mean", "_variance"):
            shapes[self.bn_name(field)] = (self.out_channels,)
        return shapes


@dataclass(frozen=True)
class SqueezeExcite:
    """Global average pool, 1x1 convolution with bias, the unit's activation, 1x1 with bias, sigmoid, multiply."""

    prefix: str
    channels: int
    mid_channels: int
    activation: str

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            f"{self.prefix}.conv1.weight": (self.mid_channels, self.channels, 1, 1),
            f"{self.prefix}.conv1.bias": (self.mid_channels,),
            f"{self.prefix}.conv2.weight": (self.channels, self.mid_channels, 1, 1),
            f"{self.prefix}.conv2.bias": (self.channels,),
        }


@dataclass(frozen=True)
class Unit:
    """One MixNet unit: ``expand`` (or None), ``depthwise``, ``se`` (or None), ``project``; ``residual`` adds
    the unit's input to its output."""

    prefix: str
    expand: ConvBN | None
    depthwise: ConvBN
    se: SqueezeExcite | None
    project: ConvBN
    residual: bool

    def layers(self) -> list[ConvBN | SqueezeExcite]:
        found: list[ConvBN | SqueezeExcite | None] = [self.expand, self.depthwise, self.se, self.project]
        return [layer for layer in found if layer is not None]


@dataclass(frozen=True)
class Architecture:
    """A whole MixNet: stem, units, final 1x1 block, 7x7 average pool and a linear ``classifier``."""

    name: str
    stem: ConvBN
    units: tuple[Unit, ...]
    final: ConvBN
    num_classes: int
    classifier_weight: str = "output.weight"  # [in, out], paddle's Linear layout
    classifier_bias: str = "output.bias"

    def conv_layers(self) -> list[ConvBN]:
        layers = [self.stem]
        for unit in self.units:
            layers += [layer for layer in unit.layers() if isinstance(layer, ConvBN)]
        return layers + [self.final]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter the weights file must hold, by state-dict name, with its shape (float32)."""
        shapes = dict(self.stem.shapes())
        for unit in self.units:
            for layer in unit.layers():
                shapes.update(layer.shapes())
        shapes.update(self.final.shapes())
        shapes[self.classifier_weight] = (self.final.out_channels, self.num_classes)
        shapes[self.classifier_bias] = (self.num_classes,)
        return shapes

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Every parameter the architecture has is present with its exact shape, and there is nothing else.

        Raises :class:`WeightsError` with a message fragment saying what does not fit; the caller adds which file.
        """
        expected = self.shapes()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(key for key in set(expected) & set(state) if tuple(state[key].shape) != expected[key])
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
        raise WeightsError(f"does not hold {self.name} weights: " + "; ".join(problems))

    def parameter_count(self) -> int:
        """Numbers in the state dict, batch-norm statistics included, as ``paddle``'s ``parameters()`` counts."""
        total = 0
        for shape in self.shapes().values():
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total

    def flops(self, size: int = 224) -> int:
        """Operations of one forward pass on a ``size x size`` image, counted by ``paddle.flops``'s rules
        (paddle/hapi/dynamic_flops.py), so the figure is the one PaddleClas publishes: a convolution costs
        ``outputs x (inputs per group x kernel area + bias)``, a batch norm 2 per element, an adaptive average
        pool ``(window + 1)`` per output, the final pool 1 per output, the classifier ``in x out``; ReLU,
        Swish, sigmoid, multiplications and additions count 0."""
        total = 0

        def conv(layer: ConvBN, spatial_in: int) -> tuple[int, int]:
            out_spatial = (spatial_in - 1) // layer.stride + 1
            ops = 0
            for k, cin, cout in zip(layer.kernels, layer.in_splits, layer.out_splits):
                ops += cout * out_spatial * out_spatial * k * k * (1 if layer.depthwise else cin)
            return ops + 2 * layer.out_channels * out_spatial * out_spatial, out_spatial

        ops, spatial = conv(self.stem, size)
        total += ops
        for unit in self.units:
            for layer in unit.layers():
                if isinstance(layer, SqueezeExcite):
                    total += layer.channels * (spatial * spatial + 1)  # the pool
                    total += layer.mid_channels * (layer.channels + 1) + layer.channels * (layer.mid_channels + 1)
                else:
                    ops, spatial = conv(layer, spatial)
                    total += ops
        ops, spatial = conv(self.final, spatial)
        pooled = spatial - POOL_SIZE + 1
        total += ops + self.final.out_channels * pooled * pooled
        total += self.final.out_channels * pooled * pooled * self.num_classes
        return total


def _conv_bn(prefix: str, cin: int, cout: int, kernel_count: int, *, depthwise: bool, stride: int,
             activation: str | None, first_kernel: int) -> ConvBN:
    kernels = tuple(first_kernel + 2 * i for i in range(kernel_count)) if first_kernel > 1 else (1,) * kernel_count
    return ConvBN(prefix, cin, cout, kernels, stride, depthwise, kernel_count > 1, activation)


def _unit(prefix: str, cin: int, cout: int, stride: int, exp_kernel_count: int, dw_kernel_count: int,
          proj_kernel_count: int, exp_factor: int, se_factor: int, activation: str) -> Unit:
    mid = exp_factor * cin
    expand = None
    if exp_factor > 1:
        expand = _conv_bn(f"{prefix}.exp_conv", cin, mid, exp_kernel_count, depthwise=False, stride=1,
                          activation=activation, first_kernel=1)
    depthwise = _conv_bn(f"{prefix}.conv1", mid, mid, dw_kernel_count, depthwise=True, stride=stride,
                         activation=activation, first_kernel=3)
    se = None
    if se_factor > 0:
        se = SqueezeExcite(f"{prefix}.se", mid, mid // (exp_factor * se_factor), activation)
    project = _conv_bn(f"{prefix}.conv2", mid, cout, proj_kernel_count, depthwise=False, stride=1,
                       activation=None, first_kernel=1)
    return Unit(prefix, expand, depthwise, se, project, residual=cin == cout and stride == 1)


def build_architecture(name: str, blocks: str, width_scale: float, num_classes: int = 1000) -> Architecture:
    """The layers of a MixNet with block table ``blocks`` (``s`` or ``m``) at ``width_scale``.

    Raises :class:`ManifestError` for an unknown block table.
    """
    try:
        table = _BLOCK_TABLES[blocks]
    except KeyError:
        raise ManifestError(f"unknown MixNet block table '{blocks}' (known: {', '.join(BLOCK_TABLES)})") from None
    channels: list[list[int]] = table["channels"]  # type: ignore[assignment]
    stem_channels: int = table["stem_channels"]  # type: ignore[assignment]
    if width_scale != 1.0:
        channels = [[round_channels(c * width_scale) for c in stage] for stage in channels]
        stem_channels = round_channels(stem_channels * width_scale)
    stem = _conv_bn("features.init_block.conv1", 3, stem_channels, 1, depthwise=False, stride=2,
                    activation="relu", first_kernel=3)
    units = [_unit("features.init_block.conv2", stem_channels, stem_channels, 1, 1, 1, 1, 1, 0, "relu")]
    cin = stem_channels
    for i, stage in enumerate(channels):
        for j, cout in enumerate(stage):
            # Stride 2 opens stages 1-3; stage 4 has it in the middle (PaddleClas's MixNet.__init__).
            stride = 2 if (j == 0 and i != 3) or (j == len(stage) // 2 and i == 3) else 1
            units.append(_unit(
                f"features.stage{i + 1}.unit{j + 1}", cin, cout, stride,
                table["exp_kernel_counts"][i][j],  # type: ignore[index]
                table["dw_kernel_counts"][i][j],  # type: ignore[index]
                table["proj_kernel_counts"][i][j],  # type: ignore[index]
                table["exp_factors"][i][j],  # type: ignore[index]
                table["se_factors"][i][j],  # type: ignore[index]
                "relu" if i == 0 else "swish",
            ))
            cin = cout
    final = _conv_bn("features.final_block", cin, FINAL_CHANNELS, 1, depthwise=False, stride=1,
                     activation="relu", first_kernel=1)
    return Architecture(name, stem, tuple(units), final, num_classes)


def architecture_for(spec: "ModelSpec") -> Architecture:
    """The architecture of ``spec``: its manifest entry's blocks and width, with ``spec.num_classes`` classes (a
    fine-tuned file's own count)."""
    return _cached_architecture(spec.name, spec.architecture.blocks, spec.architecture.width_scale, spec.num_classes)


@lru_cache(maxsize=None)
def _cached_architecture(name: str, blocks: str, width_scale: float, num_classes: int) -> Architecture:
    return build_architecture(name, blocks, width_scale, num_classes)


@lru_cache(maxsize=None)
def architecture_of(model_name: str) -> Architecture:
    """The architecture of a model in the manifest (``MixNet_S``...). Raises :class:`ManifestError`."""
    from ..base.manifest import load_manifest

    try:
        spec = load_manifest().models[model_name]
    except KeyError:
        raise ManifestError(f"no model named {model_name} in the weights manifest") from None
    return build_architecture(spec.name, spec.architecture.blocks, spec.architecture.width_scale,
                              load_manifest().labels.num_classes)

"""The MixNet network as an ONNX graph, written straight from a verified state dict with the ``onnx`` package.

No paddle is involved: the layers come from :mod:`mixnet_cli.network.architecture`, the numbers from the weights file.
The graph takes ``x`` (float32, ``N x 3 x 224 x 224``, normalised pixels) and gives ``logits`` (float32,
``N x 1000``, no softmax), like PaddleClas's dygraph network.

The same network can be written in several equivalent forms; :class:`GraphForm` chooses. Each form computes the
same function up to float32 rounding (tests hold all of them to paddleclas's network). The default is the
fastest form measured on OpenVINO and ONNX Runtime (BENCHMARKS.md, "Graph form" and "Closer to the compute
floor").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .architecture import BN_EPSILON, POOL_SIZE, Architecture, ConvBN, SqueezeExcite

if TYPE_CHECKING:
    import onnx

INPUT_NAME = "x"
OUTPUT_NAME = "logits"
# The pooled features the classifier reads (N x 1536): a second output, only in models built with features=True.
FEATURES_NAME = "features"
# The final feature map (N x 1536 x 7 x 7, after the last 1x1 convolution, batch norm and ReLU, before the pool):
# another output, only in models built with feature_map=True, for class activation maps.
FEATURE_MAP_NAME = "feature_map"
BATCH_DIM = "N"
# Opset 13 runs on every ONNX Runtime since 1.6 and every OpenVINO release since 2021, and has every operator
# this graph needs.
OPSET = 13


# ``GraphForm(dense_pointwise_below=EVERY_GROUP)``: every mixed 1x1 layer as one dense convolution.
EVERY_GROUP = 1 << 30


@dataclass(frozen=True)
class GraphForm:
    """How the graph is written (all forms compute the same network).

    ``merge_depthwise``: one depthwise convolution per mixed depthwise layer, each channel's kernel zero-padded
    (centred) to the largest size, instead of split, one convolution per kernel size, concat.
    ``group_pointwise``: a mixed 1x1 layer as one grouped convolution instead of split, convolutions, concat.
    ``fold_batch_norm``: batch norm folded into the convolution's weights and a bias, instead of a
    BatchNormalization node.
    ``dense_pointwise_below``: a mixed 1x1 layer whose groups each take fewer input channels than this runs as one
    ordinary convolution whose weight is block-diagonal (zeros between the groups), instead of grouped or split
    (0: never).
    """

    merge_depthwise: bool = True
    group_pointwise: bool = True
    fold_batch_norm: bool = False
    dense_pointwise_below: int = 0

    @property
    def label(self) -> str:
        pointwise = "grouped" if self.group_pointwise else "split"
        if self.dense_pointwise_below >= EVERY_GROUP:
            pointwise = "dense"
        elif self.dense_pointwise_below:
            pointwise += f" (dense under {self.dense_pointwise_below} inputs a group)"
        return (f"depthwise {'merged' if self.merge_depthwise else 'split'}, "
                f"1x1 {pointwise}, "
                f"batch norm {'folded' if self.fold_batch_norm else 'kept'}")


# Narrow groups as dense convolutions: grouped 1x1 convolutions with under 16 inputs a group fall off both
# engines' blocked (AVX-512) kernels, and in ONNX Runtime cost a layout conversion on each side; the dense form
# costs twice their multiply-adds (of the network's smallest layers) and gives the same logits bit for bit (the
# zeros add exactly). ONNX Runtime 0.84-0.95x the time for MixNet_S and M, OpenVINO unchanged (BENCHMARKS.md,
# "Closer to the compute floor"); MixNet_L has no such layer. Batch norm stays a node: folding it here was no
# faster (both engines fold it when they load the model) and rounds differently.
DEFAULT_FORM = GraphForm(dense_pointwise_below=16)


class _Graph:
    """Collects nodes and initializers, naming every value uniquely."""

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        from onnx import helper

        self._helper = helper
        self._state = state
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def param(self, key: str) -> np.ndarray:
        return np.asarray(self._state[key], dtype=np.float32)

    def node(self, op: str, inputs: list[str], hint: str, **attributes: Any) -> str:
        output = self.fresh(hint)
        self.nodes.append(self._helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def activation(self, x: str, kind: str | None, hint: str) -> str:
        if kind is None:
            return x
        if kind == "relu":
            return self.node("Relu", [x], f"{hint}.relu")
        if kind == "swish":
            # x * sigmoid(x): both engines recognise the pattern and run it as one Swish.
            gate = self.node("Sigmoid", [x], f"{hint}.sigmoid")
            return self.node("Mul", [x, gate], f"{hint}.swish")
        raise ValueError(f"unknown activation {kind!r}")


def _padded_kernel(weight: np.ndarray, size: int) -> np.ndarray:
    """A ``C x 1 x k x k`` depthwise kernel centred in a ``size x size`` window of zeros."""
    k = weight.shape[-1]
    offset = (size - k) // 2
    padded = np.zeros(weight.shape[:2] + (size, size), dtype=np.float32)
    padded[:, :, offset:offset + k, offset:offset + k] = weight
    return padded


def _block_diagonal(kernels: list[np.ndarray]) -> np.ndarray:
    """The ``out x in x 1 x 1`` kernel of one convolution that does what ``kernels`` (one per group) do on
    consecutive slices of the input: each group's kernel on the diagonal, zeros elsewhere."""
    rows = sum(w.shape[0] for w in kernels)
    columns = sum(w.shape[1] for w in kernels)
    dense = np.zeros((rows, columns) + kernels[0].shape[2:], dtype=np.float32)
    row = column = 0
    for w in kernels:
        dense[row:row + w.shape[0], column:column + w.shape[1]] = w
        row += w.shape[0]
        column += w.shape[1]
    return dense


@dataclass(frozen=True)
class ConvPlan:
    """How one :class:`ConvBN` layer runs as convolutions in a :class:`GraphForm`: ``convolutions`` holds
    ``(weight, groups, kernel size)`` for each convolution; ``splits`` the input channels each takes, when the
    input is split between them (None: one convolution on the whole input). Shared by every backend that builds
    the network from the architecture (ONNX here, PyTorch in :mod:`mixnet_cli.network.torch_network`)."""

    convolutions: list[tuple[np.ndarray, int, int]]
    splits: tuple[int, ...] | None


def conv_plan(layer: ConvBN, kernels: list[np.ndarray], form: GraphForm) -> ConvPlan:
    """The convolutions of ``layer`` (its float32 kernels in :meth:`ConvBN.conv_weight_names` order) in ``form``."""
    parts = len(kernels)
    equal_splits = len(set(layer.in_splits)) == 1 and len(set(layer.out_splits)) == 1
    if parts == 1:
        return ConvPlan([(kernels[0], layer.out_channels if layer.depthwise else 1, layer.kernels[0])], None)
    if layer.depthwise and form.merge_depthwise:
        size = max(layer.kernels)
        return ConvPlan([(np.concatenate([_padded_kernel(w, size) for w in kernels]), layer.out_channels, size)], None)
    if not layer.depthwise and max(layer.in_splits) < form.dense_pointwise_below:
        return ConvPlan([(_block_diagonal(kernels), 1, 1)], None)
    if not layer.depthwise and form.group_pointwise and equal_splits:
        return ConvPlan([(np.concatenate(kernels), parts, 1)], None)
    return ConvPlan([(w, w.shape[0] if layer.depthwise else 1, k) for w, k in zip(kernels, layer.kernels)],
                    layer.in_splits)


def batch_norm_scale_shift(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray,
                           var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batch norm as ``y * scale + shift`` (float32), for folding it into the convolution before it."""
    scale = gamma / np.sqrt(var.astype(np.float64) + BN_EPSILON).astype(np.float32)
    return scale, beta - mean * scale


def _conv_bn(graph: _Graph, x: str, layer: ConvBN, form: GraphForm) -> str:
    kernels = [graph.param(name) for name in layer.conv_weight_names()]
    gamma = graph.param(layer.bn_name("weight"))
    beta = graph.param(layer.bn_name("bias"))
    mean = graph.param(layer.bn_name("_mean"))
    var = graph.param(layer.bn_name("_variance"))
    planned = conv_plan(layer, kernels, form)
    plan = planned.convolutions
    merged = planned.splits is None
    parts = len(plan)

    if form.fold_batch_norm:
        scale, shift = batch_norm_scale_shift(gamma, beta, mean, var)
    outputs = []
    if merged:
        inputs = [x]
    else:
        split = graph.constant(graph.fresh(f"{layer.prefix}.split_sizes"), np.array(planned.splits, dtype=np.int64))
        outs = [graph.fresh(f"{layer.prefix}.part") for _ in range(parts)]
        graph.nodes.append(graph._helper.make_node("Split", [x, split], outs, name=graph.fresh(f"{layer.prefix}.split"), axis=1))
        inputs = outs
    start = 0
    for x_part, (weight, group, k) in zip(inputs, plan):
        count = weight.shape[0]
        conv_inputs = [x_part]
        if form.fold_batch_norm:
            scaled = weight * scale[start:start + count].reshape(-1, 1, 1, 1)
            conv_inputs.append(graph.constant(graph.fresh(f"{layer.prefix}.conv.weight"), scaled.astype(np.float32)))
            conv_inputs.append(graph.constant(graph.fresh(f"{layer.prefix}.conv.bias"),
                                              shift[start:start + count].astype(np.float32)))
        else:
            conv_inputs.append(graph.constant(graph.fresh(f"{layer.prefix}.conv.weight"), weight))
        pad = (k - 1) // 2
        outputs.append(graph.node("Conv", conv_inputs, f"{layer.prefix}.conv", group=group, kernel_shape=[k, k],
                                  pads=[pad] * 4, strides=[layer.stride] * 2))
        start += count
    y = outputs[0] if len(outputs) == 1 else graph.node("Concat", outputs, f"{layer.prefix}.concat", axis=1)
    if not form.fold_batch_norm:
        bn_inputs = [y] + [graph.constant(graph.fresh(layer.bn_name(field)), value)
                           for field, value in (("weight", gamma), ("bias", beta), ("_mean", mean), ("_variance", var))]
        y = graph.node("BatchNormalization", bn_inputs, layer.bn_name("out"), epsilon=BN_EPSILON)
    return graph.activation(y, layer.activation, layer.prefix)


def _squeeze_excite(graph: _Graph, x: str, se: SqueezeExcite) -> str:
    pooled = graph.node("GlobalAveragePool", [x], f"{se.prefix}.pool")
    w1 = graph.constant(f"{se.prefix}.conv1.weight", graph.param(f"{se.prefix}.conv1.weight"))
    b1 = graph.constant(f"{se.prefix}.conv1.bias", graph.param(f"{se.prefix}.conv1.bias"))
    squeezed = graph.node("Conv", [pooled, w1, b1], f"{se.prefix}.conv1", kernel_shape=[1, 1])
    squeezed = graph.activation(squeezed, se.activation, f"{se.prefix}.conv1")
    w2 = graph.constant(f"{se.prefix}.conv2.weight", graph.param(f"{se.prefix}.conv2.weight"))
    b2 = graph.constant(f"{se.prefix}.conv2.bias", graph.param(f"{se.prefix}.conv2.bias"))
    excited = graph.node("Conv", [squeezed, w2, b2], f"{se.prefix}.conv2", kernel_shape=[1, 1])
    gate = graph.node("Sigmoid", [excited], f"{se.prefix}.gate")
    return graph.node("Mul", [x, gate], f"{se.prefix}.scale")


def build_onnx(architecture: Architecture, state: dict[str, np.ndarray], size: int = 224,
               form: GraphForm = DEFAULT_FORM, *, check: bool = True, features: bool = False,
               feature_map: bool = False) -> "onnx.ModelProto":
    """The ONNX model of ``architecture`` with the parameters in ``state`` (checked names and shapes, any float
    dtype; computed in float32), for ``size x size`` inputs and any batch size. ``check`` runs ONNX's model
    checker on it (a twentieth of a second; the conversion skips it, since an engine runs the model and the
    tests check every form). ``features`` adds a second output, ``features``: the pooled ``N x 1536`` float32
    vector the classifier reads (paddleclas's ``features`` block, flattened). ``feature_map`` adds the output
    ``feature_map``: the ``N x 1536 x 7 x 7`` float32 map those features are the spatial mean of (the class
    activation maps' input), from the same pass. Raises ``KeyError`` for a parameter ``state`` lacks (callers
    check the state dict first)."""
    import onnx
    from onnx import TensorProto, helper

    graph = _Graph(state)
    x = _conv_bn(graph, INPUT_NAME, architecture.stem, form)
    for unit in architecture.units:
        identity = x
        for layer in unit.layers():
            x = _squeeze_excite(graph, x, layer) if isinstance(layer, SqueezeExcite) else _conv_bn(graph, x, layer, form)
        if unit.residual:
            x = graph.node("Add", [x, identity], f"{unit.prefix}.residual")
    x = _conv_bn(graph, x, architecture.final, form)
    final_map = x
    x = graph.node("AveragePool", [x], "features.final_pool", kernel_shape=[POOL_SIZE, POOL_SIZE], strides=[1, 1])
    x = graph.node("Flatten", [x], "flatten", axis=1)
    weight = graph.constant(architecture.classifier_weight, graph.param(architecture.classifier_weight))
    bias = graph.constant(architecture.classifier_bias, graph.param(architecture.classifier_bias))
    graph.nodes.append(helper.make_node("Gemm", [x, weight, bias], [OUTPUT_NAME], name="output"))

    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, 3, size, size])]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, architecture.num_classes])]
    if features:
        graph.nodes.append(helper.make_node("Identity", [x], [FEATURES_NAME], name="features"))
        outputs.append(helper.make_tensor_value_info(FEATURES_NAME, TensorProto.FLOAT,
                                                     [BATCH_DIM, architecture.final.out_channels]))
    if feature_map:
        graph.nodes.append(helper.make_node("Identity", [final_map], [FEATURE_MAP_NAME], name="feature_map"))
        outputs.append(helper.make_tensor_value_info(FEATURE_MAP_NAME, TensorProto.FLOAT,
                                                     [BATCH_DIM, architecture.final.out_channels, POOL_SIZE, POOL_SIZE]))
    model = helper.make_model(
        helper.make_graph(graph.nodes, architecture.name, inputs, outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="mixnet-cli",
        doc_string=f"{architecture.name} ({form.label}), written from its weights by mixnet-cli",
    )
    # IR version 8 (ONNX 1.10+): loadable by every ONNX Runtime and OpenVINO release that runs opset 13, whatever
    # newer IR the installed onnx package would write by default.
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    return model

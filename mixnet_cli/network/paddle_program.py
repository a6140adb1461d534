"""The MixNet network as a legacy Paddle program (``inference.pdmodel`` + ``inference.pdiparams``), written from
the architecture description and a verified state dict.

PaddleClas 2.6's CLI and deploy scripts, Paddle Lite's ``opt`` and Paddle Inference or Serving before 3.0 read
this format: a serialized ``ProgramDesc`` and its parameters in ``save_combine`` layout. paddle 3 writes it
only for a program built in the old IR, and paddleclas's network cannot be traced there: paddle 3.3 binds
``sigmoid``, ``multiply`` and ``matmul`` straight to C++ functions that take a dygraph tensor or a PIR value,
never an old-IR ``Variable`` ("sigmoid(): argument must be Value, but got Variable"), whatever
``FLAGS_enable_pir_api`` or ``paddle.pir_utils.OldIrGuard`` say. So the program is written here, one old-IR
operator at a time, from :mod:`mixnet_cli.network.architecture` (as :mod:`mixnet_cli.network.onnx_graph` writes the ONNX
graph), and paddle only serialises it (``paddle.static.save_inference_model``).

The program is PaddleClas's exported inference model: input ``x`` (float32, ``N x 3 x 224 x 224``, normalised
pixels), output ``probabilities`` (float32, ``N x classes``): the network's logits through a softmax, which
PaddleClas's exporter appends and its deploy post-processing (``Topk``) expects. Mixed convolutions are split,
convolved per part and concatenated, as PaddleClas's network does; only long-standing operators are used
(``conv2d``, ``depthwise_conv2d``, ``batch_norm``, ``relu``, ``sigmoid``, ``elementwise_mul``,
``elementwise_add``, ``split``, ``concat``, ``pool2d``, ``reshape2``, ``matmul_v2``, ``softmax``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .architecture import BN_EPSILON, POOL_SIZE, Architecture, ConvBN, SqueezeExcite

INPUT_NAME = "x"
OUTPUT_NAME = "probabilities"
PROGRAM_SUFFIX = ".pdmodel"
PARAMS_SUFFIX = ".pdiparams"


class _Program:
    """Appends old-IR operators to one block; parameters go into ``scope`` under their state-dict names."""

    def __init__(self, paddle: Any, program: Any, scope: Any, state: dict[str, np.ndarray]) -> None:
        self._block = program.global_block()
        self._scope = scope
        self._place = paddle.CPUPlace()
        self._state = state
        self._count = 0

    def var(self, hint: str) -> Any:
        self._count += 1
        return self._block.create_var(name=f"{hint}.tmp_{self._count}", dtype="float32")

    def param(self, key: str) -> Any:
        value = np.ascontiguousarray(self._state[key], dtype=np.float32)
        variable = self._block.create_var(name=key, dtype="float32", shape=value.shape, persistable=True)
        self._scope.var(key).get_tensor().set(value, self._place)
        return variable

    def op(self, kind: str, inputs: dict[str, list[Any]], hint: str, attrs: dict[str, Any] | None = None,
           output: str = "Out") -> Any:
        out = self.var(hint)
        self._block.append_op(type=kind, inputs=inputs, outputs={output: [out]}, attrs=attrs or {})
        return out

    def activation(self, x: Any, kind: str | None, hint: str) -> Any:
        if kind is None:
            return x
        if kind == "relu":
            return self.op("relu", {"X": [x]}, f"{hint}.relu")
        if kind == "swish":
            # Not the swish operator: Paddle Lite reads its "beta" attribute, which paddle 3 no longer writes.
            gate = self.op("sigmoid", {"X": [x]}, f"{hint}.sigmoid")
            return self.op("elementwise_mul", {"X": [x], "Y": [gate]}, f"{hint}.swish", {"axis": -1})
        raise ValueError(f"unknown activation {kind!r}")

    def conv(self, x: Any, weight: Any, kernel: int, stride: int, groups: int, depthwise: bool, hint: str) -> Any:
        pad = (kernel - 1) // 2
        return self.op("depthwise_conv2d" if depthwise else "conv2d", {"Input": [x], "Filter": [weight]}, hint, {
            "strides": [stride, stride], "paddings": [pad, pad], "dilations": [1, 1], "groups": groups,
            "padding_algorithm": "EXPLICIT", "data_format": "NCHW",
        }, output="Output")

    def pool(self, x: Any, hint: str, *, window: int | None) -> Any:
        """An average pool over ``window x window`` (stride 1), or to one value per channel (``None``)."""
        size = [1, 1] if window is None else [window, window]
        return self.op("pool2d", {"X": [x]}, hint, {
            "pooling_type": "avg", "ksize": size, "strides": [1, 1], "paddings": [0, 0], "adaptive": window is None,
            "global_pooling": False, "exclusive": True, "ceil_mode": False, "data_format": "NCHW",
            "padding_algorithm": "EXPLICIT",
        })

    def conv_bn(self, x: Any, layer: ConvBN) -> Any:
        weights = [self.param(name) for name in layer.conv_weight_names()]
        parts = [x]
        if len(weights) > 1:
            parts = [self.var(f"{layer.prefix}.part") for _ in weights]
            self._block.append_op(type="split", inputs={"X": [x]}, outputs={"Out": parts},
                                  attrs={"axis": 1, "sections": list(layer.in_splits), "num": 0})
        outs = [self.conv(part, weight, kernel, layer.stride, channels if layer.depthwise else 1, layer.depthwise,
                          f"{layer.prefix}.conv")
                for part, weight, kernel, channels in zip(parts, weights, layer.kernels, layer.out_splits)]
        y = outs[0] if len(outs) == 1 else self.op("concat", {"X": outs}, f"{layer.prefix}.concat", {"axis": 1})
        scale, bias, mean, variance = (self.param(layer.bn_name(f)) for f in ("weight", "bias", "_mean", "_variance"))
        out = self.var(f"{layer.prefix}.bn")
        # MeanOut and VarianceOut are the statistics themselves, as paddle's own batch_norm writes them (unchanged
        # with is_test).
        self._block.append_op(
            type="batch_norm",
            inputs={"X": [y], "Scale": [scale], "Bias": [bias], "Mean": [mean], "Variance": [variance]},
            outputs={"Y": [out], "MeanOut": [mean], "VarianceOut": [variance],
                     "SavedMean": [self.var(f"{layer.prefix}.bn.saved_mean")],
                     "SavedVariance": [self.var(f"{layer.prefix}.bn.saved_variance")]},
            attrs={"epsilon": BN_EPSILON, "momentum": 0.9, "is_test": True, "data_layout": "NCHW",
                   "use_global_stats": False, "trainable_statistics": False},
        )
        return self.activation(out, layer.activation, layer.prefix)

    def squeeze_excite(self, x: Any, se: SqueezeExcite) -> Any:
        w = self.pool(x, f"{se.prefix}.pool", window=None)
        for index in (1, 2):
            name = f"{se.prefix}.conv{index}"
            w = self.conv(w, self.param(f"{name}.weight"), 1, 1, 1, False, name)
            w = self.op("elementwise_add", {"X": [w], "Y": [self.param(f"{name}.bias")]}, f"{name}.bias", {"axis": 1})
            if index == 1:
                w = self.activation(w, se.activation, name)
        gate = self.op("sigmoid", {"X": [w]}, f"{se.prefix}.gate")
        return self.op("elementwise_mul", {"X": [x], "Y": [gate]}, f"{se.prefix}.scale", {"axis": -1})

    def network(self, x: Any, architecture: Architecture) -> Any:
        h = self.conv_bn(x, architecture.stem)
        for unit in architecture.units:
            identity = h
            for layer in unit.layers():
                h = self.squeeze_excite(h, layer) if isinstance(layer, SqueezeExcite) else self.conv_bn(h, layer)
            if unit.residual:
                h = self.op("elementwise_add", {"X": [h], "Y": [identity]}, f"{unit.prefix}.residual", {"axis": -1})
        h = self.conv_bn(h, architecture.final)
        h = self.pool(h, "features.final_pool", window=POOL_SIZE)
        flat = self.var("flatten")
        self._block.append_op(type="reshape2", inputs={"X": [h]},
                              outputs={"Out": [flat], "XShape": [self.var("flatten.xshape")]},
                              attrs={"shape": [0, -1]})  # 0: the batch size as it comes
        h = self.op("matmul_v2", {"X": [flat], "Y": [self.param(architecture.classifier_weight)]}, "output.matmul",
                    {"trans_x": False, "trans_y": False})  # the weight is stored [in, out]
        logits = self.op("elementwise_add", {"X": [h], "Y": [self.param(architecture.classifier_bias)]}, "logits",
                         {"axis": -1})
        out = self._block.create_var(name=OUTPUT_NAME, dtype="float32")
        self._block.append_op(type="softmax", inputs={"X": [logits]}, outputs={"Out": [out]}, attrs={"axis": -1})
        return out


def write_legacy_model(architecture: Architecture, state: dict[str, np.ndarray], prefix: Path,
                       size: int = 224) -> list[Path]:
    """Write ``{prefix}.pdmodel`` and ``{prefix}.pdiparams``: ``architecture`` with the parameters in ``state``
    (checked names and shapes, any float dtype; stored as float32), for ``size x size`` inputs and any batch size.
    Returns the two paths.

    Imports paddle (the ``[paddle]`` extra; not paddleclas) and switches it to the old IR and static mode for the
    duration only. Raises ``KeyError`` for a parameter ``state`` lacks (callers check the state dict first) and
    whatever paddle raises when it cannot write.
    """
    from ..base.third_party import import_quietly

    paddle = import_quietly("paddle")
    pir_utils = import_quietly("paddle.pir_utils")
    was_dygraph = paddle.in_dynamic_mode()
    with pir_utils.OldIrGuard():
        paddle.enable_static()
        try:
            program, startup = paddle.static.Program(), paddle.static.Program()
            scope = paddle.static.Scope()
            with paddle.static.program_guard(program, startup):
                x = paddle.static.data(INPUT_NAME, [None, 3, size, size], "float32")
            out = _Program(paddle, program, scope, state).network(x, architecture)
            with paddle.static.scope_guard(scope):
                executor = paddle.static.Executor(paddle.CPUPlace())
                paddle.static.save_inference_model(str(prefix), [x], [out], executor, program=program)
        finally:
            if was_dygraph:
                paddle.disable_static()
    return [prefix.with_name(prefix.name + PROGRAM_SUFFIX), prefix.with_name(prefix.name + PARAMS_SUFFIX)]


"""Test weights that behave like trained ones, in the real ``.pdparams`` format of the real architecture.

Freshly initialised MixNet weights are useless for testing answers: every image gets the same top-1 with a
probability of about 0.001, so a wrong preprocessing would still "match". Random filters also make the network
chaotic (one grey level moves the answer). The recipe below gives a network that is smooth in its input and
confident, with different answers for different pictures, while a resize that is off by a grey level here and
there still moves probabilities by 1e-4 to 1e-2:

- every spatial (k > 1) kernel is replaced by its mean over the window, so filters are smooth blurs;
- the last batch norm of each residual unit gets weight 0.2 and bias 0, so the identity path dominates;
- the squeeze-and-excitation gates are damped (their second convolution scaled by 0.1): a gate that opens
  with the activation it multiplies makes strong inputs grow quadratically, unit after unit;
- batch-norm statistics come from generated calibration pictures, layer by layer in one forward pass, with
  each variance floored at its layer's median: a channel that barely varies on the calibration pictures would
  otherwise be divided by almost nothing and blow up on the first picture that excites it;
- the classifier is random, applied to the pooled features standardised over the calibration pictures (scales
  floored the same way), with a gain that makes logits spread over several units: confident, not saturated.

PaddleClas's own way to take statistics from a batch, one train-mode pass with momentum 0 (paddle updates
``running = momentum * running + (1 - momentum) * batch``), gives the same means and variances but leaves no
room for the floor, hence the forward pre-hooks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imagegen import scene

if TYPE_CHECKING:
    import paddle

GAIN = 6.0
RESIDUAL_BN_WEIGHT = 0.2
SE_EXCITATION_SCALE = 0.1
CALIBRATION_IMAGES = 32
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 1, 3)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 1, 3)


def calibration_batch(count: int = CALIBRATION_IMAGES, seed: int = 12345) -> np.ndarray:
    """Generated pictures through the models' own evaluation transform (N x 3 x 224 x 224 float32).

    A different seed from the test images, so the weights are not tuned to the pictures they are tested on;
    the same picture sizes and the same resize-and-crop, so the statistics are the ones test inputs have.
    """
    import cv2

    rng = np.random.default_rng(seed)
    batch = []
    for index in range(count):
        width, height = [(320, 240), (240, 320), (300, 300), (400, 300)][index % 4]
        image = scene(rng, width, height)
        scale = 256 / min(width, height)
        resized = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_LINEAR)
        top, left = (resized.shape[0] - 224) // 2, (resized.shape[1] - 224) // 2
        crop = resized[top:top + 224, left:left + 224]
        batch.append(((crop.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(batch), dtype=np.float32)


def _network(model_name: str) -> "paddle.nn.Layer":
    from paddleclas.ppcls.arch.backbone.model_zoo import mixnet

    return getattr(mixnet, model_name)(pretrained=False, class_num=1000)


def _calibrate_batch_norm(layer: "paddle.nn.BatchNorm2D", inputs: tuple) -> None:
    """Forward pre-hook: set the layer's statistics from the batch about to pass through it."""
    import paddle

    # numpy's einsum reductions are several times faster than paddle's over these axes on the CPU.
    x = inputs[0].numpy()
    count = x.size // x.shape[1]
    mean = np.einsum("nchw->c", x) / count
    centred = x - mean.reshape(1, -1, 1, 1).astype(np.float32)
    var = np.einsum("nchw,nchw->c", centred, centred) / count
    var = np.maximum(var, np.median(var))
    layer._mean.set_value(paddle.to_tensor(mean.astype(np.float32)))
    layer._variance.set_value(paddle.to_tensor(var.astype(np.float32)))


def calibrated_network(model_name: str, seed: int = 0) -> "paddle.nn.Layer":
    """The paddleclas network of ``model_name`` with calibrated weights, in eval mode."""
    import paddle
    from paddleclas.ppcls.arch.backbone.model_zoo.mixnet import MixUnit, SEBlock

    paddle.seed(seed)
    network = _network(model_name)
    with paddle.no_grad():
        for layer in network.sublayers():
            if isinstance(layer, paddle.nn.Conv2D) and max(layer.weight.shape[2:]) > 1:
                layer.weight.set_value(paddle.mean(layer.weight, axis=[2, 3], keepdim=True).expand_as(layer.weight))
            if isinstance(layer, SEBlock):
                layer.conv2.weight.set_value(layer.conv2.weight * SE_EXCITATION_SCALE)
            if isinstance(layer, MixUnit) and layer.residual:
                last_bn = layer.conv2.bn
                last_bn.weight.set_value(paddle.full_like(last_bn.weight, RESIDUAL_BN_WEIGHT))
                last_bn.bias.set_value(paddle.zeros_like(last_bn.bias))

        batch = paddle.to_tensor(calibration_batch())
        network.eval()
        hooks = [
            layer.register_forward_pre_hook(_calibrate_batch_norm)
            for layer in network.sublayers()
            if isinstance(layer, paddle.nn.BatchNorm2D)
        ]
        # Each batch norm is calibrated as the pass reaches it, on inputs from the layers already calibrated,
        # so the features of this one pass are those of the finished network.
        features = network.features(batch).reshape([batch.shape[0], -1]).numpy().astype(np.float64)
        for hook in hooks:
            hook.remove()
        mean = features.mean(axis=0)
        # Channels that (nearly) never fire on the calibration pictures would get huge weights and blow up on a
        # picture that does fire them: floor each scale at the typical channel's.
        std = np.maximum(features.std(axis=0), np.median(features.std(axis=0)))
        rng = np.random.default_rng(seed)
        directions = rng.standard_normal((features.shape[1], 1000)) * (GAIN / math.sqrt(features.shape[1]))
        # logits = ((f - mean) / std) @ directions, folded into the Linear layer's weight and bias
        weight = directions / std[:, None]
        bias = -(mean / std) @ directions
        network.output.weight.set_value(paddle.to_tensor(weight.astype(np.float32)))
        network.output.bias.set_value(paddle.to_tensor(bias.astype(np.float32)))
    return network


def make_calibrated_weights(model_name: str, path: Path, seed: int = 0, protocol: int | None = None) -> Path:
    """Write calibrated ``model_name`` weights to ``path`` with ``paddle.save`` (the released files' layout).

    ``protocol=2`` writes the pickle protocol older paddle releases used.
    """
    import paddle

    network = calibrated_network(model_name, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if protocol is None:
        paddle.save(network.state_dict(), str(path))
    else:
        paddle.save(network.state_dict(), str(path), protocol=protocol)
    return path

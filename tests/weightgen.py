"""Test weights that behave like trained ones, in the real ``.pdparams`` format, made without paddle.

The parameter names and shapes come from mixnet's architecture description (tests compare them with
paddleclas's network where paddle is installed); the file is a pickle of a dict of numpy arrays plus paddle's
``StructuredToParameterName@@`` entry, as ``paddle.save(model.state_dict())`` writes it (a test loads our files
with ``paddle.load`` and paddle's own files with mixnet).

Freshly initialised MixNet weights are useless for testing answers: every image gets the same top-1 with a
probability of about 0.001, so a wrong preprocessing would still "match". Random filters also make the network
chaotic (one grey level moves the answer). The recipe below gives a network that is smooth in its input and
confident, with different answers for different pictures, while a resize that is off by a grey level here and
there still moves probabilities by 1e-4 to 1e-2:

- every spatial (k > 1) kernel is replaced by its mean over the window, so filters are smooth blurs;
- the last batch norm of each residual unit gets weight 0.2 and bias 0, so the identity path dominates;
- the squeeze-and-excitation gates are damped (their second convolution scaled by 0.1): a gate that opens
  with the activation it multiplies makes strong inputs grow quadratically, unit after unit;
- batch-norm statistics come from generated calibration pictures, every layer in one forward pass in which
  each batch norm normalises with the statistics of the batch reaching it (so downstream layers see what the
  finished network will give them), each variance floored at its layer's median: a channel that barely varies
  on the calibration pictures would otherwise be divided by almost nothing and blow up on the first picture
  that excites it. That pass is mixnet's own ONNX graph with each BatchNormalization node replaced by those
  batch statistics, run by ONNX Runtime;
- the classifier is random, applied to the pooled features standardised over the calibration pictures (scales
  floored the same way), with a gain that makes logits spread over several units: confident, not saturated.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np

from imagegen import scene

GAIN = 6.0
RESIDUAL_BN_WEIGHT = 0.2
SE_EXCITATION_SCALE = 0.1
CALIBRATION_IMAGES = 32
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 1, 3)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 1, 3)
STRUCTURE_KEY = "StructuredToParameterName@@"


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


def random_state(model_name: str, seed: int = 0, *, wild: bool = False) -> dict[str, np.ndarray]:
    """Randomly initialised float32 parameters for every name and shape of ``model_name``.

    ``wild=True`` also randomises what a fresh network has as constants (batch-norm statistics, scales and
    shifts, biases): for tests that must tell a transposed kernel or a swapped statistic from the right one.
    """
    from mixnet_cli.network.architecture import architecture_of

    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for name, shape in architecture_of(model_name).shapes().items():
        if name.endswith("._variance"):
            value = rng.uniform(0.5, 2.0, shape) if wild else np.ones(shape)
        elif name.endswith("._mean"):
            value = rng.normal(0.0, 0.1, shape) if wild else np.zeros(shape)
        elif name.endswith("bn.weight"):
            value = rng.uniform(0.5, 1.5, shape) if wild else np.ones(shape)
        elif name.endswith(("bn.bias", ".bias")):
            value = rng.normal(0.0, 0.1, shape) if wild else np.zeros(shape)
        else:
            fan_in = shape[0] if name == "output.weight" else int(np.prod(shape[1:]))
            value = rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)  # He initialisation
        state[name] = value.astype(np.float32)
    return state


def save_pdparams(state: dict[str, np.ndarray], path: Path, protocol: int = 4) -> Path:
    """Write ``state`` as ``paddle.save(model.state_dict())`` does: one pickle of a dict of numpy arrays, plus
    the structured-name map paddle adds (protocol 4 by default, as paddle 3 writes; 2 as older paddle did)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, object] = {name: np.ascontiguousarray(value) for name, value in state.items()}
    payload[STRUCTURE_KEY] = {name: f"param_{index}" for index, name in enumerate(state)}
    with open(path, "wb") as file:
        pickle.dump(payload, file, protocol=protocol)
    return path


def _batch_statistics_graph(model_name: str, state: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    """mixnet's graph with every BatchNormalization normalising by its batch's statistics (variance floored
    at the layer's median), giving those statistics and the pooled features as extra outputs.

    Returns the model and, per batch norm, the state-dict names of its mean and variance with their outputs.
    """
    from onnx import TensorProto, helper, numpy_helper

    from mixnet_cli.network.architecture import architecture_of
    from mixnet_cli.network.onnx_graph import GraphForm, build_onnx

    model = build_onnx(architecture_of(model_name), state, form=GraphForm(fold_batch_norm=False))
    graph = model.graph
    sizes = {tensor.name: tensor.dims[0] for tensor in graph.initializer if len(tensor.dims) == 1}
    nodes, outputs, statistics = [], [], []
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            if node.op_type == "Flatten":
                outputs.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
            nodes.append(node)
            continue
        x, scale, shift, mean_name, var_name = node.input
        channels = sizes[scale]
        tag = node.output[0]

        def add(op: str, inputs: list[str], suffix: str, **attributes: object) -> str:
            name = f"{tag}.{suffix}"
            extra = [f"{name}.indices"] if op == "TopK" else []
            nodes.append(helper.make_node(op, inputs, [name] + extra, **attributes))
            return name

        def constant(suffix: str, value: np.ndarray) -> str:
            name = f"{tag}.{suffix}"
            graph.initializer.append(numpy_helper.from_array(value, name))
            return name

        mean = add("ReduceMean", [x], "mean", axes=[0, 2, 3], keepdims=1)
        centred = add("Sub", [x, mean], "centred")
        var = add("ReduceMean", [add("Mul", [centred, centred], "squared")], "var", axes=[0, 2, 3], keepdims=1)
        flat = add("Reshape", [var, constant("flat_shape", np.array([-1], dtype=np.int64))], "var_flat")
        # numpy's median: the middle value, or the mean of the two middle values for an even count.
        upper = add("ReduceMin", [add("TopK", [flat, constant("k_upper", np.array([channels - (channels - 1) // 2], dtype=np.int64))], "top_upper", axis=0)], "upper", keepdims=0)
        lower = add("ReduceMin", [add("TopK", [flat, constant("k_lower", np.array([channels - channels // 2], dtype=np.int64))], "top_lower", axis=0)], "lower", keepdims=0)
        median = add("Mul", [add("Add", [upper, lower], "middle_sum"), constant("half", np.array(0.5, dtype=np.float32))], "median")
        floored = add("Max", [var, median], "var_floored")
        epsilon = constant("epsilon", np.array(1e-5, dtype=np.float32))
        normalised = add("Div", [centred, add("Sqrt", [add("Add", [floored, epsilon], "var_eps")], "std")], "normalised")
        shape = constant("channel_shape", np.array([1, channels, 1, 1], dtype=np.int64))
        scaled = add("Mul", [normalised, add("Reshape", [scale, shape], "scale4")], "scaled")
        nodes.append(helper.make_node("Add", [scaled, add("Reshape", [shift, shape], "shift4")], [node.output[0]]))
        statistics.append((mean_name.rsplit("_", 1)[0], mean, var_name.rsplit("_", 1)[0], floored))
        outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in (mean, floored)]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.output.extend(outputs)
    return model, statistics


def calibrated_state(model_name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Parameters of ``model_name`` that answer like trained ones (see the module's docstring)."""
    import onnxruntime

    from mixnet_cli.network.architecture import architecture_of

    architecture = architecture_of(model_name)
    state = random_state(model_name, seed)
    for name, value in state.items():
        if name.endswith("weight") and value.ndim == 4 and value.shape[-1] > 1:
            state[name] = np.broadcast_to(value.mean(axis=(2, 3), keepdims=True), value.shape).astype(np.float32)
    for unit in architecture.units:
        if unit.se is not None:
            state[f"{unit.se.prefix}.conv2.weight"] *= SE_EXCITATION_SCALE
        if unit.residual:
            state[unit.project.bn_name("weight")][:] = RESIDUAL_BN_WEIGHT
            state[unit.project.bn_name("bias")][:] = 0.0

    model, statistics = _batch_statistics_graph(model_name, state)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # the replaced batch norms leave their statistics unread: no warning each
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    values = dict(zip(names, session.run(None, {"x": calibration_batch()})))
    for mean_key, mean_output, var_key, var_output in statistics:
        state[mean_key] = values[mean_output].reshape(-1).astype(np.float32)
        state[var_key] = values[var_output].reshape(-1).astype(np.float32)
    flatten = next(node.output[0] for node in model.graph.node if node.op_type == "Flatten")
    features = values[flatten].astype(np.float64)

    mean = features.mean(axis=0)
    # Channels that (nearly) never fire on the calibration pictures would get huge weights and blow up on a
    # picture that does fire them: floor each scale at the typical channel's.
    std = np.maximum(features.std(axis=0), np.median(features.std(axis=0)))
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((features.shape[1], architecture.num_classes)) * (GAIN / math.sqrt(features.shape[1]))
    # logits = ((f - mean) / std) @ directions, folded into the Linear layer's weight ([in, out]) and bias
    state[architecture.classifier_weight] = (directions / std[:, None]).astype(np.float32)
    state[architecture.classifier_bias] = (-(mean / std) @ directions).astype(np.float32)
    return state


def make_calibrated_weights(model_name: str, path: Path, seed: int = 0, protocol: int = 4) -> Path:
    """Write calibrated ``model_name`` weights to ``path`` in the released files' layout (``protocol=2``: the
    pickle protocol older paddle releases wrote)."""
    return save_pdparams(calibrated_state(model_name, seed), path, protocol)


def make_random_weights(model_name: str, path: Path, seed: int = 0) -> Path:
    """Freshly initialised ``model_name`` weights (answers near-uniform: for download and cache tests)."""
    return save_pdparams(random_state(model_name, seed), path)


# The classes of the fine-tuned weights below, in class-id order, and the calibrated classifier's columns they keep.
FINE_TUNED_CLASSES = ("daisy", "dandelion", "rose", "sunflower", "tulip", "lily of the valley", "orchid")
FINE_TUNED_COLUMNS = (3, 150, 281, 404, 530, 717, 951)


def make_fine_tuned_weights(calibrated: Path, path: Path) -> Path:
    """Weights as fine-tuning with PaddleClas leaves them: the calibrated weights at ``calibrated`` with a 7-class
    classifier (columns of theirs, so pictures get different, confident answers), saved as paddle.save writes."""
    from mixnet_cli.weights.pdparams import read_state_dict

    state = read_state_dict(calibrated)
    columns = list(FINE_TUNED_COLUMNS)
    state["output.weight"] = np.ascontiguousarray(state["output.weight"][:, columns])
    state["output.bias"] = np.ascontiguousarray(state["output.bias"][columns])
    return save_pdparams(state, path)


# Weights whose classifier sees coloured squares: class 0 is a flat background, class i a square of SQUARE_COLOURS[i-1].
SQUARE_BACKGROUND = (90, 140, 90)
SQUARE_COLOURS = {"red square": (230, 40, 40), "blue square": (40, 60, 220), "yellow square": (235, 215, 40)}


def square_photo(width: int, height: int, box: tuple[int, int, int, int] | None,
                 colour: tuple[int, int, int] = SQUARE_COLOURS["red square"]) -> np.ndarray:
    """A ``height x width x 3`` uint8 photo: the flat background, with a square of ``colour`` at ``box``
    (``left, top, right, bottom``) when given."""
    photo = np.empty((height, width, 3), dtype=np.uint8)
    photo[:] = SQUARE_BACKGROUND
    if box is not None:
        left, top, right, bottom = box
        photo[top:bottom, left:right] = colour
    return photo


def random_square(rng: np.random.Generator, width: int, height: int, side: int,
                  reach_in_crop: int = 112) -> tuple[int, int, int, int]:
    """A square inside the centre crop of the models' preprocessing, at most ``reach_in_crop`` crop pixels from its
    centre."""
    reach = int(reach_in_crop * min(width, height) / 256)
    left = int(rng.integers(width // 2 - reach, width // 2 + reach - side))
    top = int(rng.integers(height // 2 - reach, height // 2 + reach - side))
    return left, top, left + side, top + side


def make_square_weights(calibrated: Path, path: Path, colours: tuple[str, ...] = ("red square",),
                        per_class: int = 12) -> Path:
    """The calibrated MixNet_S at ``calibrated`` with a classifier of ``1 + len(colours)`` classes (0: the flat
    background; then a square of each colour on it), fitted by ridge regression, one class against the rest, on the
    pooled features of generated photos of each (squares of 40 to 70 pixels anywhere in the crop)."""
    from mixnet_cli import Classifier
    from mixnet_cli.weights.pdparams import read_state_dict

    extractor = Classifier(weights=calibrated, features=True)
    rng = np.random.default_rng(5)
    features, classes = [], []
    for index in range((1 + len(colours)) * per_class):
        kind = index % (1 + len(colours))
        box = random_square(rng, 320, 240, int(rng.integers(40, 70))) if kind else None
        photo = square_photo(320, 240, box, SQUARE_COLOURS[colours[kind - 1]] if kind else SQUARE_BACKGROUND)
        features.append(extractor.classify(photo).features)
        classes.append(kind)
    x = np.asarray(features, dtype=np.float64)
    targets = np.where(np.arange(1 + len(colours))[None, :] == np.asarray(classes)[:, None], 1.0, -1.0)
    mean = x.mean(axis=0)
    centred = x - mean
    ridge = 0.1 * np.trace(centred.T @ centred) / x.shape[1]
    directions = np.linalg.solve(centred.T @ centred + ridge * np.eye(x.shape[1]),
                                 centred.T @ (targets - targets.mean(axis=0)))
    gain = 4.0 / np.abs(centred @ directions).mean()
    state = read_state_dict(calibrated)
    state["output.weight"] = (directions * gain).astype(np.float32)
    state["output.bias"] = (-(mean @ directions) * gain).astype(np.float32)
    return save_pdparams(state, path)

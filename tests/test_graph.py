"""mixnet's own ONNX graph computes paddleclas's network: the same logits for the same weights, S, M and L, at
batch 1 and 8, in every graph form, with fully random weights (random kernels, random batch-norm statistics, so
that a transposed or mirrored kernel, a wrong channel split, padding or activation cannot pass) and with the
calibrated test weights (probabilities within 1e-4, same top-5)."""

from __future__ import annotations

import numpy as np
import pytest

from mixnet_cli.network.architecture import architecture_of
from mixnet_cli.network.onnx_graph import DEFAULT_FORM, EVERY_GROUP, GraphForm, build_onnx
from mixnet_cli.images.postprocess import softmax

# Relative to the largest logit. Fully random weights make a chaotic network that amplifies float32 rounding in
# another order to about 1e-4 (1e-6 on the calibrated weights); any of the mistakes below moves logits by 1e-1 or
# more.
LOGIT_TOLERANCE = 1e-3
PROBABILITY_TOLERANCE = 1e-4
ALL_FORMS = [GraphForm(merge, group, fold) for merge in (True, False) for group in (True, False) for fold in (False, True)]
# Mixed 1x1 layers as dense block-diagonal convolutions: those with narrow groups only, and all of them.
ALL_FORMS += [GraphForm(dense_pointwise_below=16), GraphForm(merge_depthwise=False, dense_pointwise_below=EVERY_GROUP)]


def _run_onnx(model, batch: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": batch})[0]


def _dygraph(name: str, state: dict[str, np.ndarray], batch: np.ndarray) -> np.ndarray:
    import paddle

    from mixnet_cli.base.manifest import resolve_model
    from mixnet_cli.network.paddle_network import load_network

    network = load_network(resolve_model(name), state)
    with paddle.no_grad():
        return network(paddle.to_tensor(batch)).numpy()


def _batch(count: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-2.1, 2.6, (count, 3, 224, 224)).astype(np.float32)


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_the_graph_has_one_input_and_one_output_of_any_batch_size() -> None:
    from weightgen import random_state

    model = build_onnx(architecture_of("MixNet_S"), random_state("MixNet_S"))
    [value_in], [value_out] = model.graph.input, model.graph.output
    assert (value_in.name, value_out.name) == ("x", "logits")
    assert [d.dim_param or d.dim_value for d in value_in.type.tensor_type.shape.dim] == ["N", 3, 224, 224]
    assert [d.dim_param or d.dim_value for d in value_out.type.tensor_type.shape.dim] == ["N", 1000]
    assert _run_onnx(model, _batch(3)).shape == (3, 1000)


def _grouped_pointwise(model) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """(groups, input channels) of each grouped 1x1 convolution that is not depthwise."""
    weights = {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}
    found = []
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1 and weights[node.input[1]][1] > 1:
            found.append((group, group * weights[node.input[1]][1]))
    return found


def test_dense_pointwise_replaces_only_the_narrow_groups() -> None:
    from weightgen import random_state

    state = random_state("MixNet_S")
    grouped = _grouped_pointwise(build_onnx(architecture_of("MixNet_S"), state, form=GraphForm()))
    narrow = _grouped_pointwise(build_onnx(architecture_of("MixNet_S"), state, form=GraphForm(dense_pointwise_below=16)))
    # MixNet_S's first two expansions split 16 and 24 channels in two: fewer than 16 a group.
    assert len(grouped) - len(narrow) == 2 and (2, 16) in grouped and (2, 16) not in narrow
    assert _grouped_pointwise(build_onnx(architecture_of("MixNet_S"), state,
                                         form=GraphForm(dense_pointwise_below=EVERY_GROUP))) == []
    # The default form leaves no grouped 1x1 convolution with under 16 inputs a group, in any model.
    for name in ("MixNet_S", "MixNet_M", "MixNet_L"):
        default = _grouped_pointwise(build_onnx(architecture_of(name), random_state(name), form=DEFAULT_FORM))
        assert default and all(inputs // groups >= 16 for groups, inputs in default), name


def test_every_form_computes_the_same_logits() -> None:
    from weightgen import random_state

    state = random_state("MixNet_S", seed=5, wild=True)
    batch = _batch(2)
    outputs = [_run_onnx(build_onnx(architecture_of("MixNet_S"), state, form=form), batch) for form in ALL_FORMS]
    for form, logits in zip(ALL_FORMS, outputs):
        assert _relative_error(logits, outputs[0]) <= LOGIT_TOLERANCE, form.label


@pytest.mark.paddle
@pytest.mark.parametrize("name", ["MixNet_S", "MixNet_M", "MixNet_L"])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_random_weights_give_paddleclas_logits(name: str, batch_size: int) -> None:
    from weightgen import random_state

    state = random_state(name, seed=11, wild=True)
    batch = _batch(batch_size)
    want = _dygraph(name, state, batch)
    forms = ALL_FORMS if name == "MixNet_S" and batch_size == 1 else [DEFAULT_FORM]
    for form in forms:
        got = _run_onnx(build_onnx(architecture_of(name), state, form=form), batch)
        assert _relative_error(got, want) <= LOGIT_TOLERANCE, form.label


@pytest.mark.paddle
@pytest.mark.parametrize("name", ["MixNet_S", "MixNet_M", "MixNet_L"])
def test_calibrated_weights_give_paddleclas_probabilities_and_top5(name: str, calibrated_weights) -> None:
    from mixnet_cli.weights.pdparams import read_state_dict
    from weightgen import calibration_batch

    state = read_state_dict(calibrated_weights(name))
    batch = calibration_batch(8, seed=2024)
    want = softmax(_dygraph(name, state, batch))
    got = softmax(_run_onnx(build_onnx(architecture_of(name), state), batch))
    assert np.abs(got - want).max() <= PROBABILITY_TOLERANCE
    top5 = lambda p: [list(np.argsort(-row, kind="stable")[:5]) for row in p]  # noqa: E731
    assert top5(got) == top5(want)
    assert len({row[0] for row in top5(want)}) > 1  # different pictures, different answers: the check has teeth


@pytest.mark.paddle
@pytest.mark.parametrize("mistake", ["mirrored kernel", "transposed kernel", "swapped statistics"])
def test_a_wrong_graph_is_caught(mistake: str) -> None:
    """The comparison above fails for the mistakes it is meant to catch (so it can fail at all)."""
    from weightgen import random_state

    state = random_state("MixNet_S", seed=11, wild=True)
    batch = _batch(1)
    want = _dygraph("MixNet_S", state, batch)
    wrong = dict(state)
    key = "features.stage2.unit1.conv1.conv.1.weight"  # a 5x5 part of a mixed depthwise convolution
    if mistake == "mirrored kernel":
        wrong[key] = state[key][:, :, :, ::-1].copy()
    elif mistake == "transposed kernel":
        wrong[key] = state[key].transpose(0, 1, 3, 2).copy()
    else:
        mean, var = "features.stage3.unit2.conv1.bn._mean", "features.stage3.unit2.conv1.bn._variance"
        wrong[mean], wrong[var] = state[var], state[mean] ** 2
    got = _run_onnx(build_onnx(architecture_of("MixNet_S"), wrong), batch)
    assert _relative_error(got, want) > 30 * LOGIT_TOLERANCE

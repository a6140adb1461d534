"""mixnet's legacy Paddle program (``inference.pdmodel``) computes paddleclas's network followed by a softmax: the
same probabilities for the same weights, S, M and L, at two batch sizes, loaded by Paddle Inference; with fully
random weights (random kernels and batch-norm statistics, so that a wrong split, padding or activation cannot
pass), compared in log-probabilities, where the output still carries the logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.paddle

# Relative to the largest logit, as in test_graph.py: fully random weights make a chaotic network that amplifies
# float32 rounding in another order to about 1e-4; the mistakes below move logits by 1e-1 or more.
LOGIT_TOLERANCE = 1e-3
# What a reader of the format must support: PaddleClas's own inference models hold these operators and nothing
# newer (no swish: paddle 3 drops the "beta" attribute Paddle Lite reads).
OPERATORS = {
    "feed", "fetch", "conv2d", "depthwise_conv2d", "batch_norm", "relu", "sigmoid", "elementwise_mul",
    "elementwise_add", "split", "concat", "pool2d", "reshape2", "matmul_v2", "softmax",
}


def _write(name: str, state: dict[str, np.ndarray], directory: Path) -> Path:
    from mixnet_cli.network.architecture import architecture_of
    from mixnet_cli.network.paddle_program import write_legacy_model

    program, params = write_legacy_model(architecture_of(name), state, directory / "inference")
    assert sorted(p.name for p in directory.iterdir()) == ["inference.pdiparams", "inference.pdmodel"]
    assert (program, params) == (directory / "inference.pdmodel", directory / "inference.pdiparams")
    return directory


def _run(directory: Path, batch: np.ndarray) -> np.ndarray:
    import paddle.inference as paddle_infer

    config = paddle_infer.Config(str(directory / "inference.pdmodel"), str(directory / "inference.pdiparams"))
    config.disable_gpu()
    config.disable_glog_info()
    predictor = paddle_infer.create_predictor(config)
    assert (predictor.get_input_names(), predictor.get_output_names()) == (["x"], ["probabilities"])
    handle = predictor.get_input_handle("x")
    handle.reshape(batch.shape)
    handle.copy_from_cpu(batch)
    predictor.run()
    return predictor.get_output_handle("probabilities").copy_to_cpu().astype(np.float64)


def _dygraph_logits(name: str, state: dict[str, np.ndarray], batch: np.ndarray) -> np.ndarray:
    import paddle

    from mixnet_cli.base.manifest import resolve_model
    from mixnet_cli.network.paddle_network import load_network

    with paddle.no_grad():
        return load_network(resolve_model(name), state)(paddle.to_tensor(batch)).numpy().astype(np.float64)


def _batch(count: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-2.1, 2.6, (count, 3, 224, 224)).astype(np.float32)


def _log_probability_error(probabilities: np.ndarray, logits: np.ndarray) -> float:
    """The largest difference of log-probabilities from the logits' log-softmax, relative to the largest logit,
    over every class whose probability float32 still holds (above 1e-30)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    kept = log_softmax > np.log(1e-30)
    assert kept.sum(axis=1).min() >= 1
    got = np.log(np.where(kept, probabilities, 1.0))
    return float(np.abs(got - np.where(kept, log_softmax, 0.0)).max() / np.abs(logits).max())


def test_the_program_holds_only_long_standing_operators(tmp_path: Path) -> None:
    from paddle.base.proto import framework_pb2

    from weightgen import random_state

    directory = _write("MixNet_S", random_state("MixNet_S"), tmp_path)
    desc = framework_pb2.ProgramDesc()
    desc.ParseFromString((directory / "inference.pdmodel").read_bytes())
    assert len(desc.blocks) == 1
    ops = list(desc.blocks[0].ops)
    assert {op.type for op in ops} == OPERATORS
    assert ops[-2].type == "softmax"  # then fetch: the output is probabilities, as PaddleClas's exports give
    batch_norms = [op for op in ops if op.type == "batch_norm"]
    assert batch_norms and all(attr.b for op in batch_norms for attr in op.attrs if attr.name == "is_test")


@pytest.mark.parametrize("name", ["MixNet_S", "MixNet_M", "MixNet_L"])
def test_random_weights_give_paddleclas_probabilities(name: str, tmp_path: Path) -> None:
    from weightgen import random_state

    state = random_state(name, seed=11, wild=True)
    directory = _write(name, state, tmp_path)
    for size in (1, 3):  # the batch dimension stays free
        batch = _batch(size)
        logits = _dygraph_logits(name, state, batch)
        probabilities = _run(directory, batch)
        assert probabilities.shape == (size, 1000)
        assert _log_probability_error(probabilities, logits) <= LOGIT_TOLERANCE


def test_calibrated_weights_give_paddleclas_top5(tmp_path: Path, calibrated_weights) -> None:
    from mixnet_cli.weights.pdparams import read_state_dict
    from weightgen import calibration_batch

    state = read_state_dict(calibrated_weights("MixNet_S"))
    batch = calibration_batch(4, seed=2024)
    logits = _dygraph_logits("MixNet_S", state, batch)
    want = np.exp(logits - logits.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    got = _run(_write("MixNet_S", state, tmp_path), batch)
    assert np.abs(got - want).max() <= 1e-4
    top5 = lambda p: [list(np.argsort(-row, kind="stable")[:5]) for row in p]  # noqa: E731
    assert top5(got) == top5(want)
    assert len({row[0] for row in top5(want)}) > 1  # different pictures, different answers: the check has teeth


def test_a_wrong_program_is_caught(tmp_path: Path) -> None:
    """The comparison above fails for a mistake it is meant to catch (so it can fail at all)."""
    from weightgen import random_state

    state = random_state("MixNet_S", seed=11, wild=True)
    wrong = dict(state)
    key = "features.stage2.unit1.conv1.conv.1.weight"  # a 5x5 part of a mixed depthwise convolution
    wrong[key] = state[key][:, :, :, ::-1].copy()
    batch = _batch(1)
    assert _log_probability_error(_run(_write("MixNet_S", wrong, tmp_path), batch),
                                  _dygraph_logits("MixNet_S", state, batch)) > 30 * LOGIT_TOLERANCE

"""`mixnet export`: the written models load in their own runtimes and give PaddleClas's answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mixnet_cli.cli import main
from paddleclas_reference import PaddleClasReference, paddleclas_decode, paddleclas_transform


@pytest.fixture(scope="module")
def reference_inputs(calibrated_weights_dir: Path, test_images: dict[str, Path]):
    reference = PaddleClasReference("MixNet_S", calibrated_weights_dir / "MixNet_S_pretrained.pdparams")
    batch = np.stack([paddleclas_transform(paddleclas_decode(test_images[k])) for k in ("rgb_jpeg", "cmyk_jpeg", "wide_jpeg")])
    return batch, reference.probabilities(batch)


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_onnx_export_runs_in_onnxruntime_with_paddleclas_answers(tmp_path, calibrated_mirror, reference_inputs, capfd):
    import onnx
    import onnxruntime

    out = tmp_path / "onnx-out"
    result = CliRunner().invoke(main, ["export", "S", "--format", "onnx", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(out / "MixNet_S.onnx")]
    assert "onnxruntime" in result.stderr and "checked against paddle" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["MixNet_S.onnx"]  # no staging or record left behind

    # A tidy graph: named input and output, no Identity nodes, nothing computed that nobody reads.
    graph = onnx.load(str(out / "MixNet_S.onnx")).graph
    assert [v.name for v in graph.input] == ["x"] and [v.name for v in graph.output] == ["logits"]
    assert [v.type.tensor_type.shape.dim[0].dim_param for v in (graph.input[0], graph.output[0])] == ["N", "N"]
    assert not [node for node in graph.node if node.op_type == "Identity"]
    read = {name for node in graph.node for name in node.input} | {"logits"}
    assert all(any(name in read for name in node.output) for node in graph.node)

    batch, expected = reference_inputs
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 2  # warnings: ONNX Runtime warned about each unused constant of paddle2onnx's graph
    capfd.readouterr()
    session = onnxruntime.InferenceSession(str(out / "MixNet_S.onnx"), options, providers=["CPUExecutionProvider"])
    assert "not used by any node" not in capfd.readouterr().err
    probabilities = _softmax(session.run(None, {session.get_inputs()[0].name: batch})[0].astype(np.float64))
    assert np.abs(probabilities - expected).max() < 1e-4
    assert (probabilities.argsort(axis=1)[:, -5:] == expected.argsort(axis=1)[:, -5:]).all()


def test_paddle_export_runs_in_paddle_inference_with_paddleclas_answers(tmp_path, calibrated_mirror, reference_inputs):
    import paddle.inference as paddle_infer

    out = tmp_path / "paddle-out"
    result = CliRunner().invoke(main, ["export", "mixnet_s", "--format", "paddle", "-o", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(Path(line).name for line in result.stdout.splitlines()) == ["inference.json", "inference.pdiparams"]

    config = paddle_infer.Config(str(out / "inference.json"), str(out / "inference.pdiparams"))
    config.disable_gpu()
    predictor = paddle_infer.create_predictor(config)
    batch, expected = reference_inputs
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(batch.shape)
    handle.copy_from_cpu(batch)
    predictor.run()
    logits = predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
    probabilities = _softmax(logits.astype(np.float64))
    assert np.abs(probabilities - expected).max() < 1e-4


def test_export_to_a_file_path_is_a_clear_error(tmp_path, random_mirror):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = CliRunner().invoke(main, ["export", "S", "--format", "onnx", "-o", str(blocker)])
    assert result.exit_code == 2 and "a-file" in result.stderr and "Traceback" not in result.stderr


def test_export_needs_a_known_model_and_format(tmp_path):
    result = CliRunner().invoke(main, ["export", "XL", "--format", "onnx", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "unknown model 'XL'" in result.stderr
    result = CliRunner().invoke(main, ["export", "S", "--format", "tflite", "-o", str(tmp_path)])
    assert result.exit_code == 2

"""`mixnet export`: the written models load in their own runtimes and give PaddleClas's answers."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mixnet_cli.cli import main
from mixnet_cli.base.third_party import paddle_missing


@pytest.fixture(scope="module")
def reference_inputs(calibrated_weights_dir: Path, test_images: dict[str, Path]):
    from paddleclas_reference import PaddleClasReference, paddleclas_decode, paddleclas_transform

    reference = PaddleClasReference("MixNet_S", calibrated_weights_dir / "MixNet_S_pretrained.pdparams")
    batch = np.stack([paddleclas_transform(paddleclas_decode(test_images[k])) for k in ("rgb_jpeg", "cmyk_jpeg", "wide_jpeg")])
    return batch, reference.probabilities(batch)


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def onnx_export(calibrated_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`mixnet export S --format onnx` run once, from a mirror of the calibrated weights; (result, directory)."""
    from conftest import FileServer

    server = FileServer(calibrated_weights_dir)
    out = tmp_path_factory.mktemp("export") / "onnx-out"
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MIXNET_MIRROR", server.url)
            patch.setenv("MIXNET_HOME", str(tmp_path_factory.mktemp("export-home")))
            result = CliRunner().invoke(main, ["export", "S", "--format", "onnx", "-o", str(out)], catch_exceptions=False)
    finally:
        server.close()
    return result, out


def test_onnx_export_is_a_tidy_graph_that_loads_without_warnings(onnx_export, capfd):
    import onnx
    import onnxruntime

    result, out = onnx_export
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(out / "MixNet_S.onnx")]
    assert "onnxruntime" in result.stderr and "checked against ONNX Runtime" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["MixNet_S.onnx"]  # no staging or record left behind

    # A tidy graph: named input and output, no Identity nodes, nothing computed that nobody reads.
    graph = onnx.load(str(out / "MixNet_S.onnx")).graph
    assert [v.name for v in graph.input] == ["x"] and [v.name for v in graph.output] == ["logits"]
    assert [v.type.tensor_type.shape.dim[0].dim_param for v in (graph.input[0], graph.output[0])] == ["N", "N"]
    assert not [node for node in graph.node if node.op_type == "Identity"]
    read = {name for node in graph.node for name in node.input} | {"logits"}
    assert all(any(name in read for name in node.output) for node in graph.node)
    assert {tensor.name for tensor in graph.initializer} <= read

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 2  # warnings too: an unused constant would be reported on every load
    capfd.readouterr()
    onnxruntime.InferenceSession(str(out / "MixNet_S.onnx"), options, providers=["CPUExecutionProvider"])
    assert "not used by any node" not in capfd.readouterr().err


@pytest.mark.paddle
def test_onnx_export_gives_paddleclas_answers(onnx_export, reference_inputs):
    import onnxruntime

    _, out = onnx_export
    batch, expected = reference_inputs
    session = onnxruntime.InferenceSession(str(out / "MixNet_S.onnx"), providers=["CPUExecutionProvider"])
    probabilities = _softmax(session.run(None, {session.get_inputs()[0].name: batch})[0].astype(np.float64))
    assert np.abs(probabilities - expected).max() < 1e-4
    assert (probabilities.argsort(axis=1)[:, -5:] == expected.argsort(axis=1)[:, -5:]).all()


def test_paddle_export_without_paddle_names_the_extra(tmp_path, random_mirror, monkeypatch):
    from mixnet_cli.base import third_party as imports

    if paddle_missing() is None:  # make it missing: find_spec is what the check reads
        real_find_spec = imports.importlib.util.find_spec
        monkeypatch.setattr(imports.importlib.util, "find_spec",
                            lambda name, *a: None if name == "paddleclas" else real_find_spec(name, *a))
    result = CliRunner().invoke(main, ["export", "S", "--format", "paddle", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "paddleclas" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert random_mirror.requests == [], "a missing extra is named before the weights are fetched"


@pytest.mark.paddle
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


_PADDLECLAS_ROW = re.compile(r"class_ids: \[([\d, ]+)\], scores: \[([\d., e-]+)\], .*filename: (\S+)$")


@pytest.mark.paddle
def test_paddle_legacy_export_gives_paddleclas_answers_in_paddleclas_own_cli(tmp_path, calibrated_mirror, test_images,
                                                                              reference_inputs):
    out = tmp_path / "MixNet_S_infer"
    result = CliRunner().invoke(main, ["export", "S", "--format", "paddle-legacy", "-o", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(out / "inference.pdiparams"), str(out / "inference.pdmodel")]
    assert sorted(p.name for p in out.iterdir()) == ["inference.pdiparams", "inference.pdmodel"]  # nothing else
    assert "log-probability difference" in result.stderr
    [printed] = [line.strip() for line in result.stderr.splitlines() if "paddleclas --inference_model_dir" in line]
    # The line as printed works when pasted on paddle 3: PaddleClas 2.6 reads inference.pdmodel only in the old IR,
    # which FLAGS_enable_pir_api=0 selects (without it: "Cannot open file .../inference.json").
    assert printed == f"FLAGS_enable_pir_api=0 paddleclas --inference_model_dir {out} --infer_imgs cat.jpg --use_gpu False"

    # That line, run by a shell in a process of its own (on the CPU with PaddleClas's default oneDNN) on a folder of
    # pictures instead of cat.jpg: it prints its Topk post-processing of the model's output, which it takes for
    # probabilities.
    images = tmp_path / "images"
    images.mkdir()
    kinds = ("rgb_jpeg", "cmyk_jpeg", "wide_jpeg")  # the order of reference_inputs
    for kind in kinds:
        shutil.copyfile(test_images[kind], images / f"{kind}.jpg")
    command = printed.replace("cat.jpg", shlex.quote(str(images))) + " --topk 5 --cpu_num_threads 2"
    environment = {name: value for name, value in os.environ.items() if name != "FLAGS_enable_pir_api"}
    environment.update(HOME=str(tmp_path / "home"), GLOG_minloglevel="2",
                       PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    completed = subprocess.run(["sh", "-c", command], env=environment, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=300)
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, log[-3000:]
    rows = {Path(m.group(3)).stem: m for m in map(_PADDLECLAS_ROW.search, log.splitlines()) if m}
    assert sorted(rows) == sorted(kinds), log[-3000:]

    _, expected = reference_inputs
    for kind, want in zip(kinds, expected):
        class_ids = [int(v) for v in rows[kind].group(1).split(",")]
        scores = np.array([float(v) for v in rows[kind].group(2).split(",")])
        assert class_ids == list(want.argsort()[-5:][::-1])
        assert np.abs(scores - want[class_ids]).max() < 1e-4  # printed to 5 decimals
    assert len({rows[kind].group(1).split(",")[0] for kind in kinds}) > 1  # different pictures, different answers


def test_a_probability_model_is_held_to_the_reference_logits():
    """The check of a model that outputs probabilities (paddle-legacy) compares log-probabilities too: a logit
    that is wrong where its probability is tiny fails it, although every probability is within 1e-5."""
    from mixnet_cli.engines.conversion import compare_probabilities
    from mixnet_cli.base.errors import EngineError

    logits = np.random.default_rng(0).normal(0, 8, (2, 1000))
    probabilities = _softmax(logits).astype(np.float32)
    check = compare_probabilities(probabilities, logits)
    assert check["max_abs_log_probability_diff"] < 1e-5 and check["max_abs_probability_diff"] < 1e-7

    wrong = logits.copy()
    low = int(np.argmin(logits[0]))
    wrong[0, low] += 5.0  # e^5 times the probability of a class that has almost none
    assert np.abs(_softmax(wrong) - _softmax(logits)).max() < 1e-5
    with pytest.raises(EngineError, match="its log-probabilities differ"):
        compare_probabilities(_softmax(wrong).astype(np.float32), logits)
    with pytest.raises(EngineError, match="shape"):
        compare_probabilities(probabilities[:, :10], logits)


def test_export_to_a_file_path_is_a_clear_error(tmp_path, random_mirror):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = CliRunner().invoke(main, ["export", "S", "--format", "onnx", "-o", str(blocker)])
    assert result.exit_code == 2 and "a-file" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("fmt, blocked", [
    ("onnx", "{weights}.onnx"),  # named after the weights' model
    pytest.param("paddle-legacy", "inference.pdmodel", marks=pytest.mark.paddle),
])
def test_a_directory_where_an_exported_file_goes_stops_the_export_before_any_file_is_written(
        fmt, blocked, tmp_path, random_weights_dir):
    import hashlib

    weights = random_weights_dir / "MixNet_S_pretrained.pdparams"
    blocked = blocked.format(weights=f"{weights.stem}-{hashlib.sha256(weights.read_bytes()).hexdigest()[:7]}")
    out = tmp_path / "out"
    (out / blocked).mkdir(parents=True)
    (out / blocked / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["export", "--weights", str(weights), "--format", fmt, "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and "Traceback" not in result.stderr
    assert f"{out / blocked} is a directory, where the export writes its {blocked}; move it away" in lines[-1]
    assert "disk space" not in lines[-1]
    # Not half an export: the other file (paddle-legacy's inference.pdiparams) was not written either.
    assert [p.name for p in out.iterdir()] == [blocked] and (out / blocked / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("output, blocking, says", [
    (os.devnull, os.devnull, "is a character device, not a directory; give a directory"),
    ("{tmp}/a-file/sub", "{tmp}/a-file", "is a file, not a directory, so nothing can be created under it; choose another -o"),
    ("/proc/e", "/proc", "is not writable"),  # even for root, whom os.access calls it writable
], ids=["a device", "a file as a parent", "a folder nothing can be made in"])
def test_an_output_that_can_never_be_a_directory_is_a_usage_error_before_any_download(output, blocking, says, tmp_path,
                                                                                     random_mirror):
    (tmp_path / "a-file").write_text("x")
    result = CliRunner().invoke(main, ["export", "S", "--format", "onnx", "-o", output.format(tmp=tmp_path)])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: -o ") and f"{blocking.format(tmp=tmp_path)} {says}" in line
    assert "Traceback" not in result.stderr
    assert random_mirror.requests == [], "a bad -o is found before the weights are fetched"
    assert (tmp_path / "a-file").read_text() == "x"


def test_free_disk_space_is_advised_only_when_the_disk_is_full(tmp_path):
    import errno

    from mixnet_cli.export import _write_error

    full = str(_write_error(tmp_path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    assert full == f"cannot write to {tmp_path} (No space left on device); free disk space or choose another -o"
    for code in (errno.EISDIR, errno.EIO, errno.EACCES):
        assert "disk space" not in str(_write_error(tmp_path, OSError(code, os.strerror(code))))


def test_export_needs_a_known_model_and_format(tmp_path):
    result = CliRunner().invoke(main, ["export", "XL", "--format", "onnx", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "unknown model 'XL'" in result.stderr
    result = CliRunner().invoke(main, ["export", "S", "--format", "tflite", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "'paddle-legacy'" in result.stderr


def test_the_format_option_offers_every_conversion_format():
    from mixnet_cli.engines.conversion import FORMATS

    option = next(param for param in main.commands["export"].params if param.name == "fmt")
    assert sorted(option.type.choices) == sorted(FORMATS)


def test_where_the_pir_format_is_offered_its_memory_optim_failure_is_said():
    # paddle 3.3.1 fails on the PIR export in any client calling enable_memory_optim() (PaddleClas's tools do).
    text = " ".join(CliRunner().invoke(main, ["export", "--help"]).output.split())
    assert "enable_memory_optim() (paddle 3.3.1 fails on it then; PaddleClas's tools do call it)" in text
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `paddle` | `inference.json`"))
    assert "enable_memory_optim()" in row and "need `paddle-legacy`" in row
    legacy = next(line for line in readme.splitlines() if line.startswith("| `paddle-legacy` |"))
    assert "Paddle Serving is untried" in legacy


def test_export_defaults_to_onnx_that_describes_itself_and_with_softmax_gives_probabilities(
        onnx_export, calibrated_mirror, tmp_path):
    """Without --format the export is ONNX; the file carries its labels, preprocessing and name in metadata_props;
    --with-softmax ends it in a softmax that ONNX Runtime runs to the softmax of the plain export's logits."""
    import json

    import onnx
    import onnxruntime

    from mixnet_cli.base.manifest import resolve_model
    from mixnet_cli.images.labels import imagenet_labels

    _, plain_dir = onnx_export
    out = tmp_path / "softmax"
    result = CliRunner().invoke(main, ["export", "S", "--with-softmax", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(out / "MixNet_S.onnx")]
    assert "with a softmax" in result.stderr and "Output: probabilities N x 1000" in result.stderr

    spec = resolve_model("S")
    for directory, output in ((plain_dir, "logits"), (out, "probabilities")):
        model = onnx.load(str(directory / "MixNet_S.onnx"))
        metadata = {entry.key: entry.value for entry in model.metadata_props}
        assert metadata["model_name"] == "MixNet_S" and metadata["architecture"] == "MixNet_S"
        assert metadata["output"] == output and [v.name for v in model.graph.output] == [output]
        assert json.loads(metadata["labels"]) == list(imagenet_labels()) and metadata["num_classes"] == "1000"
        pre = json.loads(metadata["preprocessing"])
        assert pre == {"resize_short": spec.preprocessing.resize_short, "crop_size": spec.preprocessing.crop_size,
                       "interpolation": spec.preprocessing.interpolation, "color_order": "RGB",
                       "scale": spec.preprocessing.scale, "mean": list(spec.preprocessing.mean),
                       "std": list(spec.preprocessing.std), "layout": "NCHW", "dtype": "float32"}

    batch = np.random.default_rng(1).uniform(-2, 2, (2, 3, 224, 224)).astype(np.float32)
    run = lambda path: onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": batch})[0]
    logits = run(plain_dir / "MixNet_S.onnx")
    probabilities = run(out / "MixNet_S.onnx")
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert np.abs(probabilities - _softmax(logits.astype(np.float64))).max() < 1e-6


def test_with_softmax_is_for_onnx_alone(tmp_path, random_mirror):
    result = CliRunner().invoke(main, ["export", "S", "--format", "paddle-legacy", "--with-softmax", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "--with-softmax is for --format onnx" in result.stderr
    assert "probabilities already" in result.stderr and random_mirror.requests == []

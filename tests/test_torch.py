"""The ``torch`` engine: mixnet's network as PyTorch modules, held to paddleclas's network on the CPU here, and on a
CUDA GPU where there is one (tests marked ``gpu``, skipped with the reason elsewhere). Device choice and its errors
are tested with or without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mixnet_cli import Classifier
from mixnet_cli.cli import main
from mixnet_cli.engines.conversion import validation_batch
from mixnet_cli.engines.choice import choose_engine
from mixnet_cli.base.errors import DeviceError, UsageError
from mixnet_cli.base.third_party import module_installed

from paddleclas_reference import (  # noqa: E402  (a helper module beside the tests)
    TOLERANCE,
    TOPK,
    PaddleClasReference,
    paddleclas_decode,
    paddleclas_transform,
)

needs_torch = pytest.mark.skipif(not module_installed("torch"), reason="needs torch (the [torch] extra)")


def _cuda_available() -> bool:
    if not module_installed("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def needs_gpu(test):  # type: ignore[no-untyped-def]
    """Marked ``gpu`` (``pytest -m gpu`` selects them) and skipped, saying why, without a usable CUDA GPU."""
    skip = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU and a CUDA build of torch")
    return pytest.mark.gpu(skip(test))


def _assert_same_answer(result, reference_ids: list[int], reference: np.ndarray, what: str) -> None:  # type: ignore[no-untyped-def]
    ids = [p.class_id for p in result.predictions]
    assert ids == reference_ids, f"{what}: top-{TOPK} {ids} but PaddleClas gives {reference_ids}"
    difference = max(abs(p.score - float(reference[p.class_id])) for p in result.predictions)
    assert difference <= TOLERANCE, f"{what}: probabilities differ from PaddleClas's by {difference:.2e}"


@needs_torch
@pytest.mark.paddle
@pytest.mark.parametrize("model_name", ["MixNet_S", pytest.param("MixNet_M", marks=pytest.mark.slow),
                                        pytest.param("MixNet_L", marks=pytest.mark.slow)])
def test_torch_engine_gives_paddleclas_answers_on_the_cpu(model_name, calibrated_weights, calibrated_mirror,
                                                          test_images) -> None:
    reference = PaddleClasReference(model_name, calibrated_weights(model_name))
    classifier = Classifier(model_name, engine="torch", device="cpu", progress=False)
    assert classifier.engine.name == "torch" and "fp32" in classifier.engine.detail
    for kind in ("rgb_jpeg", "cmyk_jpeg", "exif6_jpeg", "grey16_png"):
        result = classifier.classify(test_images[kind], topk=TOPK)
        _assert_same_answer(result, *reference.answer(paddleclas_transform(paddleclas_decode(test_images[kind]))),
                            f"{kind} ({model_name}, torch)")


@needs_torch
def test_embed_on_the_torch_engine_gives_onnx_runtimes_features(calibrated_mirror, test_images, tmp_path) -> None:
    """--embed with --engine torch: the same features and predictions as ONNX Runtime's graph gives (the features
    are tested against paddleclas's own in test_embed.py)."""
    images = [str(test_images[kind]) for kind in ("rgb_jpeg", "grey_png")]
    runner = CliRunner()
    rows = {}
    for engine in ("torch", "onnxruntime"):
        done = runner.invoke(main, ["classify", *images, "--engine", engine, "--device", "cpu", "--embed", "--json",
                                    "-v"])
        assert done.exit_code == 0, done.output
        assert f"engine {engine} (" in done.stderr
        rows[engine] = json.loads(done.stdout)
    for mine, theirs in zip(rows["torch"], rows["onnxruntime"]):
        got, expected = np.array(mine["features"]), np.array(theirs["features"])
        assert got.shape == (1536,) and np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
        assert [p["class_id"] for p in mine["predictions"]] == [p["class_id"] for p in theirs["predictions"]]


@needs_torch
def test_faster_precisions_are_measured_against_fp32(calibrated_mirror) -> None:
    """bf16 and fp16 run (on the CPU here), answer close to fp32 but not within the reference's tolerance, and the
    agreement the benchmark reports is computed from both engines' answers."""
    from mixnet_cli.engines.choice import measure_agreement

    fp32 = Classifier("S", engine="torch", device="cpu", progress=False)
    batch = validation_batch(224, 4, seed=1)
    for precision in ("bf16", "fp16"):
        low = Classifier("S", engine="torch", device="cpu", precision=precision, progress=False)
        assert low.engine_choice.precision == precision and precision in low.engine.detail
        agreement = measure_agreement(low.engine, fp32.engine, batch)
        assert agreement.images == 4
        # Lower precision changes the numbers (a difference of 0 would mean fp32 ran) but not the ranking much.
        assert 1e-7 < agreement.max_abs_probability_diff < 0.05, agreement
        assert agreement.top1_agreement >= 0.75, agreement
    same = measure_agreement(fp32.engine, fp32.engine, batch)
    assert same.max_abs_probability_diff == 0.0 and same.top1_agreement == same.top5_agreement == 1.0


@needs_torch
def test_benchmark_times_each_precision_with_its_agreement(calibrated_mirror) -> None:
    runner = CliRunner()
    done = runner.invoke(main, ["benchmark", "--engine", "torch", "--device", "cpu", "--precision", "fp32",
                                "--precision", "bf16", "-b", "1", "-b", "2", "--warmup", "0", "--repeats", "1",
                                "--json"])
    assert done.exit_code == 0, done.output
    rows = json.loads(done.stdout)
    assert [(r["precision"], r["batch_size"]) for r in rows] == [("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)]
    assert all(r["engine"] == "torch" and r["median_ms"] > 0 for r in rows)
    assert rows[0]["max_prob_diff_vs_fp32"] is None and rows[0]["paddleclas_v100_trt_ms"] == 2.31
    assert 0 < rows[2]["max_prob_diff_vs_fp32"] < 0.05 and 0 <= rows[2]["top1_agreement_vs_fp32"] <= 1
    table = runner.invoke(main, ["benchmark", "--engine", "torch", "--device", "cpu", "--precision", "bf16", "-b", "1",
                                 "--warmup", "0", "--repeats", "1"])
    assert table.exit_code == 0, table.output
    assert "top1_agreement_vs_fp32" in table.stdout.splitlines()[0]


def test_a_precision_the_engine_lacks_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="bf16 needs --engine openvino or torch"):
        choose_engine("onnxruntime", "cpu", "bf16")
    with pytest.raises(UsageError, match="unknown precision 'fp8'"):
        choose_engine("auto", "cpu", "fp8")
    done = CliRunner().invoke(main, ["benchmark", "--engine", "openvino", "--precision", "fp16"])
    assert done.exit_code == 2 and "fp16 needs --engine torch" in done.stderr
    assert "Traceback" not in done.output


@needs_torch
def test_tf32_on_the_cpu_and_compile_on_an_engine_that_cannot_are_usage_errors(calibrated_mirror,
                                                                                isolated_home) -> None:
    """Refused before anything is loaded (no download here: the mirror would serve one), exit 2."""
    runner = CliRunner()
    tf32 = runner.invoke(main, ["benchmark", "--engine", "torch", "--device", "cpu", "--precision", "tf32"])
    assert tf32.exit_code == 2 and "tf32 is a GPU's" in tf32.stderr and "Traceback" not in tf32.output
    compiled = runner.invoke(main, ["benchmark", "--engine", "openvino", "--compile"])
    assert compiled.exit_code == 2 and "--compile needs an engine that compiles the network: --engine torch" \
        in compiled.stderr
    assert not list(isolated_home.rglob("*.pdparams"))
    # auto with --compile settles on the engine that compiles.
    assert choose_engine("auto", "cpu", "fp32", compiled=True).engine == "torch"


@pytest.mark.skipif(_cuda_available(), reason="a GPU is usable here: the no-GPU errors cannot be seen")
def test_device_gpu_without_a_gpu_engine_names_what_to_install(tmp_path) -> None:
    """Also for an engine that runs on the CPU only: every way to a GPU is named."""
    with pytest.raises(DeviceError, match="--engine torch"):
        choose_engine("openvino", "gpu")
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 40)).save(photo)
    with pytest.raises(DeviceError) as raised:
        choose_engine("auto", "gpu")
    message = str(raised.value)
    assert "CUDA build of torch" in message and "onnxruntime-gpu" in message and "--device cpu" in message
    done = CliRunner().invoke(main, ["classify", str(photo), "--device", "gpu"])
    assert done.exit_code == 1 and done.stderr.count("\n") == 1 and "CUDA build of torch" in done.stderr
    auto = choose_engine("auto", "auto")
    assert auto.device == "cpu"
    # -v says why the CPU: each GPU engine's reason, torch's among them.
    assert auto.device_reason.startswith("no GPU engine: ")
    assert ("torch is not installed" if not module_installed("torch") else "torch is a CPU build") in auto.device_reason
    if module_installed("torch"):
        with pytest.raises(DeviceError, match="CPU build"):
            choose_engine("torch", "gpu:0")


def test_gpu_detection_reads_the_torch_build_without_importing_it(tmp_path) -> None:
    """A CUDA build of torch on a machine without an NVIDIA driver: ``auto`` says so, having imported no torch
    (a stand-in package whose import would fail proves it)."""
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch must not be imported to rank engines')\n")
    (fake / "version.py").write_text("__version__ = '9.9.9'\ncuda: Optional[str] = '12.8'\n")
    code = textwrap.dedent("""
        import sys
        from mixnet_cli.engines.pytorch import gpu_problem
        from mixnet_cli.engines.choice import choose_engine
        print(gpu_problem())
        print(choose_engine("auto", "auto").device_reason)
        print("torch" in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(Path(__file__).parents[1])])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    problem, reason, imported = done.stdout.splitlines()
    if Path("/dev/nvidia0").exists():
        assert problem == "None"
    else:
        assert problem == "torch has CUDA 12.8, but no NVIDIA GPU or driver is present"
        assert problem in reason
    assert imported == "False"


# --- on a CUDA GPU (benchmarks/gpu.sh runs these on the GPU machine) ------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("model_name", ["MixNet_S", "MixNet_M", "MixNet_L"])
def test_gpu_answers_are_the_cpu_answers(model_name, calibrated_weights, calibrated_mirror, test_images) -> None:
    """fp32 on the GPU (CUDA graphs, TF32 off) within 1e-4 of ONNX Runtime on the CPU, same top-5, at several
    batch sizes (each its own captured graph)."""
    gpu = Classifier(model_name, engine="torch", device="gpu", progress=False, features=True)
    cpu = Classifier(model_name, engine="onnxruntime", device="cpu", progress=False, features=True)
    assert gpu.engine.device == "gpu:0" and "CUDA graphs" in gpu.engine.detail
    images = [test_images[kind] for kind in ("rgb_jpeg", "cmyk_jpeg", "exif6_jpeg", "grey16_png", "palette_png")]
    for batch_size in (1, 3, 8):
        on_gpu = gpu.classify_many(images, topk=TOPK, batch_size=batch_size)
        on_cpu = cpu.classify_many(images, topk=TOPK, batch_size=batch_size)
        for got, expected in zip(on_gpu, on_cpu):
            assert [p.class_id for p in got.predictions] == [p.class_id for p in expected.predictions]
            assert max(abs(a.score - b.score) for a, b in zip(got.predictions, expected.predictions)) <= TOLERANCE
            scale = np.abs(expected.features).max()
            assert np.abs(got.features - expected.features).max() <= 1e-4 * scale


@needs_gpu
def test_auto_picks_the_gpu() -> None:
    choice = choose_engine("auto", "auto")
    assert choice.device.startswith("gpu:") and choice.engine_auto


@needs_torch
@pytest.mark.parametrize("api", ["allow_tf32", "fp32_precision"])
def test_the_callers_tf32_settings_survive_a_run(api, calibrated_mirror) -> None:
    """The engine turns TF32 off around its own calls only: a program's own setting, made with PyTorch's older
    flags or its newer per-backend precision, reads back the same afterwards. PyTorch raises when the two kinds
    are mixed, so an engine using the other kind would fail here."""
    import torch

    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    owners = [(matmul, api), (torch.backends.cudnn if api == "allow_tf32" else conv, api)]
    if api == "fp32_precision" and not hasattr(matmul, api):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision settings")
    value = True if api == "allow_tf32" else "tf32"
    classifier = Classifier("S", engine="torch", device="cpu", progress=False)
    before = [getattr(owner, name) for owner, name in owners]
    try:
        for owner, name in owners:
            setattr(owner, name, value)
        classifier.engine.run(validation_batch(224, 1))
        assert [getattr(owner, name) for owner, name in owners] == [value, value]
    finally:
        for (owner, name), saved in zip(owners, before):
            setattr(owner, name, saved)


def test_cache_clear_takes_torch_compile_caches(isolated_home) -> None:
    """torch.compile's Inductor and Triton caches go under the cache (engines/pytorch.py), and go with it."""
    inductor = isolated_home / "torch-compile" / "inductor" / "ab" / "kernel.py"
    inductor.parent.mkdir(parents=True)
    inductor.write_text("# a compiled kernel\n")
    done = CliRunner().invoke(main, ["cache", "clear", "--yes"])
    assert done.exit_code == 0, done.output
    assert not (isolated_home / "torch-compile").exists()

"""Engines: every engine gives the reference's answers (paddleclas's dygraph network where the [paddle] extra is
installed, else ONNX Runtime on mixnet's graph, itself held to dygraph by test_graph.py); the fast path imports no
paddle; conversion is once, checked, installs nothing and leaves nothing behind when it fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mixnet_cli import Classifier
from mixnet_cli.classifier import softmax
from mixnet_cli.cli import main
from mixnet_cli.engines.conversion import (
    LOGIT_TOLERANCE,
    PROBABILITY_TOLERANCE,
    RECORD_VERSION,
    compare_logits,
    compare_probabilities,
)
from mixnet_cli.engines.choice import choose_engine, measure_latency
from mixnet_cli.base.errors import CacheError, DeviceError, EngineError, UsageError
from mixnet_cli.base.third_party import paddle_missing
from mixnet_cli.base.manifest import resolve_model

MODEL = "MixNet_S"
WEIGHTS_NAME = "MixNet_S_pretrained.pdparams"
SPEC = resolve_model(MODEL)
HAVE_PADDLE = paddle_missing() is None
# The reference engine: paddleclas's own network where it is installed.
REFERENCE_ENGINE = "dygraph" if HAVE_PADDLE else "onnxruntime"
CONVERTED_ENGINES = ("openvino", "onnxruntime") + (("paddle",) if HAVE_PADDLE else ())


@pytest.fixture(scope="module")
def answer_weights(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights whose answers differ from image to image and are not near-ties, so top-5s can be compared: the
    calibrated test weights."""
    return Path(request.getfixturevalue("calibrated_weights_dir")) / WEIGHTS_NAME


def _home_with_weights(home: Path, weights: Path) -> Path:
    (home / "weights").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, home / "weights" / WEIGHTS_NAME)
    return home


@pytest.fixture(scope="module")
def converted_home(answer_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding the weights and their conversions (ONNX; Paddle Inference with the [paddle] extra), each
    engine checked once: made once for this module."""
    home = _home_with_weights(tmp_path_factory.mktemp("converted-home"), answer_weights)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MIXNET_HOME", str(home))
        for engine in CONVERTED_ENGINES:
            Classifier(MODEL, device="cpu", engine=engine)
    return home


@pytest.fixture
def home_copy(converted_home: Path, isolated_home: Path) -> Path:
    """This test's own copy of the converted cache, as MIXNET_HOME (the autouse fixture already points there)."""
    shutil.copytree(converted_home, isolated_home)
    return isolated_home


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A few different pictures: gradients, stripes, blobs, noise, in sizes that need resizing and cropping."""
    directory = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:300, 0:400].astype(np.float32)
    arrays = [
        np.stack([x / 400 * 255, y / 300 * 255, np.full_like(x, 90)], axis=-1),
        np.stack([((x // 25) % 2) * 255, ((y // 40) % 2) * 200, (x + y) / 700 * 255], axis=-1),
        np.stack([np.hypot(x - 200, y - 150) % 64 * 4, np.full_like(x, 30), 255 - y / 300 * 255], axis=-1),
        rng.uniform(0, 255, (300, 400, 3)),
        np.stack([np.sin(x / 9) * 120 + 128, np.cos(y / 13) * 120 + 128, np.sin((x + y) / 21) * 120 + 128], axis=-1),
    ]
    paths = []
    for index, array in enumerate(arrays):
        path = directory / f"picture{index}.png"
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def reference(converted_home: Path) -> Iterator[Classifier]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MIXNET_HOME", str(converted_home))
        yield Classifier(MODEL, device="cpu", engine=REFERENCE_ENGINE)


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime", pytest.param("paddle", marks=pytest.mark.paddle)])
def test_engine_gives_reference_probabilities_and_top5(engine, converted_home, reference, pictures, monkeypatch):
    monkeypatch.setenv("MIXNET_HOME", str(converted_home))
    classifier = Classifier(MODEL, device="cpu", engine=engine)
    assert classifier.engine.name == engine
    batch = np.stack([reference.preprocess(path) for path in pictures])
    want = softmax(reference.logits(batch))
    got = softmax(classifier.logits(batch))
    assert np.abs(got - want).max() <= 1e-4
    top5 = lambda p: [list(np.argsort(-row, kind="stable")[:5]) for row in p]  # noqa: E731
    assert top5(got) == top5(want)
    # The answers differ between pictures, or this comparison would prove little.
    assert len({tuple(row) for row in top5(want)}) > 1
    # Single images and batches of any size give the same answers.
    assert np.abs(softmax(classifier.logits(batch[2:3])) - want[2:3]).max() <= 1e-4
    results = list(classifier.classify_many(pictures, batch_size=3))
    assert [[p.class_id for p in r.predictions] for r in results] == top5(want)
    # The bulk sibling (OpenVINO's streams, ONNX Runtime's one-thread session) computes the same, from several
    # threads at once.
    bulk = classifier.engine.throughput()
    assert bulk.name == engine and bulk.parallel >= 1
    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(lambda rows: softmax(bulk.run(batch[rows])), [slice(0, 2), slice(2, 5), slice(0, 5)]))
    assert np.abs(np.concatenate(answers[:2]) - want).max() <= 1e-4
    assert np.abs(answers[2] - want).max() <= 1e-4


def test_openvino_bulk_mode_runs_batches_side_by_side(converted_home, pictures, monkeypatch):
    monkeypatch.setenv("MIXNET_HOME", str(converted_home))
    classifier = Classifier(MODEL, device="cpu", engine="openvino", threads=2)
    assert classifier.engine.parallel == 1 and "latency mode" in classifier.engine.detail
    bulk = classifier.engine.throughput()
    assert bulk is not classifier.engine and bulk is classifier.engine.throughput() and bulk.throughput() is bulk
    # OpenVINO's throughput hint splits the two threads into streams of one thread each (what BENCHMARKS.md
    # measured), so two batches run at once.
    assert bulk.parallel == 2 and "2 streams" in bulk.detail


def test_onnxruntime_bulk_mode_runs_one_thread_batches_side_by_side(converted_home, monkeypatch):
    monkeypatch.setenv("MIXNET_HOME", str(converted_home))
    classifier = Classifier(MODEL, device="cpu", engine="onnxruntime", threads=2)
    assert classifier.engine.parallel == 1 and "2 thread(s), latency mode" in classifier.engine.detail
    bulk = classifier.engine.throughput()
    assert bulk is not classifier.engine and bulk is classifier.engine.throughput() and bulk.throughput() is bulk
    assert bulk.parallel == 2 and "2 batches at once, 1 thread each" in bulk.detail
    # One thread has nothing to split: the engine is its own bulk mode.
    single = Classifier(MODEL, device="cpu", engine="onnxruntime", threads=1).engine
    assert single.throughput() is single and single.parallel == 1


def test_auto_on_the_cpu_and_verbose_says_which_engine_ran_and_why(home_copy, pictures):
    expected = choose_engine("auto", "cpu", model=MODEL)
    result = CliRunner().invoke(main, ["classify", str(pictures[0]), "--json", "-v"])
    assert result.exit_code == 0, result.output
    assert f"engine {expected.engine} (" in result.stderr and expected.engine_reason in result.stderr
    assert "converting" not in result.stderr
    assert len(json.loads(result.stdout)[0]["predictions"]) == 5
    assert "latency mode" in result.stderr


def test_onnxruntime_leaves_nothing_of_openvino_in_the_cache(isolated_home, answer_weights, pictures):
    _home_with_weights(isolated_home, answer_weights)
    done = CliRunner().invoke(main, ["classify", str(pictures[0]), "--json", "--engine", "onnxruntime"])
    assert done.exit_code == 0, done.output
    assert (isolated_home / "onnx").is_dir() and not (isolated_home / "openvino").exists()


def _cpu_with(monkeypatch, *flags: str) -> None:
    """Make this CPU look like one with ``flags`` to ``auto``'s rule (the rule reads engines.base.cpu_flags)."""
    from mixnet_cli.engines import base

    monkeypatch.setattr(base, "cpu_flags", lambda: frozenset(flags))


def test_without_a_measurement_auto_follows_the_cpu_rule(home_copy, monkeypatch):
    _cpu_with(monkeypatch, "avx2", "fma", "avx512f")
    avx512 = choose_engine("auto", "cpu", model="MixNet_L")
    assert avx512.engine == "openvino" and "avx512f" in avx512.engine_reason
    assert "not measured on this machine (mixnet doctor --measure)" in avx512.engine_reason
    _cpu_with(monkeypatch, "avx2", "fma")
    assert choose_engine("auto", "cpu").engine == "onnxruntime"


def test_an_openvino_that_auto_picked_and_cannot_start_gives_way_to_onnxruntime(home_copy, monkeypatch):
    _cpu_with(monkeypatch, "avx2", "avx512f")
    shutil.rmtree(home_copy / "onnx")
    (home_copy / "onnx").write_text("a file where the converted models would go")
    classifier = Classifier(MODEL, threads=2)
    assert classifier.engine.name == "onnxruntime" and "built in memory" in classifier.engine.detail
    assert "openvino failed" in classifier.engine_choice.engine_reason


def test_auto_follows_this_machines_measurement_until_the_engines_change(isolated_home, monkeypatch):
    from mixnet_cli.engines import speed

    record = speed.measure_engine_speeds(["MixNet_S"], 2, rounds=1)
    figures = record["models"]["MixNet_S"]
    assert set(figures) == {"onnxruntime", "openvino"}
    assert all(ms > 0 for by_batch in figures.values() for ms in by_batch.values())
    assert record["machine"] == speed.machine_key(2) and "fastest of 1" in record["how"]
    # The probe builds its own network in a temporary folder: the cache holds the record and nothing else.
    assert sorted(p.name for p in isolated_home.iterdir()) == ["engine-speed.json"]

    def kept(onnxruntime: tuple[float, float], openvino: tuple[float, float], machine: dict) -> None:
        record["machine"] = machine
        record["models"]["MixNet_S"] = {"onnxruntime": {"1": onnxruntime[0], "8": onnxruntime[1]},
                                        "openvino": {"1": openvino[0], "8": openvino[1]}}
        speed.record_path().write_text(json.dumps(record))

    _cpu_with(monkeypatch, "avx2", "avx512f")  # the rule alone would take OpenVINO
    kept((5.0, 40.0), (6.0, 50.0), speed.machine_key(2))
    measured = choose_engine("auto", "cpu", model="MixNet_S", threads=2)
    assert measured.engine == "onnxruntime" and "this machine's measurement" in measured.engine_reason
    # Faster at batch 1, slower at batch 8: the lower geometric mean of the two decides.
    kept((9.0, 40.0), (5.0, 44.0), speed.machine_key(2))
    assert choose_engine("auto", "cpu", model="MixNet_S", threads=2).engine == "openvino"
    kept((9.0, 40.0), (8.0, 60.0), speed.machine_key(2))
    assert choose_engine("auto", "cpu", model="MixNet_S", threads=2).engine == "onnxruntime"
    # Another version of an engine, or another thread count: the measurement no longer holds.
    other = dict(speed.machine_key(2), versions={"onnxruntime": "0.1", "openvino": "0.1"})
    kept((5.0, 40.0), (6.0, 50.0), other)
    stale = choose_engine("auto", "cpu", model="MixNet_S", threads=2)
    assert stale.engine == "openvino" and "another CPU, thread count or engine versions" in stale.engine_reason
    kept((5.0, 40.0), (6.0, 50.0), speed.machine_key(2))
    assert choose_engine("auto", "cpu", model="MixNet_S", threads=1).engine == "openvino"


def test_a_large_job_runs_in_bulk_mode_with_the_same_answers(home_copy, pictures, tmp_path):
    from mixnet_cli.classifier import BULK_AFTER_IMAGES

    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(BULK_AFTER_IMAGES + 3):
        shutil.copy(pictures[index % len(pictures)], folder / f"{index:03d}.png")
    result = CliRunner().invoke(main, ["classify", str(folder), "--jsonl", "-v"])
    assert result.exit_code == 0, result.output
    # -v names the bulk mode that ran: ONNX Runtime's sessions side by side, or OpenVINO's streams.
    assert "batches at once" in result.stderr or "streams" in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(row["input"]).name for row in rows] == sorted(p.name for p in folder.iterdir())
    single = CliRunner().invoke(main, ["classify", *(str(p) for p in pictures), "--jsonl"])
    answers = {index: json.loads(line)["predictions"] for index, line in enumerate(single.stdout.splitlines())}
    for index, row in enumerate(rows):
        want = answers[index % len(pictures)]
        assert [p["class_id"] for p in row["predictions"]] == [p["class_id"] for p in want]
        assert [p["score"] for p in row["predictions"]] == pytest.approx([p["score"] for p in want], abs=1e-6)


def test_engine_flag_beats_variable_and_bad_names_are_usage_errors(home_copy, pictures, monkeypatch):
    monkeypatch.setenv("MIXNET_ENGINE", "ort")
    runner = CliRunner()
    from_variable = runner.invoke(main, ["classify", str(pictures[0]), "-v", "--json"])
    assert from_variable.exit_code == 0, from_variable.output
    assert "engine onnxruntime (CPUExecutionProvider" in from_variable.stderr
    from_flag = runner.invoke(main, ["classify", str(pictures[0]), "-v", "--json", "--engine", "openvino"])
    assert from_flag.exit_code == 0, from_flag.output
    assert "engine openvino (OpenVINO" in from_flag.stderr
    assert json.loads(from_flag.stdout)[0]["predictions"][0]["class_id"] == \
        json.loads(from_variable.stdout)[0]["predictions"][0]["class_id"]
    bad = runner.invoke(main, ["classify", str(pictures[0]), "--engine", "tensorflow"])
    assert bad.exit_code == 2 and "unknown engine 'tensorflow'" in bad.stderr
    with pytest.raises(UsageError):
        choose_engine("tensorflow")


def test_onnxruntime_on_a_gpu_without_onnxruntime_gpu_is_an_error_not_a_fallback():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(DeviceError, match="onnxruntime-gpu"):
        choose_engine("onnxruntime", "gpu")


@pytest.mark.parametrize("engine", ["auto", "onnxruntime"])
def test_cached_path_imports_no_paddle(engine, home_copy, pictures):
    """The whole `mixnet classify` run, in a fresh process, with the converted model cached."""
    code = (
        "import sys\n"
        "from mixnet_cli.cli import main\n"
        "try:\n"
        f"    main(['classify', {str(pictures[1])!r}, '--json', '-v', '--engine', {engine!r}], standalone_mode=False)\n"
        "finally:\n"
        "    heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('paddle', 'paddleclas', 'paddle2onnx', 'torch'))\n"
        "    print('HEAVY', heavy, file=sys.stderr)\n"
    )
    env = {**os.environ, "MIXNET_HOME": str(home_copy)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stderr
    assert f"engine {choose_engine(engine, 'cpu').engine} (" in done.stderr
    assert json.loads(done.stdout)[0]["input"] == str(pictures[1])


def _pip_freeze() -> str:
    return subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True,
                          check=True, timeout=120).stdout


def test_first_use_converts_once_installs_nothing_and_reconverts_a_corrupt_model(
    answer_weights, isolated_home, pictures
):
    _home_with_weights(isolated_home, answer_weights)
    before = _pip_freeze()
    runner = CliRunner()
    ort = ["--engine", "onnxruntime"]  # the reference engine (auto may pick OpenVINO, which is checked below)
    first = runner.invoke(main, ["classify", str(pictures[0]), "--json", *ort])
    assert first.exit_code == 0, first.output
    assert "converting MixNet_S to ONNX (once)..." in first.stderr
    assert _pip_freeze() == before, "the conversion changed the installed packages"
    assert "POLYGRAPHY_AUTOINSTALL_DEPS" not in os.environ

    [directory] = [p for p in (isolated_home / "onnx").iterdir() if p.is_dir()]
    assert directory.name == _sha256(isolated_home / "weights" / WEIGHTS_NAME)
    # ONNX Runtime ran it: its own answers are the reference, so nothing was checked (or computed) twice; it kept
    # its optimised graph (tests/test_cold_call.py).
    [optimised] = directory.glob("onnxruntime-*")
    assert sorted(p.name for p in directory.iterdir() if p != optimised) == ["MixNet_S.onnx", "record.json"]
    record = json.loads((directory / "record.json").read_text())
    assert record["files"]["MixNet_S.onnx"]["sha256"] == _sha256(directory / "MixNet_S.onnx")
    with_openvino = runner.invoke(main, ["classify", str(pictures[0]), "--json", "--engine", "openvino"])
    assert with_openvino.exit_code == 0, with_openvino.output
    assert "converting" not in with_openvino.stderr
    assert [p["class_id"] for p in json.loads(with_openvino.stdout)[0]["predictions"]] == \
        [p["class_id"] for p in json.loads(first.stdout)[0]["predictions"]]
    # ONNX Runtime's logits on the test batch, for this very file; OpenVINO was held to them.
    reference = json.loads((directory / "reference.json").read_text())
    assert reference["model_sha256"] == record["files"]["MixNet_S.onnx"]["sha256"]
    assert np.asarray(reference["logits"]).shape == (2, 1000)
    [marker] = (isolated_home / "openvino").glob("*/checked-openvino.json")
    assert json.loads(marker.read_text())["check"]["max_abs_probability_diff"] <= PROBABILITY_TOLERANCE
    assert not list((isolated_home / "onnx").glob("*.incomplete"))

    second = runner.invoke(main, ["classify", str(pictures[0]), "--json", *ort])
    assert second.exit_code == 0 and "converting" not in second.stderr
    assert second.stdout == first.stdout

    model = directory / "MixNet_S.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    model.write_bytes(bytes(data))
    third = runner.invoke(main, ["classify", str(pictures[0]), "--json", *ort])
    assert third.exit_code == 0, third.output
    assert "corrupt MixNet_S.onnx" in third.stderr and "converting again" in third.stderr
    assert third.stdout == first.stdout


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_onnx_conversion_runs_in_process_without_paddle_or_any_installer(answer_weights, tmp_path, monkeypatch):
    """In this process, to watch it: no subprocess is started, paddle is not imported, and it takes well under
    a second of conversion work."""
    from mixnet_cli.engines import conversion

    started: list[object] = []
    real_popen_init = subprocess.Popen.__init__

    def watching_init(self, args, *rest, **kwargs):  # type: ignore[no-untyped-def]
        started.append(args)
        real_popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", watching_init)
    imported_before = {name for name in sys.modules if name.split(".")[0] in ("paddle", "paddleclas", "paddle2onnx")}
    report = conversion.convert_onnx(SPEC, answer_weights, tmp_path, openvino_copy=tmp_path / "openvino")
    assert started == []
    assert {name for name in sys.modules if name.split(".")[0] in ("paddle", "paddleclas", "paddle2onnx")} == imported_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MixNet_S.onnx", "openvino"]
    assert report["reference"] == "ONNX Runtime (CPU) on this graph"
    # The batch-1 copy for OpenVINO is the same graph with the batch dimension fixed.
    import onnx

    dynamic, fixed = onnx.load(str(tmp_path / "MixNet_S.onnx")), onnx.load(str(tmp_path / "openvino" / "batch1.onnx"))
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert [n.op_type for n in fixed.graph.node] == [n.op_type for n in dynamic.graph.node]


def test_a_failed_conversion_leaves_nothing_behind(isolated_home, tmp_path):
    from mixnet_cli.engines.conversion import ensure_converted

    garbage = tmp_path / WEIGHTS_NAME
    garbage.write_bytes(b"this is not a pickle")
    with pytest.raises(EngineError) as failure:
        ensure_converted(SPEC, garbage, "0" * 64, "onnx")
    message = str(failure.value)
    assert "converting MixNet_S to ONNX failed" in message and "\n" not in message
    assert [p.name for p in (isolated_home / "onnx").iterdir()] == []  # its lock file too


def test_a_model_made_by_an_older_version_is_replaced(home_copy, pictures):
    """A record of the version before (the graph in its previous form) is replaced by the current graph, with
    OpenVINO's copies of the old one, and the answers stay the same."""
    before = CliRunner().invoke(main, ["classify", str(pictures[0]), "--json"])
    [record_path] = (home_copy / "onnx").glob("*/record.json")
    record = json.loads(record_path.read_text())
    record["record_version"] = RECORD_VERSION - 1
    record_path.write_text(json.dumps(record))
    [openvino_dir] = (home_copy / "openvino").iterdir()
    stale = openvino_dir / "batch7.onnx"
    stale.write_bytes(b"made from the old model")
    after = CliRunner().invoke(main, ["classify", str(pictures[0]), "--json"])
    assert after.exit_code == 0, after.output
    assert "made by an older mixnet-cli; replacing it" in after.stderr
    assert not stale.exists()
    assert json.loads(record_path.read_text())["record_version"] == RECORD_VERSION
    assert after.stdout == before.stdout


def test_a_model_made_by_a_newer_version_is_left_alone(home_copy, pictures):
    """Two versions sharing one cache: the older one neither replaces the newer one's model (each would convert
    again whenever the other ran) nor fails: ONNX Runtime builds the network in memory, with the same answers; an
    engine that cannot run from memory says why in one line."""
    asked = ["classify", str(pictures[0]), "--json", "--engine", "onnxruntime"]
    before = CliRunner().invoke(main, asked)
    [record_path] = (home_copy / "onnx").glob("*/record.json")
    record = json.loads(record_path.read_text())
    record["record_version"] = RECORD_VERSION + 1
    record_path.write_text(json.dumps(record))
    untouched = {path: path.read_bytes() for path in record_path.parent.rglob("*") if path.is_file()}
    after = CliRunner().invoke(main, asked)
    assert after.exit_code == 0, after.output
    assert "newer mixnet-cli" in after.stderr and "builds the network in memory" in after.stderr
    assert after.stdout == before.stdout
    assert {path: path.read_bytes() for path in record_path.parent.rglob("*") if path.is_file()} == untouched
    refused = CliRunner().invoke(main, ["classify", str(pictures[0]), "--engine", "openvino"])
    assert refused.exit_code != 0
    [line] = refused.stderr.splitlines()  # one line, no notice before it
    assert "newer mixnet-cli" in line and "MIXNET_HOME" in line and "Traceback" not in refused.stderr
    assert {path: path.read_bytes() for path in record_path.parent.rglob("*") if path.is_file()} == untouched


def test_a_cache_that_cannot_take_the_model_runs_it_from_memory_unless_openvino_is_asked_for(home_copy, pictures,
                                                                                          monkeypatch):
    shutil.rmtree(home_copy / "onnx")
    (home_copy / "onnx").write_text("a file where the converted models would go")
    runner = CliRunner()
    _cpu_with(monkeypatch, "avx2", "fma")  # auto's rule picks ONNX Runtime
    auto = runner.invoke(main, ["classify", str(pictures[0]), "--json", "-v"])
    assert auto.exit_code == 0, auto.output
    assert "engine onnxruntime (" in auto.stderr and "built in memory" in auto.stderr
    assert "Warning: " not in auto.stderr  # nothing failed: ONNX Runtime needs no file
    _cpu_with(monkeypatch, "avx2", "fma", "avx512f")  # auto's rule picks OpenVINO, which needs the cache
    fallback = runner.invoke(main, ["classify", str(pictures[0]), "--json", "-v"])
    assert fallback.exit_code == 0, fallback.output
    assert "engine onnxruntime (" in fallback.stderr and "built in memory" in fallback.stderr
    [warning] = [line for line in fallback.stderr.splitlines() if line.startswith("Warning: ")]
    assert "cannot create the cache directory" in warning and warning.endswith("using onnxruntime on cpu instead")
    assert fallback.stdout == auto.stdout
    bulk = Classifier(MODEL, engine="onnxruntime", threads=2).engine.throughput()
    assert "built in memory" in bulk.detail
    explicit = runner.invoke(main, ["classify", str(pictures[0]), "--json", "--engine", "openvino"])
    assert explicit.exit_code == 1
    assert explicit.stderr.startswith("Error: ") and len(explicit.stderr.strip().splitlines()) == 1
    with pytest.raises(CacheError):
        Classifier(MODEL, engine="openvino")
    assert json.loads(auto.stdout) == json.loads(runner.invoke(main, ["classify", str(pictures[0]), "--json",
                                                                      "--engine", "onnxruntime"]).stdout)


def test_benchmark_reports_latency_rows(home_copy):
    result = CliRunner().invoke(main, ["benchmark", "-m", "S", "-b", "1", "-b", "2", "--warmup", "1",
                                       "--repeats", "3", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["model"], r["batch_size"]) for r in rows] == [("MixNet_S", 1), ("MixNet_S", 2)]
    for row in rows:
        # auto's engine for this CPU (engines/choice.py: ONNX Runtime, or OpenVINO on AVX-512)
        assert row["engine"] == choose_engine("auto", "cpu", threads=1).engine
        assert row["device"] == "cpu" and row["threads"] == 1
        assert 0 < row["min_ms"] <= row["p10_ms"] <= row["median_ms"] <= row["p90_ms"] <= row["max_ms"]
        assert row["repeats"] == 3 and row["images_per_s"] > 0
    assert [r["paddleclas_v100_trt_ms"] for r in rows] == [SPEC.metrics.v100_trt_fp32_latency_ms["bs1"], None]
    table = CliRunner().invoke(main, ["benchmark", "-b", "1", "--repeats", "1", "--warmup", "0"])
    assert table.exit_code == 0 and table.stdout.splitlines()[0].split()[:3] == ["model", "engine", "device"]


def test_benchmark_prints_nothing_when_a_model_cannot_be_had(home_copy, monkeypatch):
    monkeypatch.setenv("MIXNET_OFFLINE", "1")  # MixNet_M is not cached: it cannot be had
    result = CliRunner().invoke(main, ["benchmark", "-m", "S", "-m", "M", "-b", "1", "--repeats", "1", "--json"])
    assert result.exit_code != 0
    assert result.stdout == ""  # not half a JSON array
    assert "MixNet_M" in result.stderr and "Traceback" not in result.stderr


def test_measure_latency_times_the_engine(home_copy):
    classifier = Classifier(MODEL, device="cpu", threads=1)
    latency = measure_latency(classifier.engine, 2, SPEC.preprocessing.crop_size, warmup=0, repeats=4)
    assert latency.batch_size == 2 and latency.repeats == 4
    assert latency.min_ms <= latency.median_ms <= latency.max_ms
    assert latency.images_per_s == pytest.approx(2000.0 / latency.median_ms)
    with pytest.raises(UsageError):
        measure_latency(classifier.engine, 0, 224)


def test_openvino_is_checked_once_and_refused_when_it_does_not_match(home_copy, pictures):
    [marker] = (home_copy / "openvino").glob("*/checked-openvino.json")
    assert json.loads(marker.read_text())["check"]["max_abs_probability_diff"] <= PROBABILITY_TOLERANCE
    marker.unlink()
    # Reference logits that no engine gives: the check must fail.
    [reference_path] = (home_copy / "onnx").glob("*/reference.json")
    reference = json.loads(reference_path.read_text())
    reference["logits"] = (np.asarray(reference["logits"]) + 5.0 * np.eye(2, 1000)).tolist()
    reference_path.write_text(json.dumps(reference))
    result = CliRunner().invoke(main, ["classify", str(pictures[0]), "--json", "--engine", "openvino"])
    assert result.exit_code == 1 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "does not give the reference answers: its logits differ" in line
    assert not marker.exists()
    with pytest.raises(EngineError, match="its logits differ"):
        Classifier(MODEL, engine="openvino")


def test_openvino_runs_on_the_cpu_only():
    with pytest.raises(DeviceError, match="CPU only"):
        choose_engine("openvino", "gpu:0")
    assert choose_engine("openvino", "auto").device == "cpu"


def test_openvino_fixes_the_batch_size_and_pads_last_batches(home_copy):
    from mixnet_cli.engines.conversion import validation_batch

    [directory] = (home_copy / "openvino").iterdir()
    for made in directory.glob("batch*.onnx"):  # other tests' sizes, copied with the cache
        if made.name != "batch1.onnx":
            made.unlink()
    classifier = Classifier(MODEL, device="cpu", engine="openvino")
    batch = validation_batch(SPEC.preprocessing.crop_size, count=4)
    whole = classifier.logits(batch)
    padded = classifier.logits(batch[:3])  # a last, partial batch: runs on the batch-4 model
    single = classifier.logits(batch[1:2])
    scale = np.abs(whole).max()
    assert np.abs(padded - whole[:3]).max() <= 1e-5 * scale
    assert np.abs(single - whole[1:2]).max() <= 1e-5 * scale
    assert sorted(p.name for p in directory.glob("batch*.onnx")) == ["batch1.onnx", "batch4.onnx"]
    # A size that keeps coming gets its own model rather than paying for padding every time.
    for _ in range(2):
        assert np.abs(classifier.logits(batch[:3]) - whole[:3]).max() <= 1e-5 * scale
    assert sorted(p.name for p in directory.glob("batch*.onnx")) == ["batch1.onnx", "batch3.onnx", "batch4.onnx"]



def _with_probability_moved(logits: np.ndarray, by: float) -> np.ndarray:
    """``logits`` with class 0's probability in row 0 moved by ``by``: its logit shifted by the exact amount."""
    p = float(softmax(logits)[0, 0])
    target = p + by
    moved = logits.astype(np.float64).copy()
    moved[0, 0] += np.log(target / (1 - target) * (1 - p) / p)
    return moved


def test_the_conversion_check_holds_engines_to_the_tests_bounds():
    """The self-check of every engine uses the bounds the tests hold engines to (1e-4 on probabilities): logits
    moved just inside each bound pass, just outside it fail with a message naming the bound that failed."""
    assert PROBABILITY_TOLERANCE == 1e-4  # tests/paddleclas_reference.py's TOLERANCE
    # The logit bound (1e-4 of the largest logit): a class with no probability moved by 0.99 / 1.01 of it.
    reference = np.zeros((2, 1000))
    reference[:, 0] = 1000.0
    inside, outside = reference.copy(), reference.copy()
    inside[0, 5] += 0.99 * LOGIT_TOLERANCE * 1000.0
    outside[0, 5] += 1.01 * LOGIT_TOLERANCE * 1000.0
    assert compare_logits(inside, reference)["max_abs_logit_diff"] == pytest.approx(0.099)
    with pytest.raises(EngineError) as failed:
        compare_logits(outside, reference)
    assert str(failed.value) == ("the model does not give the reference answers: its logits differ from the "
                                 "reference by up to 0.101 (allowed 0.1)")

    # The probability bound, where the logit bound (1e-3 for logits of 10) is looser than the move (~4e-4).
    two_classes = np.zeros((2, 1000))
    two_classes[:, :2] = 10.0
    passed = compare_logits(_with_probability_moved(two_classes, 0.9 * PROBABILITY_TOLERANCE), two_classes)
    assert passed["max_abs_probability_diff"] == pytest.approx(0.9 * PROBABILITY_TOLERANCE, rel=1e-3)
    with pytest.raises(EngineError) as failed:
        compare_logits(_with_probability_moved(two_classes, 1.1 * PROBABILITY_TOLERANCE), two_classes)
    assert str(failed.value) == ("the model does not give the reference answers: its probabilities differ by "
                                 "up to 0.00011 (allowed 0.0001)")
    # Both passed: both named.
    with pytest.raises(EngineError, match=r"its logits differ .*\(allowed 0\.001\); its probabilities differ"):
        compare_logits(_with_probability_moved(two_classes, 0.01), two_classes)

    # A model that outputs probabilities (paddle-legacy) is held to the same probability bound.
    assert compare_probabilities(softmax(_with_probability_moved(two_classes, 0.9 * PROBABILITY_TOLERANCE)),
                                 two_classes)["max_abs_probability_diff"] < PROBABILITY_TOLERANCE
    with pytest.raises(EngineError, match=r"its probabilities differ by up to 0\.00011 \(allowed 0\.0001\)$"):
        compare_probabilities(softmax(_with_probability_moved(two_classes, 1.1 * PROBABILITY_TOLERANCE)),
                              two_classes)


# --- opt-in bf16 ------------------------------------------------------------------------------------------------------

def test_bf16_is_refused_on_a_cpu_without_bf16_arithmetic(home_copy, pictures, monkeypatch, tmp_path):
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    shutil.copy(pictures[0], tmp_path / "val" / "n01440764")
    _cpu_with(monkeypatch, "avx2", "fma", "avx512f")  # AVX-512 without avx512_bf16: bf16 would be emulated
    with pytest.raises(DeviceError, match="needs a CPU with bf16 arithmetic"):
        choose_engine("auto", "cpu", "bf16")
    with pytest.raises(DeviceError, match="needs a CPU with bf16 arithmetic"):
        Classifier(MODEL, engine="openvino", precision="bf16")
    for command in (["classify", str(pictures[0])], ["serve"], ["eval", str(tmp_path / "val")]):
        done = CliRunner().invoke(main, command + ["--precision", "bf16"])
        assert done.exit_code == 1, (command, done.output)
        assert done.stderr.startswith("Error: --precision bf16 needs a CPU with bf16 arithmetic (avx512_bf16 or AMX)")
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.output
    _cpu_with(monkeypatch, "avx2", "avx512f", "avx512_bf16")
    embed = CliRunner().invoke(main, ["classify", str(pictures[0]), "--precision", "bf16", "--json", "--embed"])
    assert embed.exit_code == 2 and "features come in fp32 only: leave out --precision bf16 with --embed" in embed.stderr
    _cpu_with(monkeypatch, "avx2", "fma", "avx512f")
    remote = CliRunner().invoke(main, ["classify", str(pictures[0]), "--precision", "bf16",
                                       "--server", "http://127.0.0.1:9"])
    assert remote.exit_code == 2 and "the service's own precision" in remote.stderr
    # fp32 stays the default everywhere, and OpenVINO computes it in f32 (not its bf16 default on such CPUs).
    assert choose_engine("auto", "cpu").precision == "fp32"
    _cpu_with(monkeypatch, "avx2", "fma", "avx512f", "avx512_bf16")
    assert Classifier(MODEL, engine="openvino").engine.detail.startswith("OpenVINO ")
    assert ", f32, " in Classifier(MODEL, engine="openvino").engine.detail


@pytest.mark.skipif(not ({"avx512_bf16", "amx_bf16"} & set(open("/proc/cpuinfo").read().split())),
                    reason="bf16 runs only on a CPU with bf16 arithmetic (avx512_bf16 or AMX)")
def test_bf16_runs_openvino_in_bf16_and_says_so(home_copy, pictures):
    fp32 = Classifier(MODEL, device="cpu", engine="openvino", threads=2)
    bf16 = Classifier(MODEL, device="cpu", precision="bf16", threads=2)
    assert bf16.engine.name == "openvino" and "bf16 (opt-in; top-1 as fp32's" in bf16.engine.detail
    batch = np.stack([fp32.preprocess(picture) for picture in pictures])
    expected, got = fp32.engine.run(batch), bf16.engine.run(batch)
    assert got.shape == expected.shape and np.all(np.isfinite(got))
    # Really bf16: its logits move by far more than f32 kernels ever do (the 1e-4 of the fp32 check).
    assert np.abs(got - expected).max() > 1e-3 * np.abs(expected).max()
    assert bf16.engine.throughput(4).run(batch).shape == expected.shape  # its bulk mode computes in bf16 too
    result = CliRunner().invoke(main, ["classify", str(pictures[0]), "--precision", "bf16", "--json", "-v"])
    assert result.exit_code == 0, result.output
    assert "engine openvino (OpenVINO" in result.stderr and "bf16 (opt-in;" in result.stderr


def test_a_checked_openvino_loads_beside_the_caller_and_its_first_batch_waits_or_compiles_again(home_copy,
                                                                                                 monkeypatch):
    """An OpenVINO already checked at this version loads its compiled model in a thread while the caller goes on
    (a cold one-image call decodes meanwhile); the first batch waits for it, gives the reference's answers, and
    when that load failed compiles again itself (and raises OpenVINO's error when that fails too)."""
    from mixnet_cli.engines.conversion import validation_batch
    from mixnet_cli.engines.openvino import OpenVinoEngine

    batch = validation_batch(SPEC.preprocessing.crop_size, count=2)
    expected = Classifier(MODEL, device="cpu", engine="onnxruntime").logits(batch)
    classifier = Classifier(MODEL, device="cpu", engine="openvino")
    assert classifier.engine._warming is not None  # loading in its own thread
    got = np.concatenate([classifier.logits(batch[i:i + 1]) for i in range(2)])
    assert classifier.engine._warming is None
    assert compare_logits(got, expected.astype(np.float64))["max_abs_probability_diff"] <= PROBABILITY_TOLERANCE

    real_compile = OpenVinoEngine._compile
    threads: list[str] = []

    def fails_in_the_loading_thread(self, path):  # type: ignore[no-untyped-def]
        import threading

        threads.append(threading.current_thread().name)
        if threading.current_thread().name == "openvino-compile":
            raise EngineError(f"OpenVINO cannot load {path} (a failure made by the test)")
        return real_compile(self, path)

    monkeypatch.setattr(OpenVinoEngine, "_compile", fails_in_the_loading_thread)
    recovered = Classifier(MODEL, device="cpu", engine="openvino")
    again = np.concatenate([recovered.logits(batch[i:i + 1]) for i in range(2)])
    assert threads[0] == "openvino-compile" and "MainThread" in threads
    assert np.abs(again - got).max() <= 1e-5 * np.abs(got).max()

    def always_fails(self, path):  # type: ignore[no-untyped-def]
        raise EngineError(f"OpenVINO cannot load {path} (a failure made by the test)")

    monkeypatch.setattr(OpenVinoEngine, "_compile", always_fails)
    broken = Classifier(MODEL, device="cpu", engine="openvino")
    with pytest.raises(EngineError, match="a failure made by the test"):
        broken.logits(batch[:1])


def test_a_bulk_job_ahead_has_openvino_load_its_throughput_model_first(home_copy):
    """Told that a bulk job of batches of 4 comes (what `classify DIR` says for more than BULK_AFTER_IMAGES
    images), a checked OpenVINO loads its throughput mode's model for batch 4 in its thread, not its own one-image
    model, which loads on the latency mode's first batch; both give the reference's answers."""
    from mixnet_cli.engines.conversion import validation_batch

    batch = validation_batch(SPEC.preprocessing.crop_size, count=4)
    expected = Classifier(MODEL, device="cpu", engine="onnxruntime").logits(batch).astype(np.float64)
    Classifier(MODEL, device="cpu", engine="openvino").logits(batch[:1])  # checked at this version: loads beside
    classifier = Classifier(MODEL, device="cpu", engine="openvino", bulk_batch_size=4)
    assert classifier.engine._warming is not None
    bulk = classifier.engine_for(100, 4)
    assert bulk is not classifier.engine and bulk is classifier.engine.throughput(4)
    assert sorted(bulk._idle) == [4] and classifier.engine._idle == {}
    assert compare_logits(bulk.run(batch), expected)["max_abs_probability_diff"] <= PROBABILITY_TOLERANCE
    one = classifier.logits(batch[:1])
    assert sorted(classifier.engine._idle) == [1]
    assert compare_logits(one, expected[:1])["max_abs_probability_diff"] <= PROBABILITY_TOLERANCE
    with pytest.raises(UsageError, match="batch size must be at least 1"):
        Classifier(MODEL, device="cpu", engine="openvino", bulk_batch_size=0)


def test_classify_many_decodes_while_the_bulk_engine_loads(home_copy, pictures, monkeypatch):
    """The decoders start before the bulk engine is asked for (OpenVINO may still be loading its model then), and
    the results are those of the images in order."""
    import threading

    from mixnet_cli import classifier as classifier_module
    from mixnet_cli.classifier import BULK_AFTER_IMAGES

    decoded = threading.Event()
    real_load = classifier_module.load_photo_and_transform

    def load(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_load(*args, **kwargs)
        decoded.set()
        return result

    real_engine_for = Classifier.engine_for
    decoding_before_engine: list[bool] = []

    def engine_for(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        decoding_before_engine.append(decoded.wait(timeout=10))
        return real_engine_for(self, *args, **kwargs)

    monkeypatch.setattr(classifier_module, "load_photo_and_transform", load)
    monkeypatch.setattr(Classifier, "engine_for", engine_for)
    classifier = Classifier(MODEL, device="cpu", engine="onnxruntime")
    images = [pictures[index % len(pictures)] for index in range(BULK_AFTER_IMAGES + 1)]
    results = list(classifier.classify_many(images, batch_size=4))
    assert decoding_before_engine == [True]
    assert [result.input for result in results] == [str(path) for path in images]
    assert all(result.ok for result in results)

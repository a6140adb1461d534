"""Adding an engine is one module and one registry line: this module is such an engine (it wraps ONNX Runtime and
counts the batches it runs), registered by a fixture; nothing else in mixnet is told about it, and the CLI, the
API, the checks of --engine and doctor all know it."""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mixnet_cli import Classifier
from mixnet_cli.cli import main
from mixnet_cli.engines import ENGINES, EngineInfo, register
from mixnet_cli.engines.base import DeviceChoice, OneBatchAtATime

BATCHES_RUN: list[int] = []


# --- the engine: what an engine module provides -------------------------------------------------------------------

def resolve_device(name: str, requested: str) -> DeviceChoice:
    return DeviceChoice("cpu", "the counting engine runs on the CPU")


def build(spec, weights, choice, threads):  # type: ignore[no-untyped-def]
    return CountingEngine(ENGINES["onnxruntime"].load().build(spec, weights, choice, threads))


class CountingEngine(OneBatchAtATime):
    name = "counting"

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self._inner = inner
        self.device, self.threads = inner.device, inner.threads
        self.detail = f"counting batches over {inner.detail}"

    def run(self, batch: np.ndarray) -> np.ndarray:
        BATCHES_RUN.append(len(batch))
        return self._inner.run(batch)


# --- the registry line, and what it gives ---------------------------------------------------------------------------

@pytest.fixture
def counting_engine() -> Iterator[EngineInfo]:
    info = register(EngineInfo("counting", ("count",), "cpu", "ONNX Runtime, counting batches (an example)",
                               "nothing to install", ("onnxruntime",), __name__))
    BATCHES_RUN.clear()
    yield info
    del ENGINES["counting"]


def test_a_registered_engine_runs_from_the_cli_and_the_api(counting_engine, calibrated_mirror, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.linspace(0, 255, 240 * 320 * 3).reshape(240, 320, 3).astype(np.uint8)).save(photo)
    runner = CliRunner()
    counted = runner.invoke(main, ["classify", str(photo), "--engine", "count", "--json", "-v"])
    assert counted.exit_code == 0, counted.output
    assert "engine counting (counting batches over CPUExecutionProvider" in counted.stderr
    assert BATCHES_RUN == [1]
    plain = runner.invoke(main, ["classify", str(photo), "--engine", "onnxruntime", "--json"])
    assert json.loads(counted.stdout) == json.loads(plain.stdout)
    assert Classifier("S", engine="counting").engine.name == "counting"

    doctor = {row["check"]: row for row in json.loads(runner.invoke(main, ["doctor", "--json"],
                                                                    env={"MIXNET_OFFLINE": "1"}).stdout)}
    assert doctor["engine counting"]["value"] == "ready"
    unknown = runner.invoke(main, ["classify", str(photo), "--engine", "nope"])
    assert unknown.exit_code == 2 and "counting" in unknown.stderr


def test_doctor_says_what_a_missing_engine_needs_and_its_install_line_once():
    register(EngineInfo("absent", (), "cpu", "an engine whose library is not installed (an example)",
                        "pip install no-such-engine-library", ("no_such_engine_library",), __name__))
    try:
        doctor = {row["check"]: row for row in json.loads(CliRunner().invoke(
            main, ["doctor", "--json"], env={"MIXNET_OFFLINE": "1"}).stdout)}
    finally:
        del ENGINES["absent"]
    row = doctor["engine absent"]
    assert (row["value"], row["hint"]) == ("needs no_such_engine_library", "pip install no-such-engine-library")


def test_auto_gives_way_to_the_next_engine_when_its_first_choice_fails(calibrated_mirror, tmp_path, monkeypatch):
    """An engine ranked first on the CPU that fails to start (here: this module's, refusing to build) hands over to
    the next in the table, with one warning; asked for by name, its failure is the error."""
    from mixnet_cli.engines import base

    # A CPU without AVX-512, where auto follows the table's ranks (on AVX-512 its rule puts OpenVINO first).
    monkeypatch.setattr(base, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    info = register(EngineInfo("refusing", (), "cpu", "an engine that never starts (an example)",
                               "nothing to install", (), __name__ + "_refusing", cpu_rank=-1))
    import sys
    import types

    from mixnet_cli.engines.base import EngineFailed

    module = types.ModuleType(info.module)
    module.resolve_device = resolve_device  # type: ignore[attr-defined]

    def refuse(spec, weights, choice, threads):  # type: ignore[no-untyped-def]
        raise EngineFailed("the refusing engine cannot start")

    module.build = refuse  # type: ignore[attr-defined]
    sys.modules[info.module] = module
    photo = tmp_path / "photo.png"
    Image.fromarray(np.linspace(0, 255, 240 * 320 * 3).reshape(240, 320, 3).astype(np.uint8)).save(photo)
    try:
        runner = CliRunner()
        auto = runner.invoke(main, ["classify", str(photo), "--json", "-v"])
        assert auto.exit_code == 0, auto.output
        [warning] = [line for line in auto.stderr.splitlines() if line.startswith("Warning: ")]
        assert warning == "Warning: the refusing engine cannot start; using onnxruntime on cpu instead"
        assert "engine onnxruntime (" in auto.stderr
        named = runner.invoke(main, ["classify", str(photo), "--json", "--engine", "refusing"])
        assert named.exit_code == 1 and named.stderr.strip() == "Error: the refusing engine cannot start"
    finally:
        del ENGINES["refusing"]
        del sys.modules[info.module]


def test_engine_names_cannot_clash(counting_engine) -> None:
    with pytest.raises(ValueError, match="ort"):
        register(EngineInfo("other", ("ort",), "cpu", "", "", (), __name__))
    with pytest.raises(ValueError, match="auto"):
        register(EngineInfo("auto", (), "cpu", "", "", (), __name__))


def test_help_and_readme_describe_auto_as_the_table_ranks_the_engines():
    from pathlib import Path

    from mixnet_cli.engines import ranked

    cpu = ", ".join(info.name for info in ranked("cpu"))
    gpu = ", ".join(info.name for info in ranked("gpu"))
    assert cpu.startswith("onnxruntime, openvino") and gpu.startswith("torch")
    text = " ".join(CliRunner().invoke(main, ["classify", "--help"]).output.split())
    assert f"on the CPU {cpu}; on a GPU {gpu}" in text
    assert "else OpenVINO first on AVX-512 CPUs" in text  # the CPU rule, before the table's order
    assert "a GPU when a CUDA build of torch, onnxruntime-gpu or paddlepaddle-gpu is installed" in text
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    engine_row = next(line for line in readme.splitlines() if line.startswith("| `--engine auto"))
    device_row = next(line for line in readme.splitlines() if line.startswith("| `--device auto"))
    assert f"on the CPU {cpu}; on a GPU {gpu}" in engine_row
    assert all(f"\\|{name}" in engine_row.split("`")[1] for name in ENGINES), "every engine is offered"
    assert "a CUDA build of torch, onnxruntime-gpu or paddlepaddle-gpu" in device_row
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert "OpenVINO (the default on the CPU)" not in pyproject

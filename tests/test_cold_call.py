"""A cold one-image call: cached files hashed again only when their stat changed (MIXNET_VERIFY=always: on every
use), ONNX Runtime's optimised graph kept in the cache, the program's exit without the interpreter's teardown, and
one BLAS thread in the program."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mixnet_cli.base import cache
from mixnet_cli.base.manifest import resolve_model
from mixnet_cli.cli import main, quiet_blas_threads
from mixnet_cli.engines.conversion import cached_model, ensure_converted, validation_batch

FILE = "MixNet_S_pretrained.pdparams"
SPEC = resolve_model("MixNet_S")
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args))


def settle(path: Path) -> None:
    """As if ``path`` had been written ten seconds ago: a stamp taken from now on vouches for it."""
    status = path.stat()
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns - 10_000_000_000))


def change_in_place_keeping_size_and_mtime(path: Path) -> None:
    """One byte flipped in the middle of the file, in place, and its modification time set back."""
    status = path.stat()
    with open(path, "r+b") as stream:
        stream.seek(status.st_size // 2)
        byte = stream.read(1)
        stream.seek(status.st_size // 2)
        stream.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == \
        (status.st_size, status.st_mtime_ns, status.st_ino)


@pytest.fixture
def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file hashed in full from now on (what the cache's checks read through ``cache.sha256_of``)."""
    hashed: list[Path] = []
    real = cache.sha256_of

    def counting(path: Path) -> str:
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(cache, "sha256_of", counting)
    return hashed


def assert_corrupt_weights_error(result) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cached weights ") and "are corrupt" in last and "mixnet download S --force" in last


def test_weights_are_hashed_when_their_stat_changes_and_every_time_with_verify_always(
        random_weights_dir, isolated_home, count_hashes, monkeypatch):
    assert run("download", "S", "--from", str(random_weights_dir / FILE)).exit_code == 0
    path = isolated_home / "weights" / FILE
    settle(path)
    count_hashes.clear()
    assert run("download", "S", "--offline").exit_code == 0  # its stat changed: hashed, and the new stat kept
    assert count_hashes == [path]
    record = json.loads((path.parent / (FILE + ".json")).read_text())
    assert record["stat"]["mtime_ns"] == path.stat().st_mtime_ns and record["stat"]["inode"] == path.stat().st_ino
    count_hashes.clear()
    assert "MixNet_S: cached" in run("download", "S", "--offline").stderr
    assert count_hashes == []  # unchanged: not read at all

    # The promise's limit: a change in place that keeps the size and sets the time back is not seen...
    change_in_place_keeping_size_and_mtime(path)
    assert run("download", "S", "--offline").exit_code == 0
    # ...except with MIXNET_VERIFY=always, which hashes on every use.
    monkeypatch.setenv("MIXNET_VERIFY", "always")
    assert_corrupt_weights_error(run("download", "S", "--offline"))
    monkeypatch.setenv("MIXNET_VERIFY", "sometimes")
    result = run("download", "S", "--offline")
    assert result.exit_code == 2 and "MIXNET_VERIFY='sometimes' must be one of changed, always" in result.stderr


@pytest.mark.parametrize("change", ["mtime", "size", "inode"])
def test_a_changed_size_mtime_or_inode_makes_the_weights_hashed_and_their_corruption_seen(
        change, random_weights_dir, isolated_home):
    assert run("download", "S", "--from", str(random_weights_dir / FILE)).exit_code == 0
    path = isolated_home / "weights" / FILE
    settle(path)
    assert run("download", "S", "--offline").exit_code == 0
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    if change == "size":
        data += b"\0"
    status = path.stat()
    if change == "inode":  # a new file under the old name, with the old time
        replacement = path.with_name("replacement")
        replacement.write_bytes(bytes(data))
        os.replace(replacement, path)
    else:
        path.write_bytes(bytes(data))
    if change != "mtime":
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert_corrupt_weights_error(run("download", "S", "--offline"))


def test_a_stamp_taken_just_after_a_write_does_not_vouch_for_the_file(random_weights_dir, isolated_home):
    """File systems keep times in ticks: a write in the same tick as the one stamped would keep the time, so a
    stamp taken within two seconds of the file's last change is not trusted."""
    assert run("download", "S", "--from", str(random_weights_dir / FILE)).exit_code == 0
    path = isolated_home / "weights" / FILE
    change_in_place_keeping_size_and_mtime(path)  # the stamp of the install is fresh: hashed, and seen
    assert_corrupt_weights_error(run("download", "S", "--offline"))


def test_a_converted_model_is_hashed_when_its_stat_changes_and_every_time_with_verify_always(
        random_weights_dir, isolated_home, count_hashes, monkeypatch):
    weights = random_weights_dir / FILE
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    model = ensure_converted(SPEC, weights, digest, "onnx").file(".onnx")
    settle(model)
    count_hashes.clear()
    assert cached_model(SPEC, digest, "onnx") is not None
    assert count_hashes == [model]
    record = json.loads((model.parent / "record.json").read_text())
    assert record["files"][model.name]["stat"]["mtime_ns"] == model.stat().st_mtime_ns
    count_hashes.clear()
    assert cached_model(SPEC, digest, "onnx") is not None
    assert count_hashes == []

    change_in_place_keeping_size_and_mtime(model)
    assert cached_model(SPEC, digest, "onnx") is not None  # the promise's limit
    monkeypatch.setenv("MIXNET_VERIFY", "always")
    assert cached_model(SPEC, digest, "onnx") is None  # corrupt: converted again by ensure_converted
    monkeypatch.delenv("MIXNET_VERIFY")
    os.utime(model)  # now the time changed too: seen without MIXNET_VERIFY
    assert cached_model(SPEC, digest, "onnx") is None
    assert cached_model(SPEC, digest, "onnx") is None  # and not restamped as if it were intact


def test_onnx_runtime_keeps_its_optimised_graph_and_gives_bit_identical_logits(random_weights_dir, isolated_home):
    import onnxruntime

    from mixnet_cli.engines.onnxruntime import OnnxRuntimeEngine, cpu_key

    weights = random_weights_dir / FILE
    converted = ensure_converted(SPEC, weights, hashlib.sha256(weights.read_bytes()).hexdigest(), "onnx")
    model = converted.file(".onnx")
    model_sha256 = converted.record["files"][model.name]["sha256"]
    batch = validation_batch(224, count=3)
    plain = OnnxRuntimeEngine(model, "cpu", 2).run(batch)  # optimised in memory, as without the cache
    assert not list(model.parent.glob("onnxruntime-*"))

    # What a process killed while saving left: an old one is removed, a recent one (maybe still being written) not.
    name = f"onnxruntime-{onnxruntime.__version__}-{cpu_key()}"
    old, recent = model.parent / f".{name}.old.incomplete", model.parent / f".{name}.recent.incomplete"
    old.mkdir()
    recent.mkdir()
    os.utime(old, (0, 0))
    first = OnnxRuntimeEngine(model, "cpu", 2, model_sha256=model_sha256)
    assert not first.optimised_cached
    assert not old.exists() and recent.exists()
    recent.rmdir()
    [folder] = model.parent.glob("onnxruntime-*")
    assert folder.name == f"onnxruntime-{onnxruntime.__version__}-{cpu_key()}"  # per version and CPU kind
    record = cache.read_directory_record(folder)
    assert record is not None and record["onnx_sha256"] == model_sha256
    assert cache.directory_problem(folder, record) is None
    assert not [p for p in model.parent.iterdir() if p.name.startswith(".")]  # nothing half-written left
    second = OnnxRuntimeEngine(model, "cpu", 2, model_sha256=model_sha256)
    assert second.optimised_cached and "optimised graph from the cache" in second.detail
    optimised = folder / f"{model.stem}.ort"
    settle(optimised)  # hashed once more, then its stat vouches for it
    assert OnnxRuntimeEngine(model, "cpu", 2, model_sha256=model_sha256).optimised_cached
    assert cache.read_directory_record(folder)["files"][optimised.name]["stat"]["mtime_ns"] == \
        optimised.stat().st_mtime_ns
    for engine in (first, second, second.throughput()):
        assert np.array_equal(engine.run(batch), plain)
        assert np.array_equal(engine.run(batch[:1]), plain[:1])

    # A damaged copy is not loaded: the graph is optimised again and the copy replaced.
    data = bytearray(optimised.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimised.write_bytes(bytes(data))
    third = OnnxRuntimeEngine(model, "cpu", 2, model_sha256=model_sha256)
    assert not third.optimised_cached and np.array_equal(third.run(batch), plain)
    fourth = OnnxRuntimeEngine(model, "cpu", 2, model_sha256=model_sha256)
    assert fourth.optimised_cached and np.array_equal(fourth.run(batch), plain)
    # A copy made from another ONNX model is not used either.
    assert not OnnxRuntimeEngine(model, "cpu", 2, model_sha256="0" * 64).optimised_cached


def _program(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter with this checkout's package, as the ``mixnet`` program runs it."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


def test_the_program_ends_without_teardown_keeping_its_exit_code_output_file_and_lock_files_clean(tmp_path):
    out = tmp_path / "rows.json"
    lock = tmp_path / "held.lock"
    code = f"""
import sys
from pathlib import Path

class Teardown:
    def __del__(self):
        sys.stderr.write("interpreter teardown ran\\n")

keep = Teardown()
from mixnet_cli.base.locks import file_lock
held = file_lock(Path({str(lock)!r}))
held.acquire()
from mixnet_cli.cli import main
sys.argv = ["mixnet", "classify", {str(tmp_path / "missing.jpg")!r}, "--json", "-o", {str(out)!r}]
main(prog_name="mixnet")  # as the program runs it: the arguments from sys.argv
"""
    done = _program(code)
    assert done.returncode == 1, done.stderr
    assert "missing.jpg: no such file" in done.stderr
    assert "interpreter teardown ran" not in done.stderr
    assert not lock.exists()  # deleted at exit although never released
    rows = json.loads(out.read_text())  # complete, under its final name
    assert rows[0]["error"]["type"] == "ImageNotFoundError"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]
    version = _program("import sys\nfrom mixnet_cli.cli import main\nsys.argv = ['mixnet', '--version']\nmain()")
    assert version.returncode == 0 and version.stdout.startswith("mixnet ")
    # Called with arguments (a program embedding the command line), it ends as click does: SystemExit, teardown.
    embedded = _program(code.replace('sys.argv = ["mixnet", ', 'main([').replace(
        ']\nmain(prog_name="mixnet")', '])'))
    assert embedded.returncode == 1 and "interpreter teardown ran" in embedded.stderr


def test_the_program_runs_numpy_with_one_blas_thread_unless_the_user_chose():
    # Reported from an exit handler, after the command: numpy imported then starts its BLAS threads as the
    # environment says; /proc/self/task lists the process's threads.
    code = """
import atexit, os, sys

def report():
    import numpy
    tasks = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1
    sys.stderr.write(f"blas={os.environ.get('OPENBLAS_NUM_THREADS')} threads={tasks}\\n")

atexit.register(report)
from mixnet_cli.cli import main
sys.argv = ["mixnet", "--version"]
main()
"""
    environment = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**environment, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "blas=1 " in done.stderr
    if "threads=-1" not in done.stderr:
        assert "threads=1\n" in done.stderr, done.stderr  # numpy started no BLAS thread of its own
    chosen = _program(code, {"OPENBLAS_NUM_THREADS": "2"})
    assert "blas=2 " in chosen.stderr, chosen.stderr
    # Importing the command line (as tests and programs embedding it do) changes nothing.
    imported = _program("import os\nfrom mixnet_cli.cli import main\nprint(os.environ.get('OPENBLAS_NUM_THREADS'))",
                        {"OPENBLAS_NUM_THREADS": ""})
    assert imported.stdout.strip() == ""


def test_quiet_blas_threads_sets_only_what_the_user_left_unset():
    environ = {"OPENBLAS_NUM_THREADS": "4", "OMP_NUM_THREADS": "3"}
    quiet_blas_threads(environ)
    assert environ == {"OPENBLAS_NUM_THREADS": "4", "OMP_NUM_THREADS": "3"}
    unset: dict[str, str] = {"OPENBLAS_NUM_THREADS": " "}
    quiet_blas_threads(unset)
    assert unset == {"OPENBLAS_NUM_THREADS": "1"}  # OMP_NUM_THREADS is the engines' and stays unset


def test_a_cached_classify_hashes_nothing_once_the_files_have_settled(random_weights_dir, isolated_home,
                                                                        test_images, count_hashes):
    photo = str(test_images["rgb_jpeg"])
    assert run("download", "S", "--from", str(random_weights_dir / FILE)).exit_code == 0
    first = run("classify", photo, "--json", "--engine", "onnxruntime")  # converts, keeps the optimised graph
    assert first.exit_code == 0, first.output
    kept = [p for folder in ("weights", "onnx") for p in (isolated_home / folder).rglob("*")
            if p.suffix in (".pdparams", ".onnx", ".ort")]  # (openvino/ holds OpenVINO's own copy)
    assert sorted(p.suffix for p in kept) == [".onnx", ".ort", ".pdparams"]
    for path in kept:
        settle(path)
    count_hashes.clear()
    assert run("classify", photo, "--json", "--engine", "onnxruntime").stdout == first.stdout
    assert sorted(p.suffix for p in count_hashes) == [".onnx", ".ort", ".pdparams"]  # their stat changed
    count_hashes.clear()
    assert run("classify", photo, "--json", "--engine", "onnxruntime").stdout == first.stdout
    assert count_hashes == []

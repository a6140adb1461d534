"""`mixnet cache list|path|rm|clear`, and a read-only cache that still serves what it holds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner, Result

from mixnet_cli.cli import main

FILE = "MixNet_S_pretrained.pdparams"


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input)


@pytest.fixture
def cached(random_mirror, isolated_home: Path) -> Path:
    """The cache after `mixnet download S`: returns the weights file."""
    result = run("download", "S")
    assert result.exit_code == 0, result.output
    return isolated_home / "weights" / FILE


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


def test_list_of_an_empty_cache(isolated_home):
    table = run("cache", "list")
    assert table.exit_code == 0 and table.stdout == ""
    assert f"Nothing cached in {isolated_home}" in table.stderr
    assert run("cache", "list", "--json").stdout == "[]\n"
    assert run("cache", "list", "--jsonl").stdout == ""


def test_a_cache_directory_that_is_a_file_is_said_not_listed_as_empty(tmp_path, monkeypatch):
    """MIXNET_HOME naming a file: list, rm and clear say so in one line and fail (list said "Nothing cached")."""
    home = tmp_path / "home"
    home.write_text("a file, not the cache")
    monkeypatch.setenv("MIXNET_HOME", str(home))
    for command in (["cache", "list"], ["cache", "list", "--json"], ["cache", "rm", "S"], ["cache", "clear", "--yes"]):
        result = run(*command)
        assert result.exit_code == 1, (command, result.output)
        assert result.stdout == "" and result.stderr == (f"Error: the cache directory {home} is a file, not a "
                                                         "directory; set MIXNET_HOME to a directory\n")
    assert home.read_text() == "a file, not the cache"


def test_list_shows_each_file_with_its_checksum_source_and_status(cached, random_mirror, isolated_home):
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    rows = json.loads(run("cache", "list", "--json").stdout)
    assert rows == [{
        "kind": "weights", "model": "MixNet_S", "architecture": "MixNet_S", "status": "verified", "size": cached.stat().st_size, "sha256": digest,
        "source": f"{random_mirror.url}/{FILE}", "fetched_at": rows[0]["fetched_at"], "path": str(cached),
    }]
    table = run("cache", "list").stdout.splitlines()
    assert table[0].split() == ["model", "architecture", "kind", "status", "size", "sha256", "source", "fetched_at"]
    assert table[1].split()[:6] == ["MixNet_S", "MixNet_S", "weights", "verified", str(cached.stat().st_size), digest]
    assert json.loads(run("cache", "list", "--jsonl").stdout) == rows[0]

    # a partial download and a changed file are shown for what they are
    (cached.parent / (FILE + ".part")).write_bytes(b"x" * 1234)
    cached.write_bytes(cached.read_bytes() + b"!")
    rows = json.loads(run("cache", "list", "--json").stdout)
    assert [(r["status"], r["size"]) for r in rows] == [("corrupt", cached.stat().st_size), ("partial", 1234)]
    assert run("cache", "list").exit_code == 0


def test_a_file_placed_by_hand_is_listed_unverified_until_first_use(cached, isolated_home):
    (cached.parent / (FILE + ".json")).unlink()
    assert json.loads(run("cache", "list", "--json").stdout)[0]["status"] == "unverified"
    assert run("download", "S", "--offline").exit_code == 0  # verified in full, then adopted
    row = json.loads(run("cache", "list", "--json").stdout)[0]
    assert row["status"] == "verified" and row["source"] == f"file:{cached}"


def test_path_prints_the_cache_and_a_models_file(isolated_home):
    assert run("cache", "path").stdout == f"{isolated_home}\n"
    assert run("cache", "path", "S").stdout == f"{isolated_home / 'weights' / FILE}\n"
    assert run("cache", "path", "XL").exit_code == 2


def test_rm_deletes_one_models_files_and_nothing_else(cached, isolated_home):
    weights = cached.parent
    (weights / (FILE + ".part")).write_bytes(b"partial")
    (weights / "my-notes.txt").write_text("mine")
    result = run("cache", "rm", "S")
    assert result.exit_code == 0, result.output
    assert "MixNet_S: removed 3 file(s)" in result.stderr
    assert names(weights) == {"my-notes.txt"}  # its lock file went when `rm` let go of it
    assert "nothing cached" in run("cache", "rm", "S").stderr
    assert run("cache", "rm", "XL").exit_code == 2


def test_rm_refuses_while_another_process_downloads_that_file(cached):
    from filelock import FileLock

    with FileLock(str(cached.parent / (FILE + ".lock"))):
        result = run("cache", "rm", "S")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: another mixnet process is downloading")
    assert cached.is_file()


def test_clear_asks_first_and_deletes_only_the_caches_own_files(cached, isolated_home):
    weights = cached.parent
    others = [isolated_home / "notes.txt", weights / "MixNet_S_pretrained.pdparams.bak", isolated_home / "onnx" / "x"]
    for path in others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not the cache's")

    no = run("cache", "clear", input="n\n")
    assert no.exit_code == 1 and "Nothing deleted" in no.stderr
    assert cached.is_file()

    yes = run("cache", "clear", input="y\n")
    assert yes.exit_code == 0, yes.output
    # one model: its weights and record
    assert "Delete the weights of 1 model(s) (2 file(s), records included) and 0 converted-model folder(s)" \
        in yes.stderr
    assert names(weights) == {"MixNet_S_pretrained.pdparams.bak"}
    assert all(path.read_text() == "not the cache's" for path in others)

    empty = run("cache", "clear")
    assert empty.exit_code == 0 and "Nothing to delete" in empty.stderr


def test_clear_without_a_terminal_to_ask_says_to_pass_yes(cached):
    completed = subprocess.run([sys.executable, "-m", "mixnet_cli", "cache", "clear"], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr.splitlines()[-1] == (
        "Error: cache clear needs confirmation, and stdin ended without an answer (nothing was deleted); pass --yes "
        "to delete without asking (see `mixnet cache clear --help`)")
    assert "Aborted" not in completed.stderr and "Traceback" not in completed.stderr
    assert cached.is_file()


def test_a_lock_file_a_killed_process_left_is_deleted_and_never_counted_as_weights(cached, isolated_home):
    from test_locks import held_in_another_process, kill

    lock = cached.parent / (FILE + ".lock")
    kill(held_in_another_process(lock))
    assert lock.is_file()
    assert [row["path"] for row in json.loads(run("cache", "list", "--json").stdout)] == [str(cached)]

    no = run("cache", "clear", input="n\n")
    assert "Delete the weights of 1 model(s) (2 file(s), records included), 1 lock file(s) and 0 converted-model " \
        "folder(s)" in no.stderr
    assert lock.is_file()
    assert run("cache", "rm", "M").stderr == "MixNet_M: nothing cached\n"
    result = run("cache", "rm", "S")
    assert result.exit_code == 0, result.output
    assert "MixNet_S: removed 3 file(s)" in result.stderr  # weights, record, and the lock
    assert not lock.exists()


def test_clear_deletes_a_conversions_lock_file_only_when_nobody_holds_it(isolated_home):
    from mixnet_cli.base.locks import file_lock

    onnx = isolated_home / "onnx"
    onnx.mkdir(parents=True)
    stale, held = onnx / f".{'a' * 64}.lock", onnx / f".{'b' * 64}.lock"
    stale.touch()
    holder = file_lock(held)
    holder.acquire()
    try:
        assert run("cache", "clear", "--yes").exit_code == 0
        assert not stale.exists()
        assert held.is_file(), "a converting process still holds it"
    finally:
        holder.release()
    assert not held.exists()


def test_clear_yes_does_not_ask_and_removes_the_empty_weights_directory(cached, isolated_home):
    result = run("cache", "clear", "--yes")
    assert result.exit_code == 0, result.output
    assert not (isolated_home / "weights").exists()
    assert isolated_home.is_dir(), "the cache root itself is left alone"


# --- a read-only cache -------------------------------------------------------------------------------------------

@pytest.fixture
def read_only(tmp_path: Path) -> Iterator:
    """``read_only(directory)`` returns a path where ``directory`` can be read but not written.

    As root, file modes do not stop writes, so a read-only bind mount is used; otherwise the modes are removed.
    """
    undo: list = []

    def make(directory: Path) -> Path:
        if os.geteuid() != 0:
            for path in [directory, *directory.rglob("*")]:
                mode = path.stat().st_mode
                undo.append(lambda p=path, m=mode: p.chmod(m))
                path.chmod(mode & ~0o222)
            return directory
        view = tmp_path / "read-only-view"
        view.mkdir()
        bind = subprocess.run(["mount", "--bind", str(directory), str(view)], capture_output=True, text=True)
        if bind.returncode != 0:
            pytest.skip(f"root ignores file modes, and a read-only bind mount failed: {bind.stderr.strip()}")
        undo.append(lambda: subprocess.run(["umount", "-l", str(view)], check=False))
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], capture_output=True, text=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot make a read-only bind mount: {ro.stderr.strip()}")
        probe = view / ".probe"
        try:
            probe.write_text("x")
        except OSError:
            return view
        probe.unlink()
        pytest.skip("the read-only bind mount is still writable here")

    yield make
    for action in reversed(undo):
        action()


def test_a_read_only_cache_still_serves_what_it_holds(cached, isolated_home, read_only, monkeypatch, tmp_path):
    from PIL import Image

    (cached.parent / (FILE + ".json")).unlink()  # also a file that must be verified and cannot be recorded
    view = read_only(isolated_home)
    monkeypatch.setenv("MIXNET_HOME", str(view))
    monkeypatch.delenv("MIXNET_MIRROR")  # nothing may be fetched

    assert run("download", "S").exit_code == 0
    assert json.loads(run("cache", "list", "--json").stdout)[0]["status"] == "unverified"
    image = tmp_path / "grey.png"
    Image.new("RGB", (64, 48), (120, 130, 140)).save(image)
    # Nothing can be converted into a read-only cache: the network is built in memory for this run.
    classified = run("classify", str(image), "--json", "-v")
    assert classified.exit_code == 0, classified.output
    assert len(json.loads(classified.stdout)[0]["predictions"]) == 5

    missing = run("download", "M", "--mirror", "http://127.0.0.1:9")
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    line = missing.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: cannot lock") and "read-only" in line and "MIXNET_HOME" in line
    removed = run("cache", "rm", "S")
    assert removed.exit_code == 1 and "Error: cannot" in removed.stderr
    assert (view / "weights" / FILE).is_file()


def test_openvinos_folder_of_your_own_weights_is_listed_with_their_model(tmp_path, random_weights_dir, isolated_home):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(image)
    weights = random_weights_dir / FILE
    # Your own weights are not in the cache: only the converted folders' records can say which model they hold.
    assert run("classify", str(image), "--weights", str(weights), "--json").exit_code == 0
    rows = json.loads(run("cache", "list", "--json").stdout)
    assert {row["kind"] for row in rows} >= {"onnx", "openvino"}, rows
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    # Named by the weights (file stem, sha256 prefix), their architecture beside.
    assert all((row["model"], row["architecture"]) == (f"MixNet_S_pretrained-{sha256[:7]}", "MixNet_S")
               and Path(row["path"]).name == sha256 for row in rows), rows
    assert [f"MixNet_S_pretrained-{sha256[:7]}", "MixNet_S", "openvino"] in \
        [line.split()[:3] for line in run("cache", "list").stdout.splitlines()]


def test_converted_models_are_listed_and_removed_with_their_weights(tmp_path, random_mirror, isolated_home):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(image)
    runner = CliRunner()
    assert runner.invoke(main, ["classify", str(image), "--json"]).exit_code == 0
    rows = json.loads(runner.invoke(main, ["cache", "list", "--json"]).stdout)
    kinds = {row["kind"] for row in rows}
    assert "weights" in kinds and kinds - {"weights"}, "the engine's converted model is listed"
    assert {row["model"] for row in rows} == {"MixNet_S"}
    assert runner.invoke(main, ["cache", "rm", "S"]).exit_code == 0
    assert json.loads(runner.invoke(main, ["cache", "list", "--json"]).stdout) == []
    # No lock file either: the download's and the conversion's went with their holders.
    leftovers = [p for p in isolated_home.rglob("*") if p.is_file() and "-home" not in str(p.relative_to(isolated_home))]
    assert leftovers == []
    assert runner.invoke(main, ["cache", "clear", "--yes"]).exit_code == 0
    assert [p for p in isolated_home.rglob("*") if p.is_file()] == []

"""The cache's file lock (mixnet_cli.base.locks): one holder at a time, and no lock file left once the holder is done,
checked with real processes contending on one lock.

The contention test fails for a lock that deletes its file on release without the inode check on acquiring, with
filelock 3.12 (the oldest this project allows; later filelock releases drop a lock on a deleted file themselves).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mixnet_cli.base.locks import file_lock

# Each worker takes the lock ROUNDS times and, holding it, appends "start <pid>" and "end <pid>" to a shared log
# with a pause between: two holders at once show as interleaved lines. Polling every millisecond keeps waiters
# opening the lock file all the time, which is when a holder deleting it can split them.
WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from mixnet_cli.base.locks import file_lock

    lock_file, log, rounds, go = sys.argv[1:]
    while not os.path.exists(go):  # all start together
        time.sleep(0.001)
    for _ in range(int(rounds)):
        lock = file_lock(Path(lock_file))
        lock.acquire(poll_interval=0.001)
        try:
            with open(log, "a") as out:
                out.write(f"start {os.getpid()}\\n")
            time.sleep(0.0005)
            with open(log, "a") as out:
                out.write(f"end {os.getpid()}\\n")
        finally:
            lock.release()
""")
WORKERS = 6
ROUNDS = 60


def test_contending_processes_never_hold_the_lock_together_and_leave_no_file(tmp_path: Path) -> None:
    lock_file, log, go = tmp_path / "weights" / "x.lock", tmp_path / "log", tmp_path / "go"
    lock_file.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(lock_file), str(log), str(ROUNDS), str(go)], env=env,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(WORKERS)
    ]
    try:
        time.sleep(0.5)  # let every worker start and wait for the signal
        go.touch()
        errors = [worker.communicate(timeout=120)[1] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [worker.returncode for worker in workers] == [0] * WORKERS, errors
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * WORKERS * ROUNDS
    for index in range(0, len(lines), 2):
        start, end = lines[index], lines[index + 1]
        assert start.startswith("start ") and end == "end " + start.split()[1], (
            f"two holders at once: lines {index}-{index + 1} of the log are {start!r}, {end!r}")
    assert not lock_file.exists()


def test_the_file_goes_when_the_holder_lets_go_and_is_made_again_by_the_next(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    lock = file_lock(path)
    with lock:
        assert path.is_file()
        with lock:  # reentrant, as filelock's: the inner release keeps it
            pass
        assert path.is_file()
    assert not path.exists()
    with file_lock(path):
        assert path.is_file()
    assert not path.exists()


def held_in_another_process(path: Path) -> subprocess.Popen[str]:
    """A process that holds the lock on ``path`` (returned once it does) until it is killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from mixnet_cli.base.locks import file_lock;"
         "lock = file_lock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); time.sleep(60)", str(path)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def kill(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait()


def test_a_file_left_by_a_killed_holder_is_taken_then_deleted(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    holder = held_in_another_process(path)
    try:
        from filelock import Timeout

        with pytest.raises(Timeout):
            file_lock(path).acquire(timeout=0)
    finally:
        kill(holder)
    assert path.is_file(), "a killed process cannot delete its lock file"
    with file_lock(path):
        pass
    assert not path.exists()

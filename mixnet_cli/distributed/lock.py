"""The one job that may write into an output directory: an OS lock on a local folder, a record with a heartbeat
on object storage, and the record that names the job holding it."""

from __future__ import annotations

import datetime
import getpass
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..base.errors import MixnetError, UsageError

_log = logging.getLogger(__name__)


# The job that owns an output folder: a lock file (local folders: an OS lock that dies with its process) and a
# record of the job (run id, host, pid, start, heartbeat) that a refused second job names. Both hidden names,
# which Parquet readers skip.
LOCK_NAME = ".mixnet-job.lock"
JOB_RECORD_NAME = ".mixnet-job.json"
# On object storage (no OS lock) the record is the lock: its holder rewrites it every HEARTBEAT_S seconds, and a
# record older than STALE_AFTER_S is taken over (its job is presumed dead).
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class JobLock:
    """The one job that may write into an output directory.

    A local directory: an OS lock on a hidden file in it (:func:`~mixnet_cli.base.locks.file_lock`, the cache's
    discipline: it dies with its process, even on SIGKILL, and its file goes with its holder), and a record beside it
    naming the job (run id, host, pid, start) for the job that is refused. A URI (object storage has no lock): the
    record is the lock; its holder rewrites it every ``heartbeat_s`` seconds from a thread, and a record whose
    heartbeat is older than ``stale_after_s`` is taken over, said in a warning. Two jobs starting within the same
    instant on object storage can both write their record; each reads it back and the one whose record is not there
    stops, so at most one goes on (the store's last write wins). Heartbeats are compared with this machine's clock.
    """

    def __init__(self, filesystem: Any, root: str, out: str, run: str, *, local: bool,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> None:
        self.filesystem = filesystem
        self.root = root
        self.out = out
        self.run = run
        self.local = local
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.record_path = f"{root}/{JOB_RECORD_NAME}"
        self.started_at = _now_iso()
        self.lost = False  # set by the heartbeat when another job took the record over
        self._lock: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"run": self.run, "host": socket.gethostname(), "pid": os.getpid(), "user": _user(),
                "started_at": self.started_at, "heartbeat": time.time()}

    def _read_record(self) -> dict[str, Any] | None:
        try:
            with self.filesystem.open_input_stream(self.record_path) as stream:
                return json.loads(stream.read().decode("utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        except OSError as exc:
            if "not found" in str(exc).lower() or "no such" in str(exc).lower():
                return None
            raise

    def _write_record(self) -> None:
        data = json.dumps(self._record()).encode("utf-8")
        if self.local:  # a reader never sees half a record
            temporary = f"{self.root}/.{JOB_RECORD_NAME}.{secrets.token_hex(4)}.tmp"
            with self.filesystem.open_output_stream(temporary) as stream:
                stream.write(data)
            self.filesystem.move(temporary, self.record_path)
        else:  # an object is replaced whole
            with self.filesystem.open_output_stream(self.record_path) as stream:
                stream.write(data)

    def _refusal(self, holder: dict[str, Any] | None) -> UsageError:
        if holder:
            who = (f"run {holder.get('run', '?')}, pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                   f"started {holder.get('started_at', '?')}")
        else:
            who = "a job that has not written its record yet"
        return UsageError(f"-o {self.out}: another classify-dataset job is writing there ({who}); wait for it to "
                          "finish, or choose another directory")

    def acquire(self) -> None:
        """Take the directory, or raise :class:`UsageError` naming the job that holds it."""
        if self.local:
            import filelock

            from ..base.locks import file_lock

            self._lock = file_lock(Path(self.root) / LOCK_NAME)
            try:
                self._lock.acquire(timeout=0)
            except filelock.Timeout:
                self._lock = None
                raise self._refusal(self._read_record()) from None
            self._write_record()
            return
        holder = self._read_record()
        if holder and holder.get("run") != self.run:
            age = time.time() - float(holder.get("heartbeat", 0))
            if age < self.stale_after_s:
                raise self._refusal(holder)
            _log.warning("-o %s: taking over from run %s, whose last heartbeat is %.0f s old", self.out,
                         holder.get("run"), age)
        self._write_record()
        time.sleep(min(1.0, self.heartbeat_s / 10))  # a job that wrote at the same instant has written by now
        holder = self._read_record()
        if not holder or holder.get("run") != self.run:
            raise self._refusal(holder)
        self._thread = threading.Thread(target=self._beat, name="mixnet-job-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._read_record()
                if holder and holder.get("run") != self.run:
                    self.lost = True
                    return
                self._write_record()
            except OSError as exc:  # a passing storage error: the next beat tries again
                _log.warning("-o %s: cannot renew the job record (%s)", self.out, exc)

    def check(self) -> None:
        """Raise :class:`MixnetError` when another job has taken the directory over (object storage only)."""
        if self.lost:
            raise MixnetError(f"-o {self.out}: another job took this directory over (this job's heartbeat was "
                              "late); stopped, keeping the parts written")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            holder = self._read_record()
            if holder and holder.get("run") == self.run:
                self.filesystem.delete_file(self.record_path)
        except OSError:
            pass
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"

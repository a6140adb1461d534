"""Files written one way: a temporary name beside the target, then one rename, so that no reader ever sees half a
file; and one way to hash a file.

Temporary names are unique per process, thread and call (``.<name>.<pid>.<thread>.<random>.tmp``), so threads of
one process (the OpenVINO engine's runners, a future service) never write into each other's files. A failed
write removes its temporary file and leaves the target as it was. (After pooch's ``utils.temporary_file`` and
``hashes.file_hash``, and huggingface_hub's download-to-temporary-then-move.) Also the check, before any work,
that an output directory can be written (``export -o``, ``classify --cam``).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import UsageError

_HASH_CHUNK = 1 << 20
TEMPORARY_SUFFIX = ".tmp"


def temporary_path(target: Path, what: str = "") -> Path:
    """A fresh hidden name beside ``target`` for a file written then renamed onto it (``what`` tells readers of
    a directory listing what was being written)."""
    return target.with_name(
        f".{target.name}{what}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
    )


@contextmanager
def atomic_write(target: Path, mode: str = "wb", *, fsync: bool = False, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``target`` for writing; on a clean exit it replaces ``target`` in one rename,
    on an exception it is removed and ``target`` is untouched. ``fsync=True`` flushes the data to disk before the
    rename (for files a crash must not leave empty under their final name, such as downloaded weights' records).
    Raises ``OSError`` from the filesystem."""
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    tmp = temporary_path(target)
    try:
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as stream:
            yield stream
            if fsync:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(target: Path, data: bytes, *, fsync: bool = False) -> None:
    """``target`` holds exactly ``data``, written atomically (see :func:`atomic_write`)."""
    with atomic_write(target, "wb", fsync=fsync) as stream:
        stream.write(data)


def write_text(target: Path, text: str, *, fsync: bool = False) -> None:
    """``target`` holds exactly ``text`` (UTF-8), written atomically (see :func:`atomic_write`)."""
    with atomic_write(target, "w", fsync=fsync) as stream:
        stream.write(text)


def file_sha256(path: Path) -> str:
    """The sha256 of the file at ``path`` as 64 lowercase hex digits, read in 1 MiB chunks. Raises ``OSError``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# A stamp vouches for a file only when it was taken this long after the file's last change: file systems keep
# modification times in ticks (a few milliseconds on ext4, a second on some, two on FAT), so a write in the same
# tick as the one stamped would leave the time unchanged; a stamp taken later than any tick cannot miss a write
# that follows it. A file stamped sooner (just written) is hashed once more on its next use, then stamped again.
_SETTLED_NS = 2_000_000_000


def stat_stamp(path: Path) -> dict[str, int]:
    """What identifies the file at ``path`` without reading it, taken just before it is hashed: ``size`` (bytes),
    ``mtime_ns``, ``inode``, and ``taken_ns`` (when, in ns since the epoch). Kept beside the file's sha256 in its
    record, so that later uses can skip the hash while the file is provably unchanged (:func:`stamp_vouches`).
    Raises ``OSError``."""
    taken_ns = time.time_ns()
    status = os.stat(path)
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "inode": status.st_ino, "taken_ns": taken_ns}


def stamp_vouches(path: Path, recorded: Any) -> bool:
    """Whether the file at ``path`` is, by its size, modification time and inode, the one whose hash was checked
    when ``recorded`` (a :func:`stat_stamp`, or anything else read from a record) was taken; False for a stamp
    taken within two seconds of the file's last change (see ``_SETTLED_NS``), a missing file or a malformed stamp.

    What it cannot see: a change in place that keeps the size and sets the modification time back (``touch -d``,
    ``os.utime``), which only a full hash finds (``MIXNET_VERIFY=always``)."""
    if not isinstance(recorded, dict):
        return False
    try:
        size, mtime_ns, inode, taken_ns = (int(recorded[key]) for key in ("size", "mtime_ns", "inode", "taken_ns"))
        status = os.stat(path)
    except (KeyError, TypeError, ValueError, OSError):
        return False
    same = (status.st_size, status.st_mtime_ns, status.st_ino) == (size, mtime_ns, inode)
    return same and taken_ns - mtime_ns >= _SETTLED_NS


def copy_hashing(source: Path, destination: Path) -> tuple[int, str]:
    """Copy ``source`` to the new file ``destination`` (which must not exist) in one read, returning its size in
    bytes and sha256: the bytes hashed are the bytes written. Raises ``OSError`` (``FileExistsError`` too)."""
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src, open(destination, "xb") as out:
        while chunk := src.read(_HASH_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def adopt_directory(finished: Path, target: Path) -> None:
    """Give a directory built under a temporary name (``finished``) its final name ``target``, in one rename:
    readers see all of it or none. ``target`` must not exist. Raises ``OSError``."""
    os.rename(finished, target)


def kind_of_file(path: Path) -> str:
    """What is at ``path``, in words, for a message saying it is in the way."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a broken symbolic link"
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a file"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")]
    return next((words for test, words in kinds if test(mode)), "not a file")


def check_output_directory(out_dir: Path, option: str = "-o", what: str = "the model") -> None:
    """Raise :class:`UsageError` when ``out_dir`` (given as ``option``, to hold ``what``) can never be written:
    it is not a directory, the nearest of its parents that exists is not one (nothing can be created under it),
    or no directory can be made in that one. Called before the weights are fetched or anything converted, so a
    bad ``-o`` (export) or ``--cam`` (classify) costs nothing."""
    nearest = Path(os.path.abspath(out_dir))
    while not os.path.lexists(nearest) and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        if nearest == Path(os.path.abspath(out_dir)):
            raise UsageError(f"{option} {out_dir} is {kind_of_file(nearest)}, not a directory; give a directory to "
                             f"write {what} into (it is created if needed)")
        raise UsageError(f"{option} {out_dir}: {nearest} is {kind_of_file(nearest)}, not a directory, so nothing "
                         f"can be created under it; choose another {option}")
    # A directory made and removed there: finds what permissions alone do not (/proc, a read-only mount, root)
    try:
        tempfile.TemporaryDirectory(dir=nearest, prefix=".mixnet-probe-").cleanup()
    except OSError as exc:
        raise UsageError(f"{option} {out_dir}: {nearest} is not writable ({exc.strerror or exc}); choose a "
                         f"writable directory with {option}") from None

"""The file lock of the cache: one process at a time holds it, and its file is gone once the holder is done.

filelock's Unix lock (``flock``) leaves its file behind on purpose: deleting a locked file while another process
waits on it can make two holders. The waiter has opened the old file and locks it once the holder lets go, while
a third process, finding no file at the path, creates a new one and locks that. Here the holder deletes the file
and the waiter copes, the usual way: after locking, a holder checks that the file it locked is still the one at
the path (same inode) and otherwise lets go and tries again; on release the holder deletes the path while still
holding the lock, then unlocks. Any process that locked the old file then sees it is no longer at the path.

Everything else (the timeout, the polling, reentrancy, threads) is filelock's. Where ``flock`` is missing
(Windows, or a platform without ``fcntl``) filelock's own lock for the platform is used as it is: Windows' and
the soft lock both delete their file on release already.
"""

from __future__ import annotations

import atexit
import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from filelock import BaseFileLock

# The lock files this process holds. An exit that skips the releases (a download thread still running when the
# interpreter ends, or Ctrl-C's os._exit) would leave them behind; the OS drops the locks themselves, and
# deleting a file its holder holds is the release this module makes anyway.
_HELD: set[str] = set()


def delete_held_lock_files() -> None:
    """Delete the files of the locks this process holds, for an exit that will not release them (run at
    interpreter exit, and called before ``os._exit``)."""
    for path in list(_HELD):
        try:
            os.unlink(path)
        except OSError:
            pass
        _HELD.discard(path)


atexit.register(delete_held_lock_files)


def file_lock(path: Path) -> BaseFileLock:
    """A lock on ``path`` that deletes ``path`` when released (see the module's docstring).

    ``acquire(timeout=...)`` and ``release()`` are filelock's: a lock held elsewhere past the timeout raises
    ``filelock.Timeout``; a directory where the file cannot be created raises ``OSError``.
    """
    return _lock_class()(str(path))


@cache
def _lock_class() -> type[BaseFileLock]:
    import filelock

    if filelock.FileLock is not filelock.UnixFileLock:
        return filelock.FileLock

    class RemovingFileLock(filelock.UnixFileLock):
        # filelock calls _acquire until it leaves a descriptor in _context.lock_file_fd (polling, up to the
        # timeout), and _release to let go of it: the two places a backend fills in.

        def _acquire(self) -> None:
            try:
                super()._acquire()
            except FileNotFoundError:
                # The holder deleted the file between filelock's look and its open, or a `cache clear` removed
                # the emptied folder: not acquired, try again (with the folder back).
                Path(self.lock_file).parent.mkdir(parents=True, exist_ok=True)
                return
            fd = self._context.lock_file_fd
            if fd is not None and not self._soft() and not _is_at(fd, self.lock_file):
                # Locked a file its holder has since deleted: whoever locks the path's file now also holds
                # "the" lock. Let go; the next attempt opens what is at the path.
                super()._release()
            elif fd is not None and not self._soft():
                _HELD.add(self.lock_file)

        def _release(self) -> None:
            _HELD.discard(self.lock_file)
            fd = self._context.lock_file_fd
            if fd is not None and not self._soft() and _is_at(fd, self.lock_file):
                try:
                    # Deleted while still locked: a waiter that locks the old file next sees it is gone.
                    os.unlink(self.lock_file)
                except OSError:
                    pass  # left in place (a folder that is not writable): harmless, as before
            super()._release()

        def _soft(self) -> bool:
            # filelock 4 falls back to a marker file on filesystems without flock; its release deletes it.
            return bool(getattr(self._context, "soft_fallback", False))

    return RemovingFileLock


def _is_at(fd: int, path: str) -> bool:
    """Whether the open file ``fd`` is the file at ``path`` now (a deleted path is not)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False

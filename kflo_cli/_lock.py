"""Directory locks that die with their process: one kflo process at a time in a run directory.

The lock is an OS lock (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows) on ``DIR/.kflo.lock``, taken
without waiting. The kernel drops it when its process ends, however it ends (``kill -9``, a crash, a power cut of
the process), so a lock is never stale: a leftover ``.kflo.lock`` file is simply taken over. The file holds the
holder's pid, host and command, so a refused process can say who holds the directory. Where the file system cannot
lock (some network or FUSE mounts), the directory is used unlocked with one warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .errors import KfloError

#: The lock file inside a locked directory (not a run file: ``--overwrite`` and the emptiness checks ignore it).
LOCK_FILE = ".kflo.lock"

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
try:  # Windows
    import msvcrt
except ImportError:
    msvcrt = None  # type: ignore[assignment]

# msvcrt locks a byte range and blocks reads of it, so the lock byte lies past the holder record.
_WINDOWS_LOCK_OFFSET = 1 << 20


def try_flock(fd: int) -> bool | None:
    """Take an exclusive lock on ``fd`` without waiting: True (taken), False (another process holds it), None (this
    platform or file system cannot lock)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:
            return None
    if msvcrt is not None:  # pragma: no cover - Windows
        try:
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    return None  # pragma: no cover


def _holder_text(path: Path) -> str:
    """Who holds the lock at ``path``, from its record: 'process 123 on host (kflo train, since ...)'."""
    try:
        info = json.loads(path.read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another kflo process"
    what = ", ".join(str(x) for x in (info.get("command"), info.get("since") and f"since {info['since']}") if x)
    return f"process {pid} on {host}" + (f" ({what})" if what else "")


def _record() -> bytes:
    command = " ".join(["kflo", *sys.argv[1:3]]) if sys.argv else "kflo"
    return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                        "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n").encode()


class DirLock:
    """An exclusive lock on a directory, held until :meth:`release` (or the process ends)."""

    def __init__(self, directory: Path, fd: int | None) -> None:
        self.directory, self.path, self._fd = directory, directory / LOCK_FILE, fd

    @classmethod
    def acquire(cls, directory: str | os.PathLike, *, hint: str = "choose another -o") -> "DirLock":
        """Lock ``directory`` (which must exist) or raise :class:`KfloError` naming the process that holds it."""
        from ._atomic import write_error

        directory = Path(directory)
        path = directory / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise write_error(path, exc) from None
            taken = try_flock(fd)
            if taken is None:
                os.close(fd)
                warnings.warn(f"{directory} cannot be locked on this file system; make sure no other kflo process "
                              "uses it at the same time", stacklevel=2)
                return cls(directory, None)
            if not taken:
                os.close(fd)
                raise KfloError(f"{directory} is in use by {_holder_text(path)}; wait for it to end or {hint}")
            # A holder removes the file when it releases; if that happened between our open and our lock, the
            # file we locked is no longer the directory's lock file: try again on the new one.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(path))
            except OSError:
                current = False
            if current:
                break
            os.close(fd)
        with contextlib.suppress(OSError):  # the record is for messages only; a full disk does not stop the lock
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, _record())
        return cls(directory, fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (in that order, so nobody locks a file about to vanish)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if fcntl is not None:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    self.path.unlink()
            os.close(fd)
        else:  # pragma: no cover - Windows: an open file cannot be removed; unlocking happens on close
            os.close(fd)
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def try_lock(directory: str | os.PathLike) -> DirLock | None:
    """Lock ``directory`` if no other process holds it (a :class:`DirLock`), else ``None``; ``None`` too where
    locking is not possible, so callers that delete what they lock never delete a directory in use."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    if try_flock(fd):
        return DirLock(Path(directory), fd)
    os.close(fd)
    return None


__all__ = ["DirLock", "LOCK_FILE", "try_flock", "try_lock"]

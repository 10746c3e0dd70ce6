"""Atomic file writes: write into a private temporary folder beside the target, then rename over it.

Every file kflo writes goes through :func:`atomic_path`. The temporary folder ``.NAME.XXXXXXXX.tmp`` (next to the
target ``NAME``) also catches the temporary files the writing libraries make themselves (safetensors writes
``.tmpXXXXXX`` beside the path it is given and renames it), so a write killed with ``kill -9`` leaves exactly one
folder behind. The writing process holds an OS lock on that folder; a later write of the same target removes such
leftovers when no live process holds them and they are older than the current process (:func:`remove_stale_temps`).

A write that fails for an OS reason (disk full, read-only file system, no permission, an immutable file) raises one
:class:`~kflo_cli.errors.KfloError` sentence naming the file, the reason and the fix (:func:`write_error`); the old
file is left intact and no temporary file remains.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from ._lock import try_flock
from .errors import KfloError

#: When this module was imported (about when the process started): temporary folders older than this and held by
#: no process are leftovers of an interrupted write.
STARTED = time.time()
_SUFFIX = ".tmp"
#: tempfile's random part: 8 characters, never a dot (so ``.a.`` does not match the temporaries of ``a.b``).
_RANDOM = re.compile(r"[a-z0-9_]{8}")
#: errno in the message of a safetensors error ("... (os error 28)" or "IoError(Os { code: 28, ...").
_RUST_ERRNO = re.compile(r"os error (\d+)|code: (\d+)")

_HINTS = {
    errno.ENOSPC: "free space or choose another -o",
    errno.EDQUOT: "free space (the disk quota is full) or choose another -o",
    errno.EROFS: "choose another -o on a writable file system",
    errno.EACCES: "check the permissions of the file and its folder or choose another -o",
    errno.EPERM: "check the file's permissions and attributes (lsattr: immutable?) or choose another -o",
    errno.EFBIG: "the file is larger than this file system or ulimit -f allows; choose another -o",
}


def os_error(exc: BaseException) -> OSError | None:
    """The OS-level failure behind ``exc``: an ``OSError`` itself, or a safetensors error about one."""
    if isinstance(exc, OSError):
        return exc
    if type(exc).__name__ == "SafetensorError":
        match = _RUST_ERRNO.search(str(exc))
        if match:
            code = int(match.group(1) or match.group(2))
            return OSError(code, os.strerror(code))
    return None


def write_error(path: str | os.PathLike, exc: OSError) -> KfloError:
    """One sentence for an OS failure writing ``path``: 'cannot write X: No space left on device; free space ...'."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = _HINTS.get(exc.errno or 0, "choose another -o")
    return KfloError(f"cannot write {path}: {reason}; {hint}")


def _is_temp_of(name: str, target_name: str) -> bool:
    prefix = f".{target_name}."
    return (name.startswith(prefix) and name.endswith(_SUFFIX)
            and _RANDOM.fullmatch(name[len(prefix) : -len(_SUFFIX)]) is not None)


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove what interrupted writes of ``target`` left beside it (``.NAME.XXXXXXXX.tmp``); return what was removed.

    A leftover is removed only when it is older than this process and no live process holds its lock (the writer
    of a temporary folder locks it until the rename). Where locks are not available nothing is removed: the
    leftovers are then only ignored (nothing reads them). Never raises.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    removed: list[Path] = []
    try:
        entries = [e for e in os.scandir(parent) if _is_temp_of(e.name, target.name)]
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= STARTED:
                continue
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if try_flock(fd) is not True:  # a live writer, or no way to tell
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:  # a temporary file of an earlier kflo, which wrote files rather than folders
                path.unlink()
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _hold(folder: Path) -> int | None:
    """Lock the temporary folder while it is written (POSIX: an fd on the folder; elsewhere nothing)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    if try_flock(fd) is not True:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path on the target's file system; rename it onto ``path`` only if the block succeeds.

    A failure (or an interrupt) leaves no partial file behind and never touches an existing ``path``; an OS-level
    failure of the write (disk full, read-only, no permission) becomes one :class:`KfloError` (:func:`write_error`).
    """
    target = Path(path)
    if str(path) == "" or target.is_dir():
        raise KfloError(f"cannot write '{path}': it is a directory; pass a file path such as {target / 'out.safetensors'}")
    if target.exists() and not target.is_file():
        raise KfloError(f"cannot write {target}: it exists and is not a regular file (a device, socket or pipe); "
                        "choose a file path")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise KfloError(f"cannot write {target}: directory {parent} does not exist; create it or choose another -o path")
    remove_stale_temps(target)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_SUFFIX, dir=parent))
    except OSError as exc:
        raise write_error(target, exc) from None
    held = _hold(folder)
    tmp_path = folder / target.name
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # give the file the mode open() would have
        os.replace(tmp_path, target)
    except BaseException as exc:
        error = os_error(exc)
        if error is not None:
            raise write_error(target, error) from None
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if held is not None:
            os.close(held)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dirs(path: str | os.PathLike) -> Path | None:
    """``mkdir -p path``; return the topmost folder it created (``None``: ``path`` existed), for
    :func:`remove_made_dirs`. An OS failure is one :class:`KfloError` sentence."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise KfloError(f"{folder} is a file; -o takes a directory (choose another path)")
    if folder.is_dir():
        return None
    top = folder
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise KfloError(f"{folder} (or a folder above it) is a file; -o takes a directory (choose another path)") from None
    except OSError as exc:
        raise write_error(folder, exc) from None
    return top


def remove_made_dirs(path: str | os.PathLike, top: Path | None) -> None:
    """Remove ``path`` and its parents up to ``top`` (what :func:`make_dirs` created) while they are empty."""
    if top is None:
        return
    folder = Path(path)
    while True:
        try:
            folder.rmdir()
        except OSError:  # not empty: something was written
            return
        if folder == top or folder.parent == folder:
            return
        folder = folder.parent


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


__all__ = ["STARTED", "atomic_path", "make_dirs", "os_error", "remove_made_dirs", "remove_stale_temps", "write_error",
           "write_text_atomic"]

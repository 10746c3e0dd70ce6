"""Atomic file writes: write to a temporary file beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import KfloError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` only if the block succeeds.

    A failure (or an interrupt) leaves no partial file behind and never touches an existing ``path``.
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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise KfloError(f"cannot write {target}: {exc.strerror}; choose a writable output path") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)

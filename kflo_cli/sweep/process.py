"""One kflo train subprocess: the threads it may use, what the runner keeps about it, the last line of its stderr."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import KfloError
from .grid import Cell


def cpu_cores() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def plan_threads(jobs: int, threads: int | None, cores: int | None = None) -> int:
    """Threads per run so that jobs x threads <= cores (``threads`` given: checked)."""
    cores = cpu_cores() if cores is None else cores
    if jobs < 1:
        raise KfloError(f"--jobs {jobs} must be at least 1")
    if threads is not None and threads < 1:
        raise KfloError(f"--threads {threads} must be at least 1")
    if jobs > cores:
        raise KfloError(f"--jobs {jobs} is more than the {cores} CPU cores this process may use; use --jobs {cores} or fewer")
    if threads is None:
        return max(1, cores // jobs)
    if jobs * threads > cores:
        raise KfloError(f"--jobs {jobs} x --threads {threads} = {jobs * threads} threads exceed the {cores} CPU cores; "
                        f"lower one of them (e.g. --threads {max(1, cores // jobs)})")
    return threads


def _last_line(path: Path, offset: int) -> str:
    """The last non-empty line written to ``path`` after ``offset`` (this attempt's stderr)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class _Running:
    cell: Cell
    proc: subprocess.Popen
    started: float
    err_offset: int
    record: dict[str, Any]
    files: list[Any] = field(default_factory=list)


__all__ = ["cpu_cores", "plan_threads"]

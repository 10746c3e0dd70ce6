"""What a sweep does with each cell: inspect its run directory (finished, resumable, conflicting) and build its command."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import KfloError
from .grid import Cell, Grid, comma_list
from .rows import CELL_RECORD, config_differences, expected_config, read_json


@dataclass
class CellPlan:
    """What this invocation does with a cell: ``done`` (skip), ``resume``, ``start``; ``conflict`` explains a run
    directory trained with other settings."""

    cell: Cell
    action: str
    conflict: str | None = None


def inspect_cell(grid: Grid, cell: Cell, root: Path) -> CellPlan:
    """Decide from the run directory whether ``cell`` is finished, resumable or to be started."""
    run_dir = root / cell.relpath
    summary, state = run_dir / "summary.json", run_dir / "state.safetensors"
    if not summary.is_file() and not state.is_file():
        return CellPlan(cell, "start")
    saved = read_json(run_dir / "config.json")
    if saved is None:
        return CellPlan(cell, "start") if not summary.is_file() else CellPlan(cell, "conflict", "config.json is missing or damaged")
    differences = config_differences(expected_config(grid, cell), saved)
    if differences:
        return CellPlan(cell, "conflict", "; ".join(differences))
    return CellPlan(cell, "done" if summary.is_file() else "resume")


def _checkpoint(grid: Grid, cell: Cell, root: Path, *, deployed: bool) -> Path:
    """The file another cell takes from ``cell``'s finished run: the deployed model (a teacher) or the trained,
    still expanded one (a +Init first stage)."""
    run_dir = root / cell.relpath
    if deployed and (run_dir / "collapsed.safetensors").is_file():
        return run_dir / "collapsed.safetensors"
    config = read_json(run_dir / "config.json") or {}
    source = config.get("collapse_from", "last")
    name = {"ema": "ema.safetensors", "best": "best.safetensors"}.get(source, "last.safetensors")
    return run_dir / name


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def train_argv(grid: Grid, cell: Cell, root: Path, threads: int, *, action: str) -> list[str]:
    """The ``kflo train`` command line of ``cell`` (``action`` ``start`` or ``resume``)."""
    run_dir = (root / cell.relpath).resolve()
    base = [sys.executable, "-m", "kflo_cli", "train"]
    if action == "resume":
        return [*base, "--resume", str(run_dir)]
    options = grid.options(cell)
    options["threads"] = threads
    for kind, dep in grid.dependencies(cell):
        path = _checkpoint(grid, dep, root, deployed=kind == "teacher").resolve()
        options["teacher_checkpoint" if kind == "teacher" else "init_from_expanded"] = str(path)
    argv = [*base, options.pop("source"), "-o", str(run_dir), "--overwrite"]
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(_flag(key) if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list) and comma_list(key):
            argv += [_flag(key), ",".join(str(v) for v in value)]
        elif isinstance(value, list):
            for item in value:
                argv += [_flag(key), str(item)]
        else:
            argv += [_flag(key), str(value)]
    return argv


def still_running(root: Path, cell: Cell) -> int | None:
    """The pid of a ``kflo train`` process that is still training ``cell`` (left behind by a sweep that was killed
    without passing on the signal), or ``None``. Needs /proc (Linux); elsewhere ``None``."""
    record = read_json(root / cell.relpath / CELL_RECORD) or {}
    pid = record.get("pid")
    if record.get("status") != "running" or not isinstance(pid, int):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    return pid if str((root / cell.relpath).resolve()) in cmdline.split("\0") else None


def plan_cells(grid: Grid, root: Path) -> list[CellPlan]:
    """Inspect every cell; refuse (one error) when run directories were trained with other settings or are still
    being trained by a process of an earlier sweep."""
    cells = grid.cells()
    for cell in cells:
        pid = still_running(root, cell)
        if pid is not None:
            raise KfloError(f"{cell.label} is still being trained by process {pid}, left running by an earlier kflo sweep "
                            f"that ended abruptly; wait for it to finish (or stop it with kill -INT {pid}) and run the "
                            "sweep again")
    plans = [inspect_cell(grid, c, root) for c in cells]
    conflicts = [p for p in plans if p.action == "conflict"]
    if conflicts:
        shown = "; ".join(f"{p.cell.relpath}: {p.conflict}" for p in conflicts[:3])
        more = f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""
        raise KfloError(f"{len(conflicts)} run director{'y' if len(conflicts) == 1 else 'ies'} in {root} {'was' if len(conflicts) == 1 else 'were'} "
                        f"trained with other settings than the grid now gives ({shown}{more}); the grid changed since: "
                        "use a new -o folder, or delete those run directories to train them again")
    return plans


__all__ = ["CellPlan", "inspect_cell", "plan_cells", "still_running", "train_argv"]

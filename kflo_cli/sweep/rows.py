"""One row per run of a sweep, read from its run directory alone: status, deployed accuracy, sizes and times."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from .grid import Cell, Grid
from .schema import SWEEP_PATHS, train_options

#: The runner's record of a cell's last attempt, inside the run directory.
CELL_RECORD = "sweep-cell.json"
STDOUT_LOG = "sweep-stdout.log"
STDERR_LOG = "sweep-stderr.log"

#: Columns of results.csv (and keys of each row of results.json).
COLUMNS = (
    "model", "data", "method", "seed", "status", "deployed_test_acc", "deployed_from", "trained_test_acc",
    "ema_test_acc", "params_trained", "params_deployed", "train_seconds", "total_seconds", "wall_seconds", "epochs",
    "exit_code", "error", "auxiliary", "run_dir",
)
#: Statuses of a row that counts in the statistics.
DONE = "done"


# -- one run ---------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or ``None`` when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def expected_config(grid: Grid, cell: Cell) -> dict[str, Any]:
    """The configuration ``kflo train`` records for ``cell`` (JSON-normalised), without threads and sweep paths."""
    from ..train.config import resolve_config

    fields = train_options()
    options = {k: v for k, v in grid.options(cell).items() if k in fields}
    if grid.methods[cell.method].teacher is not None:
        options["teacher_checkpoint"] = "teacher.safetensors"  # placeholder; never compared
    data = json.loads(json.dumps(resolve_config(options).to_dict()))
    return {k: v for k, v in data.items() if k in fields and k not in ("threads", *SWEEP_PATHS)}


def _same_recipe(saved: Any, expected: Any) -> bool:
    """Whether two recipe spec lists train the same model: compared as recipe values with today's defaults filled
    in (a parameter added later with a default that keeps the old behaviour changes nothing) and without ``mode``
    (the execution form: every form computes the same function, docs/performance.md)."""
    from ..reparam import create_recipe

    def values(specs: Any) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for spec in specs:
            recipe = create_recipe(spec)
            out.append((recipe.name, {k: v for k, v in recipe.values.items() if k != "mode"}))
        return out

    if saved == expected:
        return True
    try:
        return values(saved) == values(expected)
    except Exception:  # noqa: BLE001  (a spec today's registry refuses: not the same)
        return False


def config_differences(expected: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    """``key: saved -> expected`` for every setting both know that differs (recipes compared by
    :func:`_same_recipe`)."""
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in expected.items() if k in saved and saved[k] != v
            and not (k == "recipe" and isinstance(v, list) and isinstance(saved[k], list) and _same_recipe(saved[k], v))]


def deployed_accuracy(summary: Mapping[str, Any], config: Mapping[str, Any], run_dir: Path) -> tuple[float | None, str]:
    """The test accuracy of the deployed model and what it is.

    Expanded runs deploy their collapsed checkpoint (its own measured accuracy); a vanilla run deploys the trained
    model: its last epoch, its EMA (``collapse_from = "ema"``) or its best epoch (``"best"``, the test accuracy of
    that epoch from metrics.jsonl). A run that could not be collapsed (a nonlinear +Init first stage) has none.
    """
    collapsed = summary.get("collapsed")
    if isinstance(collapsed, Mapping) and collapsed.get("test_acc") is not None:
        return float(collapsed["test_acc"]), f"collapsed ({collapsed.get('from', config.get('collapse_from', 'last'))})"
    if summary.get("not_collapsed"):
        return None, "not collapsible"
    source = config.get("collapse_from", "last")
    if source == "ema" and summary.get("ema_test_acc") is not None:
        return float(summary["ema_test_acc"]), "trained (ema)"
    if source == "best" and isinstance(summary.get("best"), Mapping):
        epoch = summary["best"].get("epoch")
        for line in _lines(run_dir / "metrics.jsonl"):
            if line.get("epoch") == epoch and line.get("test_acc") is not None:
                return float(line["test_acc"]), "trained (best)"
    acc = summary.get("final_test_acc")
    return (None if acc is None else float(acc)), "trained (last)"


def _lines(path: Path) -> Iterable[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def run_row(grid: Grid, cell: Cell, root: Path, expected: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What is known about ``cell``'s run: status, accuracies, sizes, times, and the error of a failed attempt."""
    run_dir = root / cell.relpath
    row: dict[str, Any] = {k: None for k in COLUMNS}
    row.update(model=cell.model, data=cell.data, method=cell.method, seed=cell.seed, auxiliary=cell.auxiliary,
               run_dir=str(cell.relpath))
    record = read_json(run_dir / CELL_RECORD) or {}
    summary = read_json(run_dir / "summary.json")
    config = read_json(run_dir / "config.json") or {}
    row["wall_seconds"] = record.get("wall_seconds")
    if summary is not None:
        differences = config_differences(expected if expected is not None else expected_config(grid, cell), config)
        if differences:
            row["status"] = "stale"
            row["error"] = "trained with other settings than the grid gives: " + "; ".join(differences)
        else:
            row["status"] = DONE
        acc, source = deployed_accuracy(summary, config, run_dir)
        collapsed = summary.get("collapsed") if isinstance(summary.get("collapsed"), Mapping) else {}
        row.update(
            deployed_test_acc=acc, deployed_from=source, trained_test_acc=summary.get("final_test_acc"),
            ema_test_acc=summary.get("ema_test_acc"), params_trained=summary.get("params_trained"),
            params_deployed=collapsed.get("params") if collapsed else (None if summary.get("not_collapsed") else summary.get("params_trained")),
            train_seconds=summary.get("seconds"), epochs=summary.get("epochs"),
        )
        return row
    status = record.get("status")
    if status in ("failed", "blocked", "interrupted"):
        row.update(status=status, exit_code=record.get("exit_code"), error=record.get("error"))
    elif (run_dir / "state.safetensors").is_file():
        row["status"] = "incomplete"
    else:
        row["status"] = "not run"
    return row


def collect(grid: Grid, root: str | Path) -> list[dict[str, Any]]:
    """One row per cell of the grid (dependencies included), with each +Init run's total cost filled in."""
    root = Path(root)
    cells = grid.cells()
    rows = [run_row(grid, c, root) for c in cells]
    by_key = {(r["model"], r["data"], r["method"], r["seed"]): r for r in rows}
    for cell, row in zip(cells, rows):
        row["total_seconds"] = _total_seconds(grid, cell, by_key)
    return rows


def _total_seconds(grid: Grid, cell: Cell, by_key: Mapping[tuple, dict[str, Any]]) -> float | None:
    """A run's training time plus that of its +Init first stage (the cost of producing the deployed model); a
    teacher's time is not included: it is a model of its own, reported in its own row."""
    row = by_key[cell.key]
    if row["train_seconds"] is None:
        return None
    total = float(row["train_seconds"])
    for kind, dep in grid.dependencies(cell):
        if kind == "init_from_expanded":
            before = _total_seconds(grid, dep, by_key)
            if before is None:
                return None
            total += before
    return total


__all__ = ["CELL_RECORD", "COLUMNS", "DONE", "STDERR_LOG", "STDOUT_LOG", "collect", "config_differences",
           "deployed_accuracy", "expected_config", "read_json", "run_row"]

"""Running a grid: one ``kflo train`` subprocess per cell, ``--jobs`` at a time, resumable, with a progress display.

Each cell's run directory is ``OUT/runs/<model>/<data>/<method>/seed<k>``. On every invocation each cell is
inspected: a finished run (``summary.json``) whose ``config.json`` matches the cell is skipped; a run with a saved
state and no summary is continued with ``kflo train --resume``; anything else is started (again) with
``--overwrite``, which removes only kflo train's own files. A run dir trained with other settings than the grid
now gives is refused before anything starts. The runner writes ``sweep-cell.json`` (the last attempt: status,
exit code, the last line of stderr) and appends the run's output to ``sweep-stdout.log`` / ``sweep-stderr.log``
in the run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .._atomic import write_text_atomic
from ..errors import KfloError
# still_running, comma_list, config_differences and expected_config are only re-exported (runner.X as before the split)
from .cells import CellPlan, inspect_cell, plan_cells, still_running, train_argv
from .display import Display, _finished_text
from .grid import Cell, Grid, comma_list, load_grid
from .process import _last_line, _now, _Running, cpu_cores, plan_threads
from .report import (
    CELL_RECORD,
    STDERR_LOG,
    STDOUT_LOG,
    config_differences,
    expected_config,
    read_json,
    run_row,
    write_report,
)

#: The exit status of an interrupted sweep (and of an interrupted kflo train run).
EXIT_INTERRUPTED = 130
LOCK_FILE = ".sweep.lock"
GRID_COPY = "grid.toml"


class SweepInterrupted(Exception):
    """Ctrl-C / SIGTERM stopped the sweep after its running cells saved their state."""


# -- the scheduler ---------------------------------------------------------------------------------------------------
ExtraArgs = Callable[[Cell, str], list[str]]


class Runner:
    """Runs the cells of a grid that are not finished, ``jobs`` at a time, dependencies first."""

    def __init__(self, grid: Grid, root: Path, *, jobs: int, threads: int, display: Display,
                 extra_args: ExtraArgs | None = None, poll: float = 0.1) -> None:
        self.grid, self.root, self.jobs, self.threads, self.display = grid, root, jobs, threads, display
        self.extra_args = extra_args
        self.poll = poll
        self.running: list[_Running] = []
        self.signals = 0
        self.results: dict[tuple, str] = {}
        self.launched = 0

    # signals: children run in their own session, so a terminal's Ctrl-C reaches only the sweep, which forwards
    # exactly one SIGINT per Ctrl-C (kflo train saves on the first and aborts on a second).
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals += 1
        forward = signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM
        for r in self.running:
            with contextlib.suppress(ProcessLookupError, OSError):
                r.proc.send_signal(forward)
        if self.signals == 1:
            self.display.note("interrupt: stopping; the running cells save their state (Ctrl-C again aborts them, "
                              "losing the progress since their last save)")

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
        previous = {s: signal.signal(s, self._on_signal) for s in sigs}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _record(self, cell: Cell, record: dict[str, Any]) -> None:
        (self.root / cell.relpath).mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.root / cell.relpath / CELL_RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")

    def _launch(self, plan_action: str, cell: Cell) -> None:
        run_dir = self.root / cell.relpath
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = train_argv(self.grid, cell, self.root, self.threads, action=plan_action)
        if self.extra_args is not None:
            argv += self.extra_args(cell, plan_action)
        previous = read_json(run_dir / CELL_RECORD) or {}
        record = {"cell": cell.label, "status": "running", "action": plan_action, "attempt": int(previous.get("attempt", 0)) + 1,
                  "command": argv, "threads": self.threads, "started_at": _now()}
        self._record(cell, record)
        out = open(run_dir / STDOUT_LOG, "ab")
        err = open(run_dir / STDERR_LOG, "ab")
        offset = err.tell()
        stamp = f"\n=== kflo sweep: {plan_action} at {record['started_at']}: {' '.join(argv)}\n".encode()
        out.write(stamp)
        out.flush()
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        record["pid"] = proc.pid  # a later sweep must not start this cell again while the process lives
        self._record(cell, record)
        self.running.append(_Running(cell, proc, time.perf_counter(), offset, record, [out, err]))
        self.launched += 1
        if self.signals:  # the interrupt came while this process was being started: pass it on too
            with contextlib.suppress(ProcessLookupError, OSError):
                proc.send_signal(signal.SIGINT)

    def _reap(self, r: _Running) -> None:
        for fh in r.files:
            fh.close()
        code = r.proc.returncode
        run_dir = self.root / r.cell.relpath
        record = dict(r.record, exit_code=code, ended_at=_now(), wall_seconds=round(time.perf_counter() - r.started, 3))
        last = _last_line(run_dir / STDERR_LOG, r.err_offset)
        if code == 0 and (run_dir / "summary.json").is_file():
            status, text = "done", ""
        elif code in (EXIT_INTERRUPTED, -signal.SIGINT, -signal.SIGTERM):
            status = "interrupted"
            resumable = (run_dir / "state.safetensors").is_file()
            text = ("stopped before the end" + (" (interrupt)" if self.signals else f" (exit {code})")
                    + ("; the next kflo sweep resumes it" if resumable else "; the next kflo sweep starts it again"))
            record["error"] = text
        else:
            status = "failed"
            if code == 0:
                text = "kflo train exited without writing summary.json"
            elif code is not None and code < 0:
                try:
                    text = f"killed by {signal.Signals(-code).name}" + (f" ({last})" if last else "")
                except ValueError:
                    text = f"killed by signal {-code}"
            else:
                text = last or f"exit code {code}"
            record["error"] = text
        record["status"] = status
        self._record(r.cell, record)
        self.results[r.cell.key] = status
        if status == "done":
            text = _finished_text(run_row(self.grid, r.cell, self.root))
        elif status == "failed":
            text = f"FAILED (exit {code}): {text}"
        self.display.finished(r.cell, status, text)

    def run(self, plans: list[CellPlan]) -> dict[tuple, str]:
        """Run every ``start``/``resume`` plan; returns cell key -> final status of this invocation."""
        for p in plans:
            if p.action == "done":
                self.results[p.cell.key] = "done"
        todo = [p for p in plans if p.action in ("start", "resume")]
        with self._signals():
            while todo or self.running:
                if not self.signals:
                    self._launch_ready(todo)
                for r in list(self.running):
                    if r.proc.poll() is not None:
                        self.running.remove(r)
                        self._reap(r)
                self.display.running([r.cell.label for r in self.running])
                if self.signals and not self.running:
                    break
                if self.running:
                    time.sleep(self.poll)
        if self.signals:
            raise SweepInterrupted(f"{len(todo)} cells not started")
        return self.results

    def _launch_ready(self, todo: list[CellPlan]) -> None:
        for p in list(todo):
            if len(self.running) >= self.jobs:
                return
            deps = self.grid.dependencies(p.cell)
            failed = [d for _, d in deps if self.results.get(d.key) in ("failed", "blocked", "interrupted")]
            if failed:
                todo.remove(p)
                text = f"not run: it needs {failed[0].label}, which did not finish"
                self._record(p.cell, {"cell": p.cell.label, "status": "blocked", "error": text, "ended_at": _now()})
                self.results[p.cell.key] = "blocked"
                self.display.finished(p.cell, "blocked", "BLOCKED: " + text)
                continue
            if all(self.results.get(d.key) == "done" for _, d in deps):
                todo.remove(p)
                self._launch(p.action, p.cell)
        if todo and not self.running:  # nothing can start and nothing runs: a dependency is in no plan
            for p in list(todo):
                todo.remove(p)
                self.results[p.cell.key] = "blocked"
                self.display.finished(p.cell, "blocked", "BLOCKED: a run it needs is not part of this sweep")


# -- the whole sweep ---------------------------------------------------------------------------------------------------
@dataclass
class SweepOutcome:
    """What :func:`run_sweep` did."""

    grid: Grid
    out_dir: Path
    total: int = 0
    skipped: int = 0
    ran: int = 0
    statuses: dict[tuple, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    #: only the report was written (--report-only) or nothing at all (--dry-run): exit code 0
    report_only: bool = False

    @property
    def unfinished(self) -> list[dict[str, Any]]:
        """Rows of the report that did not finish (failed, blocked, interrupted, not run)."""
        return [r for r in self.report.get("rows", []) if r["status"] != "done"]

    @property
    def exit_code(self) -> int:
        """0: every cell finished (or only a report / a dry run); 1: some failed or did not run (listed); 130:
        interrupted."""
        if self.report_only:
            return 0
        if self.interrupted:
            return EXIT_INTERRUPTED
        return 1 if self.unfinished else 0

    def lines(self) -> list[str]:
        """What the CLI prints at the end: per table the methods' means, the unfinished cells, the files."""
        out = []
        for table in self.report.get("tables", []):
            parts = []
            for m in table["methods"]:
                s, c = m["summary"], m["comparison"]
                if s["mean"] is None:
                    parts.append(f"{m['method']} -")
                    continue
                text = f"{m['method']} {s['mean']:.2f}" + (f"±{s['std']:.2f}" if s["std"] is not None else "") + f" (n={s['n']}"
                if c is not None and c["mean"] is not None:
                    text += f", {c['mean']:+.2f} {c['verdict']}"
                parts.append(text + ")")
            out.append(f"{table['model']} / {table['data']}: " + "; ".join(parts))
        unfinished = self.unfinished
        for r in unfinished[:10]:
            why = f": {r['error']}" if r.get("error") else ""
            out.append(f"not finished: {r['model']}/{r['data']}/{r['method']}/seed{r['seed']} ({r['status']}{why})")
        if len(unfinished) > 10:
            out.append(f"... and {len(unfinished) - 10} more not finished (results.md lists them all)")
        paths = self.report.get("paths", {})
        if paths:
            out.append("wrote " + ", ".join(str(p) for p in paths.values()))
        return out


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One sweep per output folder at a time."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fh = open(root / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise KfloError(f"another kflo sweep is running on {root}; wait for it to end or use another -o folder") from None
        yield
    finally:
        fh.close()


def run_sweep(
    grid_path: str | Path,
    out_dir: str | Path,
    *,
    jobs: int = 1,
    threads: int | None = None,
    report_only: bool = False,
    dry_run: bool = False,
    console: Any = None,
    live: bool | None = None,
    extra_args: ExtraArgs | None = None,
) -> SweepOutcome:
    """Run (or continue) a grid into ``out_dir`` and write its report.

    Args:
        grid_path: the grid TOML file (docs/sweep.md).
        out_dir: the sweep's folder: ``runs/`` and the results files.
        jobs: cells trained at once.
        threads: ``--threads`` of each run (default: CPU cores // jobs).
        report_only: only (re)write the results files from the run directories.
        dry_run: print what would run and write nothing.
        console: a rich console (default: stdout).
        live: progress bar (default: when the console is a terminal).
        extra_args: test hook, ``extra_args(cell, "start"|"resume") -> [args]`` appended to a cell's command.

    Raises:
        KfloError: a bad grid, conflicting run directories, another sweep on the folder, bad jobs/threads.
        SweepInterrupted: never; an interrupted sweep returns with ``interrupted=True`` (exit code 130).
    """
    from rich.console import Console

    console = console or Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    grid = load_grid(grid_path, check_models=not report_only)
    root = Path(out_dir)
    outcome = SweepOutcome(grid, root, report_only=report_only or dry_run)
    if report_only:
        if not (root / "runs").is_dir():
            raise KfloError(f"{root} has no runs/ folder; run `kflo sweep {grid_path} -o {root}` first")
        outcome.report = write_report(grid, root)
        outcome.total = len(outcome.report["rows"])
        return outcome
    if root.exists() and not root.is_dir():
        raise KfloError(f"{root} is a file; -o takes the folder of the sweep")
    per_run = plan_threads(jobs, threads)
    for note in grid.ignored_notes():
        console.print(f"note: {note}", markup=False, highlight=False)
    plans = plan_cells(grid, root)
    outcome.total = len(plans)
    outcome.skipped = sum(p.action == "done" for p in plans)
    if dry_run:
        for p in plans:
            action = {"done": "finished, skip", "resume": "resume", "start": "train"}[p.action]
            console.print(f"{p.cell.label}{' (dependency)' if p.cell.auxiliary else ''}: {action}", markup=False, highlight=False)
        console.print(f"{len(plans)} cells: {outcome.skipped} finished, {len(plans) - outcome.skipped} to run with "
                      f"--jobs {jobs}, --threads {per_run}")
        return outcome
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        write_text_atomic(root / GRID_COPY, grid.text)
        todo = len(plans) - outcome.skipped
        console.print(f"sweep {grid.name}: {len(plans)} cells, {outcome.skipped} already finished, {todo} to run "
                      f"({jobs} at a time, {per_run} thread{'s' if per_run > 1 else ''} each) into {root}")
        show = console.is_terminal if live is None else live
        with Display(console, len(plans), outcome.skipped, show) as display:
            runner = Runner(grid, root, jobs=jobs, threads=per_run, display=display, extra_args=extra_args)
            try:
                outcome.statuses = runner.run(plans)
            except SweepInterrupted:
                outcome.interrupted = True
                outcome.statuses = runner.results
        outcome.ran = runner.launched
        outcome.report = write_report(grid, root)
    return outcome


__all__ = ["EXIT_INTERRUPTED", "CellPlan", "Display", "Runner", "SweepInterrupted", "SweepOutcome", "cpu_cores",
           "inspect_cell", "plan_cells", "plan_threads", "run_sweep", "train_argv"]

"""The sweep's progress: a rich progress bar over the whole grid on a terminal, one line per finished cell otherwise."""

from __future__ import annotations

from typing import Any

from .grid import Cell


class Display:
    """A rich progress bar over the whole grid on a terminal; one line per finished cell otherwise."""

    def __init__(self, console: Any, total: int, done: int, live: bool) -> None:
        self.console, self.total, self.done, self.failed, self.live = console, total, done, 0, live
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> "Display":
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                TextColumn("[red]{task.fields[failed]} failed[/]"), TimeElapsedColumn(),
                TextColumn("{task.fields[running]}"), console=self.console, transient=False,
            )
            self.task = self.progress.add_task("sweep", total=self.total, completed=self.done, failed=0, running="")
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def running(self, labels: list[str]) -> None:
        if self.progress is not None:
            text = "running: " + ", ".join(labels) if labels else ""
            self.progress.update(self.task, running=text if len(text) < 110 else text[:107] + "...")

    def finished(self, cell: Cell, status: str, text: str) -> None:
        if status == "done":
            self.done += 1
        elif status in ("failed", "blocked"):
            self.failed += 1
        line = f"[{self.done}/{self.total}] {cell.label}: {text}"
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done, failed=self.failed)
            self.progress.console.print(line, markup=False, highlight=False)
        else:
            self.console.print(line, markup=False, highlight=False)

    def note(self, text: str) -> None:
        (self.progress.console if self.progress is not None else self.console).print(text, markup=False, highlight=False)


def _finished_text(row: dict[str, Any]) -> str:
    acc = row.get("deployed_test_acc")
    seconds = row.get("train_seconds")
    what = f"test acc {acc:.2f}% ({row['deployed_from']})" if acc is not None else f"trained, {row.get('deployed_from')}"
    return f"done, {what}" + (f", {seconds:.1f} s training" if seconds is not None else "")


__all__ = ["Display"]

"""What a run shows and writes about itself: the parameter-group table, progress, metrics files, the summary."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .._atomic import write_text_atomic

if TYPE_CHECKING:
    from .summary import RunSummary

#: Column order of metrics.csv (keys missing from a run are left out).
COLUMNS = (
    "epoch", "step", "lr", "train_loss", "train_acc", "penalty", "val_loss", "val_acc", "test_loss", "test_acc",
    "ema_val_acc", "ema_test_loss", "ema_test_acc", "images_per_s", "seconds",
)


def make_console() -> Console:
    """A console on stdout; wide when stdout is not a terminal, so tables in logs are not truncated."""
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)


def group_table(groups: list[Any], penalties: list[tuple[str, int, float]], optimizer: str) -> Table:
    """The parameter groups (with their weight decay) and penalty terms of a run."""
    table = Table(title=f"parameter groups ({optimizer})")
    for col in ("group", "tensors", "values", "weight decay", "update"):
        table.add_column(col, justify="right" if col in ("tensors", "values") else "left")
    for g in groups:
        update = "step x Psi'(v) (modified adaptive step)" if g.scaled else "plain"
        table.add_row(g.label, str(len(g.params)), f"{g.numel:,}", f"{g.weight_decay:g}", update)
    for label, layers, wd in penalties:
        table.add_row(label, f"{layers} layers", "", f"{wd:g}", "penalty in the loss")
    return table


def progress_bar(console: Console) -> Progress:
    """Per-epoch bar with loss, accuracy, learning rate and images/s."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2f}%  lr {task.fields[lr]:.3g}  {task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """One line per epoch, for terminals and logs alike."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}%"]
    if row.get("val_acc") is not None:
        parts.append(f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2f}%")
    parts.append(f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}%")
    if row.get("ema_test_acc") is not None:
        parts.append(f"EMA test acc {row['ema_test_acc']:.2f}%")
    parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"{row['images_per_s']:.0f} img/s")
    return "  ".join(parts)


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl`` (one JSON object per epoch) and ``metrics.csv``, both rewritten atomically."""
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(row, sort_keys=True) + "\n" for row in history))
    present = [c for c in COLUMNS if any(row.get(c) is not None for row in history)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=present, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in present})
    write_text_atomic(run_dir / "metrics.csv", buf.getvalue())


def summary_table(summary: "RunSummary") -> Table:
    """The end-of-run table."""
    table = Table(title=f"run summary: {summary.run_dir}", show_header=False)
    table.add_column("item")
    table.add_column("value")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}%"

    table.add_row("model", f"{summary.model_id} ({summary.kind})")
    table.add_row("epochs / steps", f"{summary.epochs} / {summary.steps}")
    table.add_row("final test accuracy (trained model)", pct(summary.final_test_acc))
    best = summary.best
    if best:
        table.add_row(f"best {best.by} accuracy", f"{pct(best.value)} at epoch {best.epoch}")
    if summary.ema_test_acc is not None:
        table.add_row("EMA test accuracy", pct(summary.ema_test_acc))
    collapsed = summary.collapsed
    if collapsed:
        proof = collapsed.verification
        table.add_row("collapsed from", collapsed.collapsed_from)
        table.add_row("collapsed test accuracy", pct(collapsed.test_acc))
        table.add_row("verification", f"{'PASS' if proof.passed else 'FAIL'} (relative error {proof.rel_error:.2e})")
        table.add_row("strict load into the original architecture", "yes" if collapsed.strict_load else "NO")
        table.add_row("parameters trained / deployed", f"{summary.params_trained:,} / {collapsed.params:,}")
    else:
        table.add_row("parameters", f"{summary.params_trained:,}")
    if summary.not_collapsed:
        table.add_row("collapse", f"skipped: {summary.not_collapsed}")
    if summary.world_size > 1:
        table.add_row("processes", f"{summary.world_size} (ranks identical: {summary.ranks_identical})")
    table.add_row("time", f"{summary.seconds:.1f} s")
    return table


__all__ = ["COLUMNS", "epoch_line", "group_table", "make_console", "progress_bar", "summary_table", "write_metrics"]

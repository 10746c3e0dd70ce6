"""``curves.png``: loss and accuracy per epoch, train and test (and validation and EMA when present), titled with
the model, the recipe and the data; short runs (one or a few epochs) get whole-epoch ticks, large markers, the
values in the legend and y-limits that do not magnify noise."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .._atomic import atomic_path

_SERIES = (
    ("loss", (("train_loss", "train"), ("val_loss", "validation"), ("test_loss", "test"), ("ema_test_loss", "EMA test"))),
    ("accuracy (%)", (("train_acc", "train"), ("val_acc", "validation"), ("test_acc", "test"), ("ema_test_acc", "EMA test"))),
)
#: Up to this many epochs a run is "short": large markers and each series' last value in the legend.
SHORT_RUN = 10
#: The accuracy axis spans at least this many points, so a flat or one-epoch curve is not a magnified blur.
MIN_ACC_SPAN = 10.0


def run_title(model: Any, data: str) -> str:
    """'timm:lenet5 + kflo:depth=2,width=4 on digits' (or '... vanilla on ...') from a model's record."""
    from ..record import record

    rec = record(model)
    recipes = " + ".join(s.recipe.spec() for s in rec.selections)
    return f"{rec.model_id or type(model).__name__} {'+ ' + recipes if recipes else 'vanilla'} on {data}"


def _accuracy_limits(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < MIN_ACC_SPAN:
        mid = (lo + hi) / 2
        lo, hi = mid - MIN_ACC_SPAN / 2, mid + MIN_ACC_SPAN / 2
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if lo < 0:
        lo, hi = 0.0, hi - lo
    if hi > 100:
        lo, hi = max(0.0, lo - (hi - 100)), 100.0
    return lo, hi + (1.0 if hi == 100.0 else 0.0)  # room for the top marker


def make_figure(history: list[dict[str, Any]], title: str = "") -> Any:
    """The figure of :func:`write_curves` (not saved; close it with ``matplotlib.pyplot.close``)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    short = len(epochs) <= SHORT_RUN
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    try:
        _draw(fig, axes, history, epochs, short, title, MaxNLocator)
    except BaseException:
        plt.close(fig)
        raise
    return fig


def _draw(fig: Any, axes: Any, history: list[dict[str, Any]], epochs: list[int], short: bool, title: str,
          locator: Any) -> None:
    for ax, (ylabel, series) in zip(axes, _SERIES):
        shown: list[float] = []
        for key, label in series:
            values = [row.get(key) for row in history]
            finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
            if not finite:
                continue
            shown += finite
            if short:
                label = f"{label}: {finite[-1]:.4g}" if ylabel == "loss" else f"{label}: {finite[-1]:.2f}"
            ax.plot(epochs, [float("nan") if v is None else v for v in values], marker="o",
                    markersize=7 if short else 3, linewidth=1.5, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if short and epochs:  # a lone epoch sits in the middle of a one-epoch axis, not of 0.96-1.04
            ax.set_xticks(sorted(set(epochs)))
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        else:
            ax.xaxis.set_major_locator(locator(integer=True))
        if shown:
            if ylabel == "loss":
                ax.set_ylim(0.0, max(shown) * 1.1 if max(shown) > 0 else 1.0)
            else:
                ax.set_ylim(*_accuracy_limits(shown))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()


def write_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Plot the metrics history to ``path`` (PNG), atomically. Uses matplotlib's non-interactive Agg backend."""
    fig = make_figure(history, title)
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


__all__ = ["make_figure", "run_title", "write_curves"]

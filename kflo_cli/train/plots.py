"""``curves.png``: loss and accuracy per epoch, train and test (and validation and EMA when present)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._atomic import atomic_path

_SERIES = (
    ("loss", (("train_loss", "train"), ("val_loss", "validation"), ("test_loss", "test"), ("ema_test_loss", "EMA test"))),
    ("accuracy (%)", (("train_acc", "train"), ("val_acc", "validation"), ("test_acc", "test"), ("ema_test_acc", "EMA test"))),
)


def write_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Plot the metrics history to ``path`` (PNG), atomically. Uses matplotlib's non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for ax, (ylabel, series) in zip(axes, _SERIES):
            for key, label in series:
                values = [row.get(key) for row in history]
                if any(v is not None for v in values):
                    ax.plot(epochs, [float("nan") if v is None else v for v in values], marker="o", markersize=3, label=label)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


__all__ = ["write_curves"]

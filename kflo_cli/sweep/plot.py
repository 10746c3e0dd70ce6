"""results.png: each method's accuracy over seeds, one panel per model x data setting (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .._atomic import atomic_path
from .grid import Grid


def plot(grid: Grid, result_tables: list[dict[str, Any]], path: Path) -> bool:
    """results.png: per model x data a panel, each method's seeds as points and mean ± std as a bar; False if
    there is nothing to plot."""
    panels = [t for t in result_tables if any(m["summary"]["n"] for m in t["methods"])]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(5.5, 0.9 * max(len(t["methods"]) for t in panels) + 2) * cols,
                                                  3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, table in zip(axes.flat, panels):
        names = [m["method"] for m in table["methods"]]
        for i, m in enumerate(table["methods"]):
            values = list(m["values"].values())
            if not values:
                continue
            offsets = [-0.1] if len(values) == 1 else [-0.25 + 0.3 * j / (len(values) - 1) for j in range(len(values))]
            color = "tab:gray" if m["baseline"] else "tab:blue"
            ax.scatter([i + o for o in offsets], values, s=14, color=color, alpha=0.6, zorder=2)
            s = m["summary"]
            ax.errorbar([i + 0.2], [s["mean"]], yerr=[s["std"] or 0.0], fmt="o", color="black", capsize=4, zorder=3)
            if m["baseline"]:
                ax.axhline(s["mean"], color="tab:gray", linestyle="--", linewidth=0.8, zorder=1)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{table['model']} · {table['data']}", fontsize=10)
        ax.set_ylabel("deployed test accuracy (%)")
        ax.set_xlim(-0.6, len(names) - 0.4)
        values = [v for m in table["methods"] for v in m["values"].values()]
        values += [m["summary"]["mean"] + sign * (m["summary"]["std"] or 0.0) for m in table["methods"]
                   if m["values"] and m["summary"]["mean"] is not None for sign in (-1, 1)]
        if values:  # one seed, or equal accuracies: a few points around them, not matplotlib's +-4 % of the value
            lo, hi = min(values), max(values)
            pad = max(1.0, 0.1 * (hi - lo))
            ax.set_ylim(max(0.0, lo - pad), min(100.5, hi + pad))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{grid.name}: methods (recipes) per model · data\npoints: seeds · black: mean ± std · dashed: "
                 f"{grid.baseline}'s mean", fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return True


__all__ = ["plot"]

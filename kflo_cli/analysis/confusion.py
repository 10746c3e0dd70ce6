"""Gradient confusion (Sankararaman et al. 2019, as ExpandNets section 5.1 measures it).

At the end of an epoch: the cosine similarity between the gradients of P pairs of randomly sampled training
mini-batches, with respect to the parameters the model is trained with. For an expanded model those are the
factors, the quantity the optimizer moves (ExpandNets measure it on the ExpandNet they train); for a vanilla model,
its weights. The minimum over the pairs is the "gradient confusion" (higher = more consistent gradients), the mean
is recorded too, and the similarities of the last epoch are drawn as a Gaussian kernel density
(``gradient_confusion.png``), the paper's density plot for one run.

The measurement runs on a copy of the model (its BatchNorm statistics move on the copy only), samples its batches
with its own seeded generator (seed, epoch), and restores every global RNG state afterwards: the training
trajectory is bit-identical with and without it (tests/test_analysis.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .figures import save_titled


#: The paper's number of pairs.
DEFAULT_PAIRS = 100
MAX_PAIRS = 10_000


def pair_similarities(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[float]:
    """Cosine similarities of the gradients of consecutive pairs of ``batches`` (batch 2k with 2k+1), with respect
    to ``model``'s trainable parameters; ``model`` is used as it is (pass a copy)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for images, labels in batches:
        loss = loss_fn(model(images), labels)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, allow_unused=True)
                                if g is not None]).double())
    out = []
    for a, b in zip(grads[0::2], grads[1::2]):
        out.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    return out


def gaussian_kde(samples: Sequence[float], points: Sequence[float]) -> list[float]:
    """A Gaussian kernel density estimate of ``samples`` at ``points`` (Scott's bandwidth, n^(-1/5) * std)."""
    x = torch.tensor(list(samples), dtype=torch.float64)
    at = torch.tensor(list(points), dtype=torch.float64)
    std = float(x.std()) if x.numel() > 1 else 0.0
    width = max(std * x.numel() ** (-1 / 5), 1e-3)
    z = (at[:, None] - x[None, :]) / width
    return (torch.exp(-0.5 * z * z).sum(1) / (x.numel() * width * math.sqrt(2 * math.pi))).tolist()


def density_figure(history: list[dict[str, Any]]) -> Any:
    """The figure of ``gradient_confusion.png`` (None without measured rows): the minimum and mean cosine similarity
    per epoch, and the density of the last epoch's similarities (the composed weights' too, with params=both)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in history if r.get("grad_cos")]
    if not rows:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    try:
        epochs = [r["epoch"] for r in rows]
        left.plot(epochs, [r["grad_cos_min"] for r in rows], marker="o", label="minimum (gradient confusion)")
        left.plot(epochs, [r["grad_cos_mean"] for r in rows], marker=".", label="mean")
        composed = [r for r in rows if r.get("grad_cos_composed")]
        if composed:  # params=both: the composed weights' gradients beside the trained parameters'
            left.plot([r["epoch"] for r in composed], [r["grad_cos_composed_min"] for r in composed], marker="s",
                      linestyle="--", label="minimum, composed weights")
            left.plot([r["epoch"] for r in composed], [r["grad_cos_composed_mean"] for r in composed], marker=".",
                      linestyle="--", label="mean, composed weights")
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        left.set_xlabel("epoch")
        left.set_ylabel("gradient cosine similarity")
        left.legend(fontsize=7)
        last = rows[-1]["grad_cos"]
        other = rows[-1].get("grad_cos_composed") or []
        lo, hi = min(-0.2, min(last + other) - 0.05), max(0.2, max(last + other) + 0.05)
        grid = [lo + (hi - lo) * i / 200 for i in range(201)]
        right.plot(grid, gaussian_kde(last, grid), label="trained parameters")
        if other:
            right.plot(grid, gaussian_kde(other, grid), linestyle="--", label="composed weights")
            right.legend(fontsize=7)
        right.set_xlabel(f"cosine similarity ({len(last)} pairs, epoch {rows[-1]['epoch']})")
        right.set_ylabel("density")
    except BaseException:
        plt.close(fig)
        raise
    return fig


def write_density(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """``gradient_confusion.png``: :func:`density_figure`, written atomically (nothing without measured rows)."""
    save_titled(density_figure(history), path, "gradient confusion", title)


def last_similarities(run_dir: str | Path) -> tuple[int, list[float]] | None:
    """The epoch and the similarities of the last epoch a run measured (``metrics.jsonl``), or None."""
    import json

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by an interrupted run
            continue
        if isinstance(row, dict) and row.get("grad_cos"):
            last = (int(row.get("epoch", 0)), [float(v) for v in row["grad_cos"]])
    return last


def methods_figure(panels: dict[str, dict[str, list[float]]]) -> Any:
    """One axes per panel (e.g. model x data), one density line per method: the paper's Figure 3 layout. Each
    method's list is its similarities (pooled over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for ax, (name, curves) in zip(axes.flat, panels.items()):
        values = [v for sims in curves.values() for v in sims]
        lo, hi = min(-0.2, min(values) - 0.05), max(0.2, max(values) + 0.05)
        grid = [lo + (hi - lo) * i / 200 for i in range(201)]
        for method, sims in curves.items():
            ax.plot(grid, gaussian_kde(sims, grid), label=f"{method} (min {min(sims):+.3f}, {len(sims)} pairs)")
        ax.set_xlabel("cosine similarity of mini-batch gradients")
        ax.set_ylabel("density")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    return fig


def write_methods_density(panels: dict[str, dict[str, list[float]]], path: str | Path, title: str = "") -> None:
    """Write :func:`methods_figure` to ``path`` (PNG, atomically)."""
    save_titled(methods_figure(panels), path, "gradient confusion, last epoch", title)


__all__ = ["DEFAULT_PAIRS", "MAX_PAIRS", "density_figure", "gaussian_kde", "last_similarities", "methods_figure", "pair_similarities",
           "write_density", "write_methods_density"]

"""Measurements taken during training (``kflo train --track ...``) that never change the trajectory.

``weights[:layers=GLOB]`` (weight compander paper, section IV-D and Figure 3): after every epoch, the percentile
bands (max, 93, 84, 69, 50, 31, 16, 7, min) of each filtering layer's *effective* weight: the composed kernel of a
rewritten layer (what the deployed network will hold), the weight itself of a plain one. They go into the epoch's
row of ``metrics.jsonl`` (key ``weights``) and, at every epoch's end, into ``weights.png``: one panel per layer,
nested bands around the median, like the paper's figure.

The measurement runs under ``torch.no_grad()`` on the weights as they are, draws no random numbers and changes no
state, so a run with ``--track`` ends with bit-identical weights (tests/test_analysis.py checks it); it costs one
composition and one sort per tracked layer per epoch.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import KfloError
from .figures import save_titled

#: The percentiles of the paper's Figure 3, largest first.
PERCENTILES = (100, 93, 84, 69, 50, 31, 16, 7, 0)
#: What ``--track`` accepts.
TRACKERS = ("weights", "gradient-confusion")
#: Which gradients gradient confusion compares (docs/analysis.md): the trained parameters (an expansion's factors),
#: the composed weights (the collapsed network's parameters at the same function), or both.
CONFUSION_PARAMS = ("trained", "composed", "both")
#: At most this many layers are drawn in weights.png (all are recorded).
MAX_PANELS = 12


def parse_track(spec: str) -> tuple[str, dict[str, str]]:
    """``weights`` or ``weights:layers=GLOB`` -> (``"weights"``, options); one-sentence errors otherwise."""
    name, _, rest = str(spec).partition(":")
    name = name.strip()
    if name not in TRACKERS:
        raise KfloError(f"--track {spec}: unknown measurement '{name}'; use {' or '.join(TRACKERS)} "
                        "(e.g. --track weights:layers='features.*' or --track gradient-confusion:pairs=100)")
    allowed = {"weights": ("layers",), "gradient-confusion": ("pairs", "params")}[name]
    options: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in allowed or not value.strip():
            raise KfloError(f"--track {spec}: '{item}' is not {'= or '.join(allowed)}=...; write --track "
                            "weights:layers=GLOB or --track gradient-confusion:pairs=P,params=trained|composed|both")
        options[key.strip()] = value.strip()
    if options.get("params", "trained") not in CONFUSION_PARAMS:
        raise KfloError(f"--track {spec}: params={options['params']} is unknown; use {', '.join(CONFUSION_PARAMS)}")
    if "pairs" in options:
        from .confusion import MAX_PAIRS

        pairs = options["pairs"]
        if not pairs.isdigit() or not 1 <= int(pairs) <= MAX_PAIRS:
            raise KfloError(f"--track {spec}: pairs={pairs} is out of range; use an integer from 1 to {MAX_PAIRS}")
    return name, options


def percentiles(values: torch.Tensor, points: Sequence[float] = PERCENTILES) -> list[float]:
    """The ``points`` percentiles of ``values`` (linear interpolation between order statistics, as
    ``numpy.percentile``), computed in float64 on the CPU by one sort (no size limit)."""
    flat = values.detach().reshape(-1).to("cpu", torch.float64).sort().values
    if flat.numel() == 0:
        raise KfloError("cannot take percentiles of an empty tensor")
    last = flat.numel() - 1
    out = []
    for p in points:
        pos = last * float(p) / 100.0
        lo = int(pos)
        hi = min(lo + 1, last)
        out.append(float(flat[lo] + (flat[hi] - flat[lo]) * (pos - lo)))
    return out


def _filtering(module: nn.Module) -> bool:
    cls = parametrize.type_before_parametrizations(module)
    return issubclass(cls, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))


def tracked_layers(model: nn.Module, pattern: str | None = None) -> list[str]:
    """The filtering layers (Conv1d/2d/3d, Linear, rewritten or not) whose names match ``pattern`` (fnmatch)."""
    names = [n for n, m in model.named_modules() if n and _filtering(m) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


@torch.no_grad()
def weight_bands(model: nn.Module, layers: Sequence[str]) -> dict[str, list[float]]:
    """Each layer's effective weight's :data:`PERCENTILES` (composed, for a rewritten layer)."""
    with parametrize.cached():
        return {name: percentiles(model.get_submodule(name).weight) for name in layers}


def weight_bands_figure(history: list[dict[str, Any]]) -> Any:
    """The figure of ``weights.png`` (None without tracked rows): per layer, the bands between symmetric percentiles
    around the median, over the epochs (the compander paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in history if isinstance(r.get("weights"), dict)]
    if not rows:
        return None
    layers = list(rows[-1]["weights"])[:MAX_PANELS]
    cols = min(3, len(layers))
    nrows = -(-len(layers) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    epochs = [r["epoch"] for r in rows]
    pairs = [(0, 8), (1, 7), (2, 6), (3, 5)]  # (max, min), (93, 7), (84, 16), (69, 31)
    for ax, layer in zip(axes.flat, layers):
        series = [[r["weights"][layer][i] for r in rows] for i in range(len(PERCENTILES))]
        for shade, (hi, lo) in enumerate(pairs):
            ax.fill_between(epochs, series[lo], series[hi], alpha=0.15 + 0.15 * shade, color="tab:blue", lw=0,
                            label=f"{PERCENTILES[lo]}-{PERCENTILES[hi]} %")
        ax.plot(epochs, series[4], color="tab:blue", marker="o" if len(epochs) <= 10 else None, label="median")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("effective weight")
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, loc="best")
    return fig


def write_weight_bands(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """``weights.png``: :func:`weight_bands_figure`, written atomically (nothing without tracked rows)."""
    save_titled(weight_bands_figure(history), path, "weight percentiles per epoch", title)


__all__ = ["MAX_PANELS", "PERCENTILES", "TRACKERS", "parse_track", "percentiles", "tracked_layers", "weight_bands",
           "weight_bands_figure", "write_weight_bands"]

"""The end of every analysis plot: a wrapped title, a tight layout, an atomic PNG write, the figure closed."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from .._atomic import atomic_path


def save_titled(fig: Any, path: str | Path, heading: str, title: str = "", dpi: int = 90) -> None:
    """Title ``fig`` "heading: title" (wrapped: run titles name long recipe specs), write it to ``path`` and close
    it; ``fig`` None (nothing to draw) writes nothing."""
    if fig is None:
        return
    import matplotlib.pyplot as plt

    try:
        fig.suptitle(textwrap.fill(f"{heading}{': ' + title if title else ''}", 110), fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)


__all__ = ["save_titled"]

"""The end of every analysis plot: a wrapped title, a tight layout, an atomic PNG write, the figure closed."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from .._atomic import atomic_path


def save_titled(fig: Any, path: str | Path, heading: str, title: str = "", dpi: int = 90) -> None:
    """Title ``fig`` "heading: title" (wrapped: run titles name long recipe specs) and write it to ``path``."""
    fig.suptitle(textwrap.fill(f"{heading}{': ' + title if title else ''}", 110), fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


__all__ = ["save_titled"]

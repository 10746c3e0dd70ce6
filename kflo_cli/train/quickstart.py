"""``kflo quickstart``: the whole loop in under a minute on a laptop CPU, with nothing to download.

LeNet-5 (KFLO paper, Fig. 1c) on scikit-learn's bundled handwritten digits, trained twice by the same engine
with the same seed, data order and hyperparameters: once vanilla, once expanded with KFLO 2x4 and then
collapsed back to a plain LeNet-5. The reported KFLO accuracy is measured on the collapsed model, the artifact
one would deploy.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

from rich.table import Table

from .config import resolve_config
from .engine import start
from .report import make_console
from .summary import RunSummary

#: Hyperparameters of the quickstart (both runs): the schedule of the reproduction's digits table
#: (sweeps/digits-all.toml), under which KFLO 2x4 beat vanilla LeNet-5 on every one of 5 seeds (docs/reproduction.md);
#: small enough for a laptop CPU.
QUICKSTART = {
    "source": "lenet5",
    "data": "digits",
    "epochs": 15,
    "batch_size": 64,
    "optimizer": "sgd",
    "lr": 0.02,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "cosine",
    # LeNet-5's layers are too small to gain from intra-op threads, and spinning threads crawl on a busy CPU.
    "threads": 1,
}


@contextlib.contextmanager
def _root(output: str | Path | None) -> Iterator[Path]:
    if output is not None:
        path = Path(output)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="kflo-quickstart-") as tmp:
        yield Path(tmp)


def quickstart(output: str | Path | None = None, *, epochs: int | None = None, seed: int = 0, console: Any = None) -> dict[str, RunSummary]:
    """Train vanilla and KFLO 2x4 LeNet-5 on digits, collapse and verify the KFLO one, print both accuracies.

    Args:
        output: keep the two run directories under this folder (default: a temporary folder, removed after).
        epochs: override the number of epochs of both runs.
        seed: the seed of both runs (same initial weights, data order and augmentation).
        console: a rich console (default: stdout).

    Returns:
        ``{"vanilla": RunSummary, "kflo": RunSummary}`` (see :class:`kflo_cli.train.summary.RunSummary`).
    """
    out = console or make_console()
    settings = dict(QUICKSTART, seed=seed)
    if epochs is not None:
        settings["epochs"] = epochs
    with _root(output) as root:
        out.print("[bold]1/2[/] vanilla LeNet-5 on digits")
        vanilla = start(resolve_config(settings), root / "vanilla", overwrite=True, console=out).summary
        out.print("[bold]2/2[/] LeNet-5 expanded with KFLO 2x4 on digits, then collapsed")
        kflo = start(resolve_config({**settings, "recipe": ["kflo:depth=2,width=4"]}), root / "kflo-2x4", overwrite=True, console=out).summary
    collapsed = kflo.collapsed
    table = Table(title="quickstart: LeNet-5 on digits, same seed, data and hyperparameters")
    for col in ("model", "parameters trained", "parameters deployed", "test accuracy"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row("vanilla", f"{vanilla.params_trained:,}", f"{vanilla.params_trained:,}", f"{vanilla.final_test_acc:.2f}%")
    table.add_row("KFLO 2x4, collapsed", f"{kflo.params_trained:,}", f"{collapsed.params:,}", f"{collapsed.test_acc:.2f}%")
    out.print(table)
    n = kflo.test_samples
    out.print(f"{n} test images, so one image is {100 / n:.2f} points. This is one seed; over 5 seeds with this schedule "
              "the collapsed KFLO model was about a point better than vanilla on every seed (a paired t-test and the "
              "other methods: docs/reproduction.md, `kflo sweep sweeps/digits-all.toml`).")
    proof = collapsed.verification
    out.print(
        f"verification of the collapsed KFLO model: {'[green]PASS[/]' if proof.passed else '[red]FAIL[/]'} "
        f"(relative error {proof.rel_error:.2e}); loads strictly into a plain LeNet-5: {'yes' if collapsed.strict_load else 'NO'}"
    )
    if output is not None:
        out.print(f"runs kept in {output}")
    return {"vanilla": vanilla, "kflo": kflo}


__all__ = ["QUICKSTART", "quickstart"]

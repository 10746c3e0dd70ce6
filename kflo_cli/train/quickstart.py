"""``kflo quickstart``: the whole loop in under a minute on a laptop CPU, with nothing to download.

LeNet-5 (KFLO paper, Fig. 1c) on scikit-learn's bundled handwritten digits, trained twice by the same engine
with the same seed, data order and hyperparameters: once vanilla, once expanded with KFLO 2x4 and then
collapsed back to a plain LeNet-5. The reported KFLO accuracy is measured on the collapsed model, the artifact
one would deploy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .._atomic import STARTED, make_dirs, remove_made_dirs
from .._lock import LOCK_FILE, DirLock, try_lock
from ..errors import KfloError

if TYPE_CHECKING:
    from .summary import RunSummary

#: The prefix of the temporary folder of a quickstart without -o.
TEMP_PREFIX = "kflo-quickstart-"

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


def remove_stale_roots() -> None:
    """Remove the temporary folders of quickstarts without -o that were killed before they could delete them
    (older than this process and locked by no live quickstart)."""
    try:
        entries = [p for p in Path(tempfile.gettempdir()).glob(TEMP_PREFIX + "*") if p.is_dir() and not p.is_symlink()]
    except OSError:
        return
    for folder in entries:
        try:
            info = folder.stat()
        except OSError:
            continue
        if info.st_mtime >= STARTED or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
            continue
        lock = try_lock(folder)
        if lock is None:  # a live quickstart (or no way to tell)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        lock.release()


@contextlib.contextmanager
def _root(output: str | Path | None, overwrite: bool) -> Iterator[Path]:
    """The folder of the two runs, locked for the whole quickstart: ``output`` (refused when it holds anything
    but with ``overwrite``), or a temporary folder that is deleted at the end."""
    if output is None:
        remove_stale_roots()
        with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp, DirLock.acquire(tmp):
            yield Path(tmp)
        return
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise KfloError(f"{path} is a file; -o takes a folder for the two runs (choose another path)")
    created = make_dirs(path)
    try:
        with DirLock.acquire(path):
            if not overwrite and any(p.name != LOCK_FILE for p in path.iterdir()):
                raise KfloError(f"{path} is not empty (an earlier quickstart's runs?); replace its runs with --overwrite "
                                "or choose another -o")
            yield path
    finally:
        remove_made_dirs(path, created)  # only what is still empty: nothing was written


def quickstart(output: str | Path | None = None, *, epochs: int | None = None, seed: int = 0, console: Any = None,
               overwrite: bool = False) -> dict[str, RunSummary]:
    """Train vanilla and KFLO 2x4 LeNet-5 on digits, collapse and verify the KFLO one, print both accuracies.

    Args:
        output: keep the two run directories under this folder (default: a temporary folder, removed after); a
            folder that holds anything is refused unless ``overwrite``.
        epochs: override the number of epochs of both runs.
        seed: the seed of both runs (same initial weights, data order and augmentation).
        console: a rich console (default: stdout).
        overwrite: replace the runs of an earlier quickstart in ``output`` (other files are left alone).

    Returns:
        ``{"vanilla": RunSummary, "kflo": RunSummary}`` (see :class:`kflo_cli.train.summary.RunSummary`).
    """
    from rich.table import Table

    from .config import resolve_config
    from .engine import start
    from .report import make_console

    out = console or make_console()
    settings = dict(QUICKSTART, seed=seed)
    if epochs is not None:
        settings["epochs"] = epochs
    with _root(output, overwrite) as root:
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
    else:
        out.print("nothing was kept: without -o the runs (and the paths printed above) were in a temporary folder, now "
                  "deleted; pass -o DIR to keep them")
    return {"vanilla": vanilla, "kflo": kflo}


__all__ = ["QUICKSTART", "TEMP_PREFIX", "quickstart", "remove_stale_roots"]

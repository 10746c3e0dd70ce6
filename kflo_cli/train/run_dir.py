"""The run directory: its files, the checkpoints and metrics saved after every epoch, and the exact-resume state
(saved by :func:`save`, read back by :func:`restore`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from .. import checkpoint
from .._atomic import write_text_atomic
from ..errors import KfloError
from ..record import record
from . import report
from .config import CONFIG_FILE, TrainConfig
from .loader import stream_seed
from .parts import Parts, Run
from .plots import write_curves
from .state import STATE_FILE, Counters, capture_rng, restore_rng, save_state, seed_everything

#: Files a run writes; ``--overwrite`` removes exactly these (and nothing else) from RUN_DIR.
RUN_FILES = (
    CONFIG_FILE, STATE_FILE, "last.safetensors", "best.safetensors", "ema.safetensors", "collapsed.safetensors",
    "verification.json", "metrics.jsonl", "metrics.csv", "curves.png", "summary.json",
)


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory without ``--overwrite`` (continuing it is ``--resume``'s job)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise KfloError(f"{run_dir} is a file; -o takes a directory for the run")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise KfloError(f"{run_dir} is not empty; continue it with --resume {run_dir} or start over with --overwrite")


def create_run_dir(run_dir: Path, config: TrainConfig, overwrite: bool) -> None:
    """Make RUN_DIR (removing a previous run's files with ``overwrite``) and write ``config.json``."""
    if overwrite and run_dir.is_dir():
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def info(run: Run, parts: Parts, counters: Counters) -> dict[str, Any]:
    """The state's JSON block: the counters and what rebuilding the run needs (model metadata, data arguments)."""
    return {
        **counters.to_info(),
        "model_meta": checkpoint.model_metadata(parts.model),
        "vanilla": run.vanilla,
        "data_args": list(run.data_args),
        "input_size": list(run.input_size),
        "world_size": run.dist.world_size,
        "steps_per_epoch": run.steps_per_epoch,
        "num_train": run.num_train,
    }


def save(run: Run, parts: Parts, counters: Counters, *, end_of_epoch: bool) -> None:
    """Write last (and EMA; metrics and curves at the end of an epoch) and then the state, the file a resume trusts.

    Every rank takes part (their RNG states are gathered); only rank 0 writes.
    """
    rng = run.dist.gather_objects(capture_rng())
    if run.dist.is_main:
        extra = {"epoch": counters.epoch, "global_step": counters.global_step}
        checkpoint.save(parts.model, run.run_dir / "last.safetensors", extra=extra)
        if parts.ema is not None:
            checkpoint.save(parts.ema.module, run.run_dir / "ema.safetensors", extra=extra)
        if end_of_epoch:
            report.write_metrics(run.run_dir, counters.history)
            if counters.history:
                title = f"{record(parts.model).model_id} on {run.config.data}"
                write_curves(counters.history, run.run_dir / "curves.png", title=title)
        save_state(
            run.run_dir,
            model=parts.model.state_dict(),
            optimizer=parts.optimizer.state_dict(),
            ema=parts.ema.state_dict() if parts.ema is not None else None,
            scaler=parts.scaler.state_dict() if parts.scaler is not None else None,
            rng=rng,
            info=info(run, parts, counters),
        )
    run.dist.barrier()


def save_best(run: Run, parts: Parts, row: dict[str, Any], by: str) -> None:
    """``best.safetensors``: the model after the epoch of ``row`` (rank 0 writes)."""
    if run.dist.is_main:
        checkpoint.save(parts.model, run.run_dir / "best.safetensors", extra={"epoch": row["epoch"], f"{by}_acc": row[f"{by}_acc"]})


def restore(run: Run, parts: Parts, state: dict[str, Any]) -> Counters:
    """Put a saved state (see :func:`kflo_cli.train.state.load_state`) back into ``parts``; return its counters."""
    saved = state["info"]
    if saved["num_train"] != run.num_train or saved["steps_per_epoch"] != run.steps_per_epoch:
        raise KfloError(
            f"the training set has {run.num_train} samples now but {saved['num_train']} when the run was saved; "
            "resume with the same data (--data, --data-dir) or start a new run"
        )
    checkpoint.load_into(parts.model, state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.ema is not None and state["ema"] is not None:
        parts.ema.load_state_dict(state["ema"])
    if parts.scaler is not None and state["scaler"]:
        parts.scaler.load_state_dict(state["scaler"])
    counters = Counters.from_info(saved)
    rng = state["rng"]
    if len(rng) == run.dist.world_size:
        restore_rng(rng[run.dist.rank])
    else:
        run.console.print(f"[yellow]note[/]: the run was saved with {len(rng)} processes and resumes with "
                          f"{run.dist.world_size}; the data order is unchanged but dropout draws are not")
        seed_everything(stream_seed(run.config.seed, 0xD0, counters.global_step, run.dist.rank))
    return counters


__all__ = ["RUN_FILES", "check_run_dir", "create_run_dir", "info", "restore", "save", "save_best"]

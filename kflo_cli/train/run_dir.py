"""The run directory: its files, the checkpoints and metrics saved after every epoch, and the exact-resume state
(saved by :func:`save`, read back by :func:`restore`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import checkpoint
from .._atomic import make_dirs, remove_made_dirs, remove_stale_temps, write_text_atomic
from .._lock import LOCK_FILE, DirLock
from ..errors import KfloError
from . import report
from .config import CONFIG_FILE, IDENTITY_KEYS, TrainConfig
from .distributed import DistContext
from .loader import stream_seed
from .parts import Parts, Run
from .plots import run_title, write_curves
from .state import STATE_FILE, Counters, capture_rng, restore_rng, save_state, seed_everything

#: Files a run writes; ``--overwrite`` removes exactly these (and nothing else) from RUN_DIR.
RUN_FILES = (
    CONFIG_FILE, STATE_FILE, "last.safetensors", "best.safetensors", "ema.safetensors", "collapsed.safetensors",
    "verification.json", "metrics.jsonl", "metrics.csv", "curves.png", "weights.png", "gradient_confusion.png", "summary.json",
)


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory without ``--overwrite`` (continuing it is ``--resume``'s job)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise KfloError(f"{run_dir} is a file; -o takes a directory for the run")
    if run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()) and not overwrite:
        raise KfloError(f"{run_dir} is not empty; continue it with --resume {run_dir} or start over with --overwrite")


@contextlib.contextmanager
def locked(run_dir: Path, dist: DistContext, *, create: bool) -> Iterator[None]:
    """Hold RUN_DIR's lock (:class:`kflo_cli._lock.DirLock`) for the whole run: a second kflo process on the same
    directory is refused, naming the holder; the lock dies with its process, so a killed run leaves none.

    ``create`` makes the directory first (a new run); a directory made here and left empty (the run failed before
    writing anything) is removed again. Rank 0 locks; every rank gets its verdict, so none waits for a refused one.
    """
    lock: DirLock | None = None
    created, problem = None, None
    if dist.is_main:
        try:
            if create:
                created = make_dirs(run_dir)
            if run_dir.is_dir():
                lock = DirLock.acquire(run_dir, hint="choose another -o" if create else "stop it first")
        except KfloError as exc:
            problem = str(exc)
    if dist.enabled:
        problem = dist.gather_objects(problem)[0]
    if problem is not None:
        raise KfloError(problem)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
        remove_made_dirs(run_dir, created)  # only what is still empty: the run failed before writing anything


def new_run_id() -> str:
    """A new run's id (config.json, state.safetensors and the checkpoints carry it)."""
    return uuid.uuid4().hex


def fingerprint(model_meta: dict[str, Any]) -> str:
    """A short hash of what a run trains: the model id and arguments, the recipes with their globs and the
    rewritten layers, from a model's checkpoint metadata (:func:`kflo_cli.checkpoint.model_metadata`)."""
    what = {
        "model_id": model_meta.get("model_id"),
        "model_kwargs": model_meta.get("model_kwargs", {}),
        "recipes": model_meta.get("recipes", []),
        "selection": model_meta.get("selection", {}),
        "layers": [[x.get("name"), x.get("recipe_index"), x.get("type"), x.get("shape")] for x in model_meta.get("layers", [])],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def create_run_dir(run_dir: Path, config: TrainConfig, overwrite: bool, *, run_id: str | None = None,
                   fingerprint: str | None = None) -> None:
    """Make RUN_DIR (removing a previous run's files with ``overwrite``) and write ``config.json`` with the run's
    id and fingerprint."""
    make_dirs(run_dir)
    for name in RUN_FILES:
        if overwrite:
            try:
                (run_dir / name).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise KfloError(f"cannot remove {run_dir / name} of the previous run: {exc.strerror}; check its "
                                "permissions or choose another -o") from None
        remove_stale_temps(run_dir / name)  # what killed writes left (the lock says no one else writes here)
    identity = {"run_id": run_id, "fingerprint": fingerprint} if run_id is not None else {}
    write_text_atomic(run_dir / CONFIG_FILE, json.dumps({**config.to_dict(), **identity}, indent=2, sort_keys=True) + "\n")


def read_identity(run_dir: Path) -> dict[str, Any]:
    """``run_id`` and ``fingerprint`` of RUN_DIR/config.json (``None`` for a run of a kflo without run ids)."""
    try:
        data = json.loads((run_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        data = {}
    return {k: data.get(k) if isinstance(data, dict) else None for k in IDENTITY_KEYS}


def _describe(meta: dict[str, Any] | None) -> str:
    if not isinstance(meta, dict):
        return "an unknown model"
    recipes = [r.get("name", "?") for r in meta.get("recipes", []) if isinstance(r, dict)]
    return f"{meta.get('model_id')} " + (f"with {' + '.join(recipes)}" if recipes else "vanilla")


def _describe_config(config: TrainConfig) -> str:
    how = config.recipe + [f"recipe file {f}" for f in config.recipe_file]
    return f"{config.source} " + (f"with {' + '.join(how)}" if how else "without a recipe")


def check_identity(run_dir: Path, config: TrainConfig, info: dict[str, Any], note: Callable[[str], None]) -> str | None:
    """Refuse a state file and a config.json that belong to different runs (one sentence naming both files);
    return the run's id (``None`` for a run written by a kflo without run ids, accepted with a note)."""
    mine = read_identity(run_dir)
    state_id, state_print = info.get("run_id"), info.get("fingerprint")
    config_path, state_path = run_dir / CONFIG_FILE, run_dir / STATE_FILE
    fix = f"put back this run's own files or start over with -o {run_dir} --overwrite"
    if mine["run_id"] is None and state_id is None:
        note(f"{run_dir} was written by a kflo without run ids, so it cannot be checked that {CONFIG_FILE} and "
             f"{STATE_FILE} belong to the same run; resuming the model the state holds ({_describe(info.get('model_meta'))})")
        return None
    if mine["run_id"] != state_id:
        def who(run_id: Any) -> str:
            return f"run {str(run_id)[:8]}" if run_id else "a run without a run id"

        raise KfloError(f"{state_path} ({who(state_id)}, {_describe(info.get('model_meta'))}) and {config_path} "
                        f"({who(mine['run_id'])}, {_describe_config(config)}) belong to different runs; {fix}")
    if mine["fingerprint"] != state_print or state_print != fingerprint(info.get("model_meta") or {}):
        raise KfloError(f"{state_path} holds {_describe(info.get('model_meta'))}, which is not the model {config_path} "
                        f"recorded for run {str(state_id)[:8]} (their fingerprints differ); {fix}")
    return state_id


#: The storage layout of the recipes' factors, which the optimizer's per-parameter state follows; states without the
#: entry are layout 1. A parametrization whose storage changed says since which layout with a ``factor_layout``
#: attribute (DO-Conv's W per input channel: 2, 2026-12-03) and its method's name as ``title``, and a state saved
#: before it is refused on resume.
FACTOR_LAYOUT = 2


def info(run: Run, parts: Parts, counters: Counters) -> dict[str, Any]:
    """The state's JSON block: the counters and what rebuilding the run needs (model metadata, data arguments)."""
    meta = checkpoint.model_metadata(parts.model)
    return {
        **counters.to_info(),
        "run_id": run.run_id,
        "fingerprint": fingerprint(meta) if run.run_id is not None else None,
        "model_meta": meta,
        "vanilla": run.vanilla,
        "data_args": list(run.data_args),
        "input_size": list(run.input_size),
        "world_size": run.dist.world_size,
        "steps_per_epoch": run.steps_per_epoch,
        "num_train": run.num_train,
        "factor_layout": FACTOR_LAYOUT,
    }


def save(run: Run, parts: Parts, counters: Counters, *, end_of_epoch: bool) -> None:
    """Write last (and EMA; metrics and curves at the end of an epoch) and then the state, the file a resume trusts.

    Every rank takes part (their RNG states are gathered); only rank 0 writes.
    """
    rng = run.dist.gather_objects(capture_rng())
    if run.dist.is_main:
        extra = {"epoch": counters.epoch, "global_step": counters.global_step, **_run_extra(run)}
        checkpoint.save(parts.model, run.run_dir / "last.safetensors", extra=extra)
        if parts.ema is not None:
            checkpoint.save(parts.ema.module, run.run_dir / "ema.safetensors", extra=extra)
        if end_of_epoch:
            report.write_metrics(run.run_dir, counters.history)
            if counters.history:
                write_curves(counters.history, run.run_dir / "curves.png", title=run_title(parts.model, run.config.data))
                if any("weights" in row for row in counters.history):
                    from ..analysis.tracking import write_weight_bands

                    write_weight_bands(counters.history, run.run_dir / "weights.png",
                                       title=run_title(parts.model, run.config.data))
                if any("grad_cos" in row for row in counters.history):
                    from ..analysis.confusion import write_density

                    write_density(counters.history, run.run_dir / "gradient_confusion.png",
                                  title=run_title(parts.model, run.config.data))
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


def _run_extra(run: Run) -> dict[str, Any]:
    """What a checkpoint's ``extra`` says about the run that wrote it."""
    return {"run_id": run.run_id} if run.run_id is not None else {}


def save_best(run: Run, parts: Parts, row: dict[str, Any], by: str) -> None:
    """``best.safetensors``: the model after the epoch of ``row`` (rank 0 writes)."""
    if run.dist.is_main:
        checkpoint.save(parts.model, run.run_dir / "best.safetensors",
                        extra={"epoch": row["epoch"], f"{by}_acc": row[f"{by}_acc"], **_run_extra(run)})


def check_checkpoint(run: Run, path: Path) -> None:
    """Refuse a checkpoint of RUN_DIR that another run wrote (its ``extra`` names another run id)."""
    if run.run_id is None:
        return
    meta = checkpoint.read_metadata(path) or {}
    written_by = (meta.get("extra") or {}).get("run_id")
    if written_by != run.run_id:
        raise KfloError(f"{path} was written by {'run ' + str(written_by)[:8] if written_by else 'another run'}, not by "
                        f"run {run.run_id[:8]} of {run.run_dir / CONFIG_FILE}; put back this run's own file or start "
                        f"over with -o {run.run_dir} --overwrite")


def check_optimizer_state(optimizer: torch.optim.Optimizer, run: Run) -> None:
    """Refuse an optimizer state whose per-parameter tensors (momentum, Adam's moments) do not have their parameter's
    shape: ``load_state_dict`` does not check, and the first step would fail or, with equal element counts, run
    with scrambled momentum (a state edited by hand, or saved by code that laid a factor out differently)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    raise KfloError(
                        f"the optimizer state in {run.run_dir} has a '{name}' of shape {tuple(value.shape)} for a "
                        f"parameter of shape {tuple(param.shape)}, so it does not belong to this model; start the run "
                        f"over with -o {run.run_dir} --overwrite")


def restore(run: Run, parts: Parts, state: dict[str, Any]) -> Counters:
    """Put a saved state (see :func:`kflo_cli.train.state.load_state`) back into ``parts``; return its counters."""
    saved = state["info"]
    if saved["num_train"] != run.num_train or saved["steps_per_epoch"] != run.steps_per_epoch:
        raise KfloError(
            f"the training set has {run.num_train} samples now but {saved['num_train']} when the run was saved; "
            "resume with the same data (--data, --data-dir) or start a new run"
        )
    changed = [m for m in parts.model.modules() if getattr(m, "factor_layout", 1) > saved.get("factor_layout", 1)]
    if changed:
        raise KfloError(f"{run.run_dir} was saved by a kflo version that stored {changed[0].title}'s factors "
                        "in another layout, which the saved optimizer state follows; finish the run with that version, "
                        f"or start it over with -o {run.run_dir} --overwrite")
    checkpoint.load_into(parts.model, state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    check_optimizer_state(parts.optimizer, run)
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


__all__ = ["RUN_FILES", "check_checkpoint", "check_identity", "check_run_dir", "create_run_dir", "fingerprint", "info",
           "locked", "new_run_id", "read_identity", "restore", "save", "save_best"]

"""``kflo train``'s entry points, :func:`start` and :func:`resume`, and :func:`fit`, the run from its first
step to the deployed model. It reads top to bottom; each step is a function with one job:

* set-up: :func:`kflo_cli.train.source.prepare` (model, recipes, data), :func:`~kflo_cli.train.parts.build_parts`
  (optimizer, schedule, AMP, EMA, teacher);
* training: :func:`~kflo_cli.train.loop.train_one_epoch`, :func:`~kflo_cli.train.loop.epoch_metrics`
  (evaluation and the divergence checks);
* checkpointing: :func:`~kflo_cli.train.run_dir.save` / :func:`~kflo_cli.train.run_dir.restore` (exact resume);
* the end: :func:`~kflo_cli.train.finish.finish` (collapse, verify, measure, summary).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from rich.markup import escape

from .._atomic import remove_stale_temps
from ..checkpoint import model_metadata
from ..errors import KfloError
from . import report, run_dir as files
from .config import CONFIG_FILE, TrainConfig, check_resume_overrides, load_config
from .distributed import DistContext, setup
from .finish import finish
from .loader import stream_seed
from .loop import TrainingDiverged, epoch_metrics, task_loss, train_one_epoch
from .optim import penalty_rows
from .parts import Parts, Run, build_parts, make_run
from .source import Prepared, load_data, prepare
from .state import Counters, load_state, seed_everything
from .summary import RunSummary

RUN_FILES = files.RUN_FILES
#: The exit status of an interrupted run (128 + SIGINT, the shell convention).
EXIT_INTERRUPTED = 130


class TrainingInterrupted(Exception):
    """A run stopped early (signal or ``stop_after_steps``) after saving a resumable state."""

    def __init__(self, run_dir: Path, epoch: int, step: int, reason: str) -> None:
        self.run_dir, self.epoch, self.step, self.reason = run_dir, epoch, step, reason
        super().__init__(
            f"{reason}: stopped in epoch {epoch + 1} after global step {step}; the state is saved. "
            f"Resume with: kflo train --resume {run_dir}"
        )


@dataclass
class TrainResult:
    """What :func:`start` / :func:`resume` return: the run directory and its summary (also in summary.json)."""

    run_dir: Path
    summary: RunSummary


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks after each step; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


# -- the run -----------------------------------------------------------------------------------------------------
def fit(run: Run, parts: Parts, counters: Counters, stop_after_steps: int | None = None) -> RunSummary:
    """Train the remaining epochs, saving after each; then collapse, verify and summarise the run."""
    config, main = run.config, run.dist.is_main
    if main:
        run.console.print(report.group_table(parts.groups, penalty_rows(parts.model, config), config.optimizer))
    while counters.epoch < config.epochs:
        epoch = train_one_epoch(run, parts, counters, stop_after_steps=stop_after_steps)
        if epoch.stopped:
            files.save(run, parts, counters, end_of_epoch=False)
            raise TrainingInterrupted(run.run_dir, counters.epoch, counters.global_step, epoch.stopped)
        row = epoch_metrics(run, parts, counters, epoch.seconds, epoch.images)
        row.update(tracked(run, parts, counters.epoch))
        by = "val" if run.data.val is not None else "test"
        if counters.end_epoch(row, by):
            files.save_best(run, parts, row, by)
        files.save(run, parts, counters, end_of_epoch=True)
        if main:
            run.console.print(report.epoch_line(row, config.epochs))
        if run.stop.signal is not None:  # arrived during the evaluation
            raise TrainingInterrupted(run.run_dir, counters.epoch, counters.global_step, f"received {signal.Signals(run.stop.signal).name}")
    began = time.perf_counter()
    summary = finish(run, parts, counters)
    counters.finished = True
    files.save(run, parts, counters, end_of_epoch=False)
    summary.seconds_final = time.perf_counter() - began
    if main:
        run.console.print(report.summary_table(summary))
    return summary


# -- entry points ------------------------------------------------------------------------------------------------
def tracked(run: Run, parts: Parts, epoch: int) -> dict[str, Any]:
    """The ``--track`` measurements of the epoch just trained (:mod:`kflo_cli.analysis.tracking`), for its row."""
    from ..analysis.tracking import parse_track, tracked_layers, weight_bands

    out: dict[str, Any] = {}
    for spec in run.config.track:
        name, options = parse_track(spec)
        if name == "weights":
            layers = tracked_layers(parts.model, options.get("layers"))
            if not layers:
                raise KfloError(f"--track {spec}: no filtering layer matches; see `kflo expand {run.config.source} "
                                "--recipe ... --dry-run` for the layer names")
            out["weights"] = weight_bands(parts.model, layers)
        elif name == "gradient-confusion" and run.dist.is_main:
            params = options.get("params", "trained")
            for wrt in (("trained", "composed") if params == "both" else (params,)):
                out.update(gradient_confusion(run, parts, int(options.get("pairs", 100)), epoch, wrt))
    return out


def gradient_confusion(run: Run, parts: Parts, pairs: int, epoch: int, wrt: str = "trained") -> dict[str, Any]:
    """Cosine similarities of the gradients of ``pairs`` pairs of training mini-batches (a copy of the model, its own
    seeded batches, every RNG state restored: the training does not change); see kflo_cli/analysis/confusion.py.

    ``wrt="composed"`` takes the gradients of the collapsed copy (the composed weights, same function, same batches);
    its keys are ``grad_cos_composed*``."""
    from ..analysis.confusion import pair_similarities
    from ..surgery import copy_model, is_expanded
    from .loader import iterate, train_loader
    from .state import capture_rng, restore_rng

    config = run.config
    rng = capture_rng()
    try:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)  # its own batches, per epoch
        size = min(config.batch_size, len(run.data.train))
        picks = torch.randint(len(run.data.train), (2 * pairs, size), generator=generator).tolist()
        # (stream, index) keys of the training loader: a stream no training epoch uses, so augmentation differs
        batches = [[(1_000_000 + epoch, i) for i in rows] for rows in picks]
        model = copy_model(parts.model)
        if wrt == "composed" and is_expanded(model):
            model = composed_view(model)
        model.train()
        device = run.dist.device
        data = [(x.to(device), y.to(device)) for x, y in iterate(train_loader(run.data.train, batches, seed=config.seed))]
        sims = pair_similarities(model, data, lambda out, y: task_loss(out, y, None, 0.0, 1.0))
    finally:
        restore_rng(rng)
    key = "grad_cos" if wrt == "trained" else "grad_cos_composed"
    return {f"{key}_min": min(sims), f"{key}_mean": sum(sims) / len(sims), key: sims}


def composed_view(model: nn.Module) -> nn.Module:
    """The collapsed network of an expanded ``model``, for gradients with respect to the composed weights (refused
    where that is not the same function in training mode: :func:`composed_problem`)."""
    from ..surgery import collapse

    problem = composed_problem(model)
    if problem is not None:
        raise KfloError(problem)
    return collapse(model)


def composed_problem(model: nn.Module) -> str | None:
    """Why the collapsed network is not the same function as ``model`` in training mode, or None. Weight recipes
    compose weights and keep it; a structural recipe such as ACNet folds BatchNorms that normalise by batch
    statistics in training."""
    from ..reparam.base import WeightRecipe
    from ..surgery import rewritten_layers

    structural = sorted({recipe.name for _, _, recipe in rewritten_layers(model) if not isinstance(recipe, WeightRecipe)})
    if structural:
        return (f"--track gradient-confusion:params=composed needs a training-mode function equal to the collapsed "
                f"network's, which {', '.join(structural)} does not have (its collapse folds BatchNorms); use "
                "params=trained")
    return None


def check_tracking(config: TrainConfig, model: nn.Module) -> None:
    """Refuse, before the run starts, a ``--track`` measurement this model cannot give."""
    from ..analysis.tracking import parse_track, tracked_layers

    for spec in config.track:
        name, options = parse_track(spec)
        if name == "weights" and not tracked_layers(model, options.get("layers")):
            raise KfloError(f"--track {spec}: no filtering layer matches; see `kflo expand {config.source} "
                            "--recipe ... --dry-run` for the layer names")
        if name == "gradient-confusion" and options.get("params", "trained") != "trained":
            problem = composed_problem(model)
            if problem is not None:
                raise KfloError(problem)


def default_threads() -> tuple[int, str]:
    """The thread count of a run without ``--threads``, and why: the cores this process may use that the machine's
    1-minute load average leaves idle (at least 1, at most PyTorch's own default). On a busy 2-core machine torch's
    default of 2 threads made ``kflo train`` 1.7x slower than 1 thread (docs/training.md), and 9x in another
    measurement, because the threads wait for each other on a core that other work holds."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return torch.get_num_threads(), "PyTorch's default (no load average on this system)"
    idle = int(cores - load + 0.5)
    threads = max(1, min(torch.get_num_threads(), idle))
    return threads, f"{cores} cores, load average {load:.1f}"


def _set_threads(config: TrainConfig) -> None:
    # Part of the config because CPU float reductions depend on the thread count, so a resumed run must match.
    if config.threads is not None:
        torch.set_num_threads(config.threads)


@contextlib.contextmanager
def _closing(dist: DistContext) -> Iterator[DistContext]:
    try:
        yield dist
    finally:
        dist.close()


def _console(dist: DistContext, console: Any) -> Any:
    if console is not None and dist.is_main:
        return console
    out = report.make_console()
    if not dist.is_main:
        out.quiet = True
    return out


def _announce_recipe_file_settings(run: Run) -> None:
    """One line naming the settings a recipe file's ``[train]`` table gave (the command line overrides them)."""
    taken = run.config.from_recipe_file
    if taken and run.dist.is_main:
        files_ = ", ".join(run.config.recipe_file)
        run.console.print(f"from recipe file{'s' if len(run.config.recipe_file) > 1 else ''} {files_}: "
                          + ", ".join(f"{k}={v}" if isinstance(v, str) else f"{k}={v!r}" for k, v in taken.items()),
                          markup=False, highlight=False)


def start(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    data: Any = None,
    stop_after_steps: int | None = None,
    console: Any = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``config`` into a new run directory.

    Args:
        config: the resolved configuration (see :func:`kflo_cli.train.resolve_config`).
        run_dir: where everything is written; must be empty or absent unless ``overwrite``.
        overwrite: remove a previous run's files from ``run_dir`` first (other files are left alone).
        data: a ready :class:`kflo_cli.data.DataBundle` instead of building ``config.data``.
        stop_after_steps: stop (as if interrupted) once this many optimizer steps are done in total.
        console: a rich console for output (default: stdout).
        progress: show progress bars on a terminal.

    Raises:
        TrainingInterrupted: a signal or ``stop_after_steps`` stopped the run after saving its state.
        TrainingDiverged: the loss became non-finite.
    """
    run_dir = Path(run_dir)
    config.validate()
    threads_note = None
    if config.threads is None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # chosen once and recorded in config.json: a resumed run keeps the thread count (float sums depend on it)
        config.threads, why = default_threads()
        threads_note = f"{config.threads} CPU thread{'s' if config.threads > 1 else ''} ({why}); --threads N sets it"
    _set_threads(config)
    stop = StopFlag()
    dist = setup(config.device)
    with stop.installed(), _closing(dist), files.locked(run_dir, dist, create=True):
        files.check_run_dir(run_dir, overwrite)
        dist.barrier()
        seed_everything(config.seed)
        prepared = prepare(config, data)
        out = _console(dist, console)
        if prepared.note and dist.is_main:
            out.print(f"[yellow]note[/]: {prepared.note}")
        if threads_note and dist.is_main:
            out.print(f"[yellow]note[/]: {threads_note}", highlight=False)
        run_id = dist.gather_objects(files.new_run_id())[0]  # rank 0's
        run = make_run(config, run_dir, dist, prepared, console=out, stop=stop, progress=progress, run_id=run_id)
        _announce_recipe_file_settings(run)
        parts = build_parts(run, prepared.model)
        check_tracking(config, parts.model)
        # The loop's own random stream (dropout), distinct per rank; data randomness is seeded per sample.
        seed_everything(stream_seed(config.seed, 0xD0, dist.rank))
        if dist.is_main:
            files.create_run_dir(run_dir, config, overwrite, run_id=run_id,
                                 fingerprint=files.fingerprint(model_metadata(parts.model)))
        dist.barrier()
        counters = Counters()
        files.save(run, parts, counters, end_of_epoch=False)
        return TrainResult(run_dir, fit(run, parts, counters, stop_after_steps))


def resume(
    run_dir: str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    data: Any = None,
    stop_after_steps: int | None = None,
    console: Any = None,
    progress: bool = True,
) -> TrainResult:
    """Continue a run from ``RUN_DIR/state.safetensors``; it ends bit-identical (on CPU) to an uninterrupted run.

    ``overrides`` (command-line options) must agree with the saved ``config.json``.
    """
    from ..pipeline import rebuild

    run_dir = Path(run_dir)
    config = load_config(run_dir)
    check_resume_overrides(config, overrides or {})
    _set_threads(config)
    stop = StopFlag()
    dist = setup(config.device)
    with stop.installed(), _closing(dist), files.locked(run_dir, dist, create=False):
        if load_config(run_dir) != config:  # another process finished a run here since it was read: start again
            raise KfloError(f"{run_dir / CONFIG_FILE} changed while this run was starting; run the command again")
        out = _console(dist, console)
        state = load_state(run_dir)
        saved = state["info"]
        run_id = files.check_identity(run_dir, config, saved,
                                      lambda text: out.print(f"[yellow]note[/]: {escape(text)}", highlight=False))
        if dist.is_main:
            for name in files.RUN_FILES:  # what killed writes left (the lock says no one else writes here)
                remove_stale_temps(run_dir / name)
        seed_everything(config.seed)
        in_chans, img_size = saved["data_args"]
        if data is None:
            data = load_data(config, in_chans=in_chans, img_size=img_size)
        model = rebuild(saved["model_meta"])  # placeholder tensors: the state's replace them in restore()
        prepared = Prepared(model, data, tuple(saved["input_size"]), saved["vanilla"], data_args=(in_chans, img_size))
        run = make_run(config, run_dir, dist, prepared, console=out, stop=stop, progress=progress, run_id=run_id)
        _announce_recipe_file_settings(run)
        parts = build_parts(run, model)
        counters = files.restore(run, parts, state)
        if dist.is_main:
            where = ("the end, redoing the final collapse" if counters.epoch >= config.epochs
                     else f"epoch {counters.epoch + 1}, step {counters.step_in_epoch}")
            out.print(f"resuming {run_dir} at {where} (global step {counters.global_step})")
        return TrainResult(run_dir, fit(run, parts, counters, stop_after_steps))


__all__ = [
    "EXIT_INTERRUPTED",
    "RUN_FILES",
    "StopFlag",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "fit",
    "resume",
    "start",
    "task_loss",
]

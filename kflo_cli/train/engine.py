"""The training engine of ``kflo train``: one loop for vanilla and expanded models, exact resume, DDP, and the
collapse-and-verify step that turns the trained model into the deployed one.

The loop reads top to bottom: :func:`start` / :func:`resume` set up a run directory and call :class:`Run`,
whose :meth:`Run.fit` trains epoch by epoch (:meth:`Run.train_step`, :meth:`Run.evaluate`,
:meth:`Run.end_epoch`) and then :meth:`Run.finish` collapses, verifies and measures the deployed model.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .. import checkpoint
from .._atomic import write_text_atomic
from ..errors import KfloError
from ..reparam.base import rebuilding
from ..surgery import collapse, collapse_problem
from . import report
from .config import CONFIG_FILE, TrainConfig, check_resume_overrides, load_config
from .distributed import DistContext, setup, wrap
from .ema import ModelEma
from .loader import epoch_batches, eval_loader, iterate, per_rank_batch, steps_per_epoch, stream_seed, train_loader
from .optim import (
    ModifiedAdaptiveStep,
    Schedule,
    build_optimizer,
    build_param_groups,
    composed_decay_layers,
    optimizer_step,
    penalty_rows,
    total_penalty,
)
from .plots import write_curves
from .source import Prepared, load_data, load_teacher, prepare
from .state import STATE_FILE, capture_rng, load_state, restore_rng, save_state, seed_everything

#: Files a run writes; ``--overwrite`` removes exactly these (and nothing else) from RUN_DIR.
RUN_FILES = (
    CONFIG_FILE, STATE_FILE, "last.safetensors", "best.safetensors", "ema.safetensors", "collapsed.safetensors",
    "verification.json", "metrics.jsonl", "metrics.csv", "curves.png", "summary.json",
)
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


class TrainingDiverged(KfloError):
    """The loss became non-finite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What :func:`start` / :func:`resume` return: the run directory and its summary (also in summary.json)."""

    run_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


# -- run directory -------------------------------------------------------------------------------------------
def _check_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise KfloError(f"{run_dir} is a file; -o takes a directory for the run")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise KfloError(f"{run_dir} is not empty; continue it with --resume {run_dir} or start over with --overwrite")


def _clear_run_dir(run_dir: Path) -> None:
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks after each step; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator["_StopFlag"]:
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


def task_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float, temperature: float) -> torch.Tensor:
    """Cross-entropy, or Hinton's distillation loss ``(1-a) CE + a T^2 KL(teacher_T || student_T)``."""
    ce = F.cross_entropy(logits.float(), labels)
    if teacher_logits is None:
        return ce
    t = temperature
    kd = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(teacher_logits.float() / t, 1), reduction="batchmean", log_target=True)
    return (1.0 - alpha) * ce + alpha * t * t * kd


class Run:
    """One training run in one process (one rank of a DDP job)."""

    def __init__(self, config: TrainConfig, run_dir: Path, ctx: DistContext, prepared: Prepared, *, console: Any, show_progress: bool, stop: "_StopFlag") -> None:
        self.config, self.run_dir, self.ctx = config, run_dir, ctx
        self.console = console
        self.show_progress = show_progress and ctx.is_main and console.is_terminal
        self.data = prepared.data
        self.vanilla = prepared.vanilla
        self.input_size = prepared.input_size
        self.data_args = prepared.data_args
        self.model = prepared.model.to(ctx.device).train()
        self.groups = build_param_groups(self.model, config)
        self.optimizer = build_optimizer(self.groups, config)
        self.modified = ModifiedAdaptiveStep(self.model, self.optimizer, self.groups)
        self.composed = composed_decay_layers(self.model, config)
        self.parametrized = [(m, n) for m in self.model.modules() if parametrize.is_parametrized(m) for n in m.parametrizations]
        self.ema = ModelEma(self.model, config.ema) if config.ema else None
        self.teacher = load_teacher(config, self.input_size, self.data.num_classes)
        if self.teacher is not None:
            self.teacher.to(ctx.device)
        self.autocast, self.scaler = self._amp()
        self.num_train = len(self.data.train)
        self.steps_per_epoch = steps_per_epoch(self.num_train, config.batch_size)
        per_rank_batch(config.batch_size, ctx.world_size)  # refuse a bad split before anything is written
        self.schedule = Schedule.from_config(config, self.steps_per_epoch)
        self.net = wrap(self.model, ctx)
        self.stop = stop
        # counters and the running sums of the epoch in progress
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.sums = {"loss": 0.0, "correct": 0.0, "count": 0.0, "penalty": 0.0, "steps": 0}
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.finished = False
        self.last_lr = config.lr

    # -- set-up ---------------------------------------------------------------------------------------------
    def _amp(self) -> tuple[Any, torch.amp.GradScaler | None]:
        if not self.config.amp:
            return contextlib.nullcontext, None
        kind = self.ctx.device.type
        if kind == "cuda":
            return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
        if kind == "cpu":
            # bfloat16 has float32's range, so no loss scaling is needed on the CPU.
            return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), None
        raise KfloError(f"--amp is not supported on device {kind}; drop --amp")

    def info(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "sums": dict(self.sums),
            "history": self.history,
            "best": self.best,
            "finished": self.finished,
            "model_meta": checkpoint.model_metadata(self.model),
            "vanilla": self.vanilla,
            "data_args": list(self.data_args),
            "input_size": list(self.input_size),
            "world_size": self.ctx.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "num_train": self.num_train,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where a saved state left off."""
        info = state["info"]
        if info["num_train"] != self.num_train or info["steps_per_epoch"] != self.steps_per_epoch:
            raise KfloError(
                f"the training set has {self.num_train} samples now but {info['num_train']} when the run was saved; "
                "resume with the same data (--data, --data-dir) or start a new run"
            )
        checkpoint.load_into(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        for key in ("epoch", "step_in_epoch", "global_step", "history", "best", "finished"):
            setattr(self, key, info[key])
        self.sums = dict(info["sums"])
        rng = state["rng"]
        if len(rng) == self.ctx.world_size:
            restore_rng(rng[self.ctx.rank])
        else:
            self.console.print(f"[yellow]note[/]: the run was saved with {len(rng)} processes and resumes with {self.ctx.world_size}; the data order is unchanged but dropout draws are not")
            seed_everything(stream_seed(self.config.seed, 0xD0, self.global_step, self.ctx.rank))

    # -- saving ---------------------------------------------------------------------------------------------
    def save(self, *, end_of_epoch: bool) -> None:
        """Write last (and best, EMA, metrics, curves) and then the state, the file a resume trusts.

        Every rank takes part (their RNG states are gathered); only rank 0 writes.
        """
        rng = self.ctx.gather_objects(capture_rng())
        if self.ctx.is_main:
            extra = {"epoch": self.epoch, "global_step": self.global_step}
            checkpoint.save(self.model, self.run_dir / "last.safetensors", extra=extra)
            if self.ema is not None:
                checkpoint.save(self.ema.module, self.run_dir / "ema.safetensors", extra=extra)
            if end_of_epoch:
                report.write_metrics(self.run_dir, self.history)
                if self.history:
                    write_curves(self.history, self.run_dir / "curves.png", title=f"{self.model.kflo_model_id} on {self.config.data}")
            save_state(
                self.run_dir,
                model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                ema=self.ema.state_dict() if self.ema is not None else None,
                scaler=self.scaler.state_dict() if self.scaler is not None else None,
                rng=rng,
                info=self.info(),
            )
        self.ctx.barrier()

    # -- training -------------------------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the rank-summed [loss*n, correct, n, non-finite, stop] statistics."""
        device = self.ctx.device
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        self.last_lr = self.schedule.apply(self.optimizer, self.global_step, self.config.lr)
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad(), self.autocast():
                teacher_logits = self.teacher(images)
        # cached(): each composed weight is computed once per step, for the forward and the penalty alike, and
        # here, outside autocast, so composition runs in float32 even with --amp (the layer's op casts after)
        with parametrize.cached():
            for module, name in self.parametrized:
                getattr(module, name)
            with self.autocast():
                logits = self.net(images)
            loss = task_loss(logits, labels, teacher_logits, self.config.kd_alpha, self.config.kd_temperature)
            penalty = total_penalty(self.model, self.config, self.composed).to(loss.device)
        total = loss + penalty
        n = labels.shape[0]
        stats = torch.stack([
            loss.detach().float() * n,
            (logits.detach().argmax(1) == labels).sum().float(),
            torch.tensor(float(n), device=device),
            (~torch.isfinite(total.detach())).float(),
            torch.tensor(0.0 if self.stop.signal is None else 1.0, device=device),
        ]).to(torch.float64)
        self.ctx.all_reduce_sum(stats)
        if stats[3] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(f"the loss became {total.item()} in epoch {self.epoch + 1} at step {self.global_step + 1}")
        optimizer_step(total, self.optimizer, self.model.parameters(), scaler=self.scaler, clip_norm=self.config.grad_clip)
        if self.ema is not None:
            self.ema.update(self.model)
        self.global_step += 1
        self.step_in_epoch += 1
        self.sums["loss"] += float(stats[0])
        self.sums["correct"] += float(stats[1])
        self.sums["count"] += float(stats[2])
        self.sums["penalty"] += float(penalty.detach())
        self.sums["steps"] += 1
        return stats

    def _diverged(self, what: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"training diverged: {what}; {self.run_dir} keeps the last good checkpoint (last.safetensors and the "
            "state saved before it); lower --lr, or add --grad-clip or --warmup-epochs, and start again with --overwrite"
        )

    @torch.no_grad()
    def _check_finite(self, row: dict[str, Any]) -> None:
        """Refuse to save an epoch whose weights or evaluation losses are not finite (a step can blow the weights
        up without a non-finite training loss, e.g. the last step of an epoch)."""
        bad = [k for k in ("val_loss", "test_loss") if k in row and not math.isfinite(row[k])]
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not bool(finite):
            bad.insert(0, "the weights")
        if bad:
            raise self._diverged(f"{' and '.join(bad)} became non-finite by the end of epoch {self.epoch + 1}")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Any) -> tuple[float, float]:
        """(mean loss, accuracy in %) of ``model`` on ``dataset``, each rank taking a share, sums reduced."""
        was = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)
        loader = eval_loader(dataset, self.config.eval_batch_size, rank=self.ctx.rank, world_size=self.ctx.world_size,
                             num_workers=self.config.num_workers, pin_memory=self.ctx.device.type == "cuda")
        for images, labels in iterate(loader):
            images, labels = images.to(self.ctx.device), labels.to(self.ctx.device)
            logits = model(images).float()
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums[1] += (logits.argmax(1) == labels).sum()
            sums[2] += labels.shape[0]
        self.ctx.all_reduce_sum(sums)
        model.train(was)
        count = max(1.0, float(sums[2]))
        return float(sums[0]) / count, 100.0 * float(sums[1]) / count

    def end_epoch(self, seconds: float, images: int) -> dict[str, Any]:
        """Evaluate, record the epoch's metrics, save checkpoints and the state."""
        self.ctx.broadcast_buffers(self.model)
        if self.ema is not None:  # each rank averaged its own BatchNorm statistics; rank 0's are the ones saved
            self.ctx.broadcast_buffers(self.ema.module)
        count = max(1.0, self.sums["count"])
        row: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            # the rate of the epoch's last step, from the schedule (right after a resume no step has run yet)
            "lr": self.config.lr * self.schedule.factor(max(0, self.global_step - 1)),
            "train_loss": self.sums["loss"] / count,
            "train_acc": 100.0 * self.sums["correct"] / count,
            "penalty": self.sums["penalty"] / max(1, self.sums["steps"]),
        }
        if self.data.val is not None:
            row["val_loss"], row["val_acc"] = self.evaluate(self.model, self.data.val)
        row["test_loss"], row["test_acc"] = self.evaluate(self.model, self.data.test)
        self._check_finite(row)
        if self.ema is not None:
            if self.data.val is not None:
                row["ema_val_acc"] = self.evaluate(self.ema.module, self.data.val)[1]
            row["ema_test_loss"], row["ema_test_acc"] = self.evaluate(self.ema.module, self.data.test)
        row["images_per_s"] = images / seconds if seconds > 0 else 0.0
        row["seconds"] = seconds
        self.history.append(row)
        by = "val" if self.data.val is not None else "test"
        improved = self.best is None or row[f"{by}_acc"] > self.best["value"]
        if improved:
            self.best = {"by": by, "value": row[f"{by}_acc"], "epoch": row["epoch"]}
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums = {"loss": 0.0, "correct": 0.0, "count": 0.0, "penalty": 0.0, "steps": 0}
        if improved and self.ctx.is_main:
            checkpoint.save(self.model, self.run_dir / "best.safetensors", extra={"epoch": row["epoch"], f"{by}_acc": row[f"{by}_acc"]})
        self.save(end_of_epoch=True)
        if self.ctx.is_main:
            self.console.print(report.epoch_line(row, self.config.epochs))
        return row

    def _interrupt(self, reason: str) -> None:
        self.save(end_of_epoch=False)
        raise TrainingInterrupted(self.run_dir, self.epoch, self.global_step, reason)

    def fit(self, stop_after_steps: int | None = None) -> dict[str, Any]:
        """Train the remaining epochs, then :meth:`finish`. Returns the summary."""
        cfg = self.config
        if self.ctx.is_main:
            self.console.print(report.group_table(self.groups, penalty_rows(self.model, cfg, self.composed), cfg.optimizer))
        while self.epoch < cfg.epochs:
            batches = epoch_batches(self.num_train, cfg.batch_size, seed=cfg.seed, epoch=self.epoch,
                                    rank=self.ctx.rank, world_size=self.ctx.world_size)[self.step_in_epoch:]
            loader = train_loader(self.data.train, batches, seed=cfg.seed, num_workers=cfg.num_workers,
                                  pin_memory=self.ctx.device.type == "cuda")
            start, images = time.perf_counter(), 0
            with self._progress(len(batches)) as tick:
                for x, y in iterate(loader):
                    stats = self.train_step(x, y)
                    images += int(stats[2])
                    tick(stats, images / max(1e-9, time.perf_counter() - start))
                    if stats[4] > 0:
                        self._interrupt(f"received {signal.Signals(self.stop.signal or signal.SIGINT).name}")
                    if stop_after_steps is not None and self.global_step >= stop_after_steps:
                        self._interrupt("stop_after_steps reached")
            self.end_epoch(time.perf_counter() - start, images)
            if self.stop.signal is not None:
                raise TrainingInterrupted(self.run_dir, self.epoch, self.global_step, f"received {signal.Signals(self.stop.signal).name}")
        return self.finish()

    @contextlib.contextmanager
    def _progress(self, total: int) -> Iterator[Any]:
        if not self.show_progress:
            yield lambda stats, ips: None
            return
        bar = report.progress_bar(self.console)
        task = bar.add_task(f"epoch {self.epoch + 1}/{self.config.epochs}", total=total, loss=0.0, acc=0.0, lr=self.last_lr, ips=0.0)

        def tick(stats: torch.Tensor, ips: float) -> None:
            n = max(1.0, float(stats[2]))
            bar.update(task, advance=1, loss=float(stats[0]) / n, acc=100.0 * float(stats[1]) / n, lr=self.last_lr, ips=ips)

        with bar:
            yield tick

    # -- the deployed model ---------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Collapse (expanded runs), verify, measure the collapsed model's own test accuracy, write the summary."""
        start = time.perf_counter()
        last = self.history[-1] if self.history else {}
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "model_id": self.model.kflo_model_id,
            "kind": "vanilla" if self.vanilla else "expanded",
            "data": self.config.data,
            "epochs": self.epoch,
            "steps": self.global_step,
            "final_test_acc": last.get("test_acc"),
            "test_samples": len(self.data.test),
            "ema_test_acc": last.get("ema_test_acc"),
            "best": self.best,
            "params_trained": sum(p.numel() for p in self.model.parameters()),
            "world_size": self.ctx.world_size,
            "ranks_identical": self.ctx.ranks_identical(self.model),
            "seconds": sum(r.get("seconds", 0.0) for r in self.history),
        }
        if not self.vanilla:
            problem = collapse_problem(self.model)
            if problem is None:
                summary["collapsed"] = self._collapse()
            else:  # e.g. ExpandNets' nonlinear counterpart: trained on purpose, collapsed by its linear successor
                summary["not_collapsed"] = problem
        if self.ctx.is_main:
            write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        self.finished = True
        self.save(end_of_epoch=False)
        summary["seconds_final"] = time.perf_counter() - start
        if self.ctx.is_main:
            self.console.print(report.summary_table(summary))
        return summary

    def _collapse(self) -> dict[str, Any]:
        from ..models import create_model
        from ..verify import verify_equivalence
        from safetensors.torch import load_file

        source = self.config.collapse_from
        if source == "ema":
            trained = self.ema.module
        elif source == "best":
            # rank 0 wrote best.safetensors before the barrier that ends every save
            trained = checkpoint.load(self.run_dir / "best.safetensors").to(self.ctx.device)
        else:
            trained = self.model
        plain = collapse(trained).to(self.ctx.device)
        _, acc = self.evaluate(plain, self.data.test)
        result: dict[str, Any] = {"from": source, "test_acc": acc, "params": sum(p.numel() for p in plain.parameters())}
        if self.ctx.is_main:
            proof = verify_equivalence(trained, plain, input_size=self.input_size, rtol=self.config.verify_rtol)
            path = self.run_dir / "collapsed.safetensors"
            checkpoint.save(plain, path, extra={"test_acc": acc, "data": self.config.data, "collapsed_from": source})
            meta = checkpoint.read_metadata(path)
            fresh = create_model(meta["model_id"], **meta["model_kwargs"])
            try:
                checkpoint.load_into(fresh, load_file(str(path)))
                strict = True
            except (RuntimeError, ValueError):
                strict = False
            result["verification"] = proof.to_dict()
            result["strict_load"] = strict
            write_text_atomic(self.run_dir / "verification.json", json.dumps({**result, "checkpoint": str(path)}, indent=2, sort_keys=True) + "\n")
        return self.ctx.gather_objects(result if self.ctx.is_main else None)[0]


# -- entry points ------------------------------------------------------------------------------------------------
def _set_threads(config: TrainConfig) -> None:
    # Part of the config because CPU float reductions depend on the thread count, so a resumed run must match.
    if config.threads is not None:
        torch.set_num_threads(config.threads)


@contextlib.contextmanager
def _closing(ctx: DistContext) -> Iterator[DistContext]:
    try:
        yield ctx
    finally:
        ctx.close()


def _console(ctx: DistContext, console: Any) -> Any:
    if console is not None and ctx.is_main:
        return console
    out = report.make_console()
    if not ctx.is_main:
        out.quiet = True
    return out


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
    _set_threads(config)
    stop = _StopFlag()
    ctx = setup(config.device)
    with stop.installed(), _closing(ctx):
        _check_run_dir(run_dir, overwrite)
        ctx.barrier()
        seed_everything(config.seed)
        prepared = prepare(config, data)
        out = _console(ctx, console)
        if prepared.note and ctx.is_main:
            out.print(f"[yellow]note[/]: {prepared.note}")
        run = Run(config, run_dir, ctx, prepared, console=out, show_progress=progress, stop=stop)
        # The loop's own random stream (dropout), distinct per rank; data randomness is seeded per sample.
        seed_everything(stream_seed(config.seed, 0xD0, ctx.rank))
        if ctx.is_main:
            if overwrite and run_dir.is_dir():
                _clear_run_dir(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        ctx.barrier()
        run.save(end_of_epoch=False)
        return TrainResult(run_dir, run.fit(stop_after_steps))


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
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    check_resume_overrides(config, overrides or {})
    _set_threads(config)
    stop = _StopFlag()
    ctx = setup(config.device)
    with stop.installed(), _closing(ctx):
        state = load_state(run_dir)
        info = state["info"]
        seed_everything(config.seed)
        in_chans, img_size = info["data_args"]
        if data is None:
            data = load_data(config, in_chans=in_chans, img_size=img_size)
        with rebuilding():  # the state's tensors replace the fresh weights next
            model = checkpoint.build_from_metadata(info["model_meta"])
        prepared = Prepared(model, data, tuple(info["input_size"]), info["vanilla"], data_args=(in_chans, img_size))
        out = _console(ctx, console)
        run = Run(config, run_dir, ctx, prepared, console=out, show_progress=progress, stop=stop)
        run.restore(state)
        if ctx.is_main:
            where = "the end, redoing the final collapse" if run.epoch >= config.epochs else f"epoch {run.epoch + 1}, step {run.step_in_epoch}"
            out.print(f"resuming {run_dir} at {where} (global step {run.global_step})")
        return TrainResult(run_dir, run.fit(stop_after_steps))


__all__ = ["EXIT_INTERRUPTED", "RUN_FILES", "Run", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "resume", "start", "task_loss"]

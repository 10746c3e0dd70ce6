"""The training loop proper: :func:`train_one_epoch` (a sequence of :func:`train_step`), :func:`evaluate`, and
:func:`epoch_metrics` (the end-of-epoch evaluation and the divergence checks)."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..errors import KfloError
from .config import TrainConfig
from . import report
from .loader import epoch_batches, eval_loader, iterate, train_loader
from .optim import optimizer_step, total_penalty
from .parts import Parts, Run
from .state import Counters


class TrainingDiverged(KfloError):
    """The loss, the weights or the evaluation losses became non-finite; the last good checkpoint is kept."""


def diverged(what: str, run_dir: Path) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged: {what}; {run_dir} keeps the last good checkpoint (last.safetensors and the "
        "state saved before it); lower --lr, or add --grad-clip or --warmup-epochs, and start again with --overwrite"
    )


def task_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float, temperature: float) -> torch.Tensor:
    """Cross-entropy, or Hinton's distillation loss ``(1-a) CE + a T^2 KL(teacher_T || student_T)``."""
    ce = F.cross_entropy(logits.float(), labels)
    if teacher_logits is None:
        return ce
    t = temperature
    kd = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(teacher_logits.float() / t, 1), reduction="batchmean", log_target=True)
    return (1.0 - alpha) * ce + alpha * t * t * kd


def train_step(run: Run, parts: Parts, counters: Counters, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One optimizer step; returns the rank-summed [loss*n, correct, n, non-finite, stop] statistics.

    A non-finite loss on any rank stops every rank before the optimizer step (:class:`TrainingDiverged`).
    """
    config, device = run.config, run.dist.device
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    parts.schedule.apply(parts.optimizer, counters.global_step, config.lr)
    teacher_logits = None
    if parts.teacher is not None:
        with torch.no_grad(), parts.autocast():
            teacher_logits = parts.teacher(images)
    if config.accumulate > 1:
        loss, penalty, logits, total = accumulated_backward(run, parts, images, labels, teacher_logits)
    else:
        logits, loss, penalty = forward_loss(parts, config, images, labels, teacher_logits)
        total = loss + penalty
    n = labels.shape[0]
    stats = torch.stack([
        loss.detach().float() * n,
        (logits.detach().argmax(1) == labels).sum().float(),
        torch.tensor(float(n), device=device),
        (~torch.isfinite(total.detach())).float(),
        torch.tensor(0.0 if run.stop.signal is None else 1.0, device=device),
    ]).to(torch.float64)
    run.dist.all_reduce_sum(stats)
    if stats[3] > 0:
        parts.optimizer.zero_grad(set_to_none=True)
        raise diverged(f"the loss became {total.item()} in epoch {counters.epoch + 1} at step {counters.global_step + 1}", run.run_dir)
    optimizer_step(None if config.accumulate > 1 else total, parts.optimizer, parts.model.parameters(),
                   scaler=parts.scaler, clip_norm=config.grad_clip)
    if parts.ema is not None:
        parts.ema.update(parts.model)
    counters.add_step(float(stats[0]), float(stats[1]), float(stats[2]), float(penalty.detach()))
    return stats


def forward_loss(parts: Any, config: TrainConfig, images: torch.Tensor, labels: torch.Tensor,
                 teacher_logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, task loss, recipes' penalty) of one batch, with the graph for backward.

    ``parts`` needs ``parametrized``, ``autocast()``, ``net`` and ``model`` (:class:`Parts`, or kflo bench's trainer).
    cached(): each composed weight is computed once, for the forward and the penalty alike, and here, outside
    autocast, so composition runs in float32 even with --amp (the layer's op casts after).
    """
    with parametrize.cached():
        for module, name in parts.parametrized:
            getattr(module, name)
        with parts.autocast():
            logits = parts.net(images)
        loss = task_loss(logits, labels, teacher_logits, config.kd_alpha, config.kd_temperature)
        penalty = total_penalty(parts.model, config).to(loss.device)
    return logits, loss, penalty


def accumulated_backward(run: Run, parts: Parts, images: torch.Tensor, labels: torch.Tensor,
                         teacher_logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``--accumulate N``: back-propagate one batch as N micro-batches, composing every kernel once.

    Each parametrized tensor is composed once (with its graph to the factors) and handed to the micro-batches as a
    detached leaf through ``parametrize.cached()``'s cache; the micro-batches accumulate the leaf's gradient, and one
    backward through the compositions (with the recipes' penalty, which reads the composed tensors) carries it to the
    factors. The factors' gradients are those of the whole batch (each micro-batch's loss is weighted by its share
    of the batch), as plain accumulation gives, at 1/N of the compositions. Under torchrun the model is not wrapped in
    DistributedDataParallel (its hooks watch the parameters, which the micro-batches do not reach): rank 0's buffers
    are broadcast first and the gradients averaged over ranks last, as it would. Returns (loss, penalty, logits, total),
    detached, for the step's statistics; the gradients are in place for :func:`optimizer_step` (``loss=None``).
    """
    config = run.config
    dist = getattr(run, "dist", None)
    if dist is not None:
        dist.broadcast_buffers(parts.model)  # as DistributedDataParallel does before each forward (net is not one)
    scaler = parts.scaler if parts.scaler is not None and parts.scaler.is_enabled() else None
    scale = (lambda t: scaler.scale(t)) if scaler is not None else (lambda t: t)
    n = labels.shape[0]
    cache = getattr(parametrize, "_cache", None)
    if not isinstance(cache, dict):  # pragma: no cover - guards a private PyTorch detail
        raise KfloError("--accumulate needs torch.nn.utils.parametrize's cache, which this PyTorch does not have; "
                        "drop --accumulate")
    tensors = [(m, name) for m in parts.model.modules() if parametrize.is_parametrized(m) for name in m.parametrizations]
    losses, outputs = [], []
    with parametrize.cached():
        composed = {(id(m), name): getattr(m, name) for m, name in tensors}  # outside autocast: float32
        leaves = {key: value.detach().requires_grad_(value.requires_grad) for key, value in composed.items()}
        cache.update(leaves)
        for part, (x, y) in enumerate(zip(images.tensor_split(config.accumulate), labels.tensor_split(config.accumulate))):
            if y.shape[0] == 0:
                continue
            t = None if teacher_logits is None else teacher_logits.tensor_split(config.accumulate)[part]
            with parts.autocast():
                out = parts.net(x)
            loss = task_loss(out, y, t, config.kd_alpha, config.kd_temperature) * (y.shape[0] / n)
            scale(loss).backward()
            losses.append(loss.detach())
            outputs.append(out.detach())
        cache.update(composed)  # the penalty reads the composed tensors themselves (their graph to the factors)
        penalty = total_penalty(parts.model, config).to(images.device)
        roots = [penalty] if penalty.requires_grad else []
        grads = [torch.ones_like(penalty)] if roots else []
        for key, leaf in leaves.items():
            if leaf.grad is not None and composed[key].requires_grad:
                roots.append(composed[key])
                grads.append(leaf.grad)
        if roots:
            if scaler is not None and roots[0] is penalty:
                grads[0] = scale(grads[0])
            torch.autograd.backward(roots, grads)
    if dist is not None:
        dist.average_gradients(parts.model)
    loss = torch.stack(losses).sum()
    return loss, penalty.detach(), torch.cat(outputs), loss + penalty.detach()


@dataclass
class EpochRun:
    """What :func:`train_one_epoch` did: its time, the images it trained on, and why it stopped early (if it did)."""

    seconds: float
    images: int
    stopped: str | None = None


def train_one_epoch(run: Run, parts: Parts, counters: Counters, *, stop_after_steps: int | None = None) -> EpochRun:
    """Train the rest of epoch ``counters.epoch`` (from ``counters.step_in_epoch``, after a resume).

    Stops early after the step in which a signal arrived (on any rank) or the one that reaches ``stop_after_steps``.
    """
    config, dist = run.config, run.dist
    batches = epoch_batches(run.num_train, config.batch_size, seed=config.seed, epoch=counters.epoch,
                            rank=dist.rank, world_size=dist.world_size)[counters.step_in_epoch:]
    loader = train_loader(run.data.train, batches, seed=config.seed, num_workers=config.num_workers,
                          pin_memory=dist.device.type == "cuda")
    start, images = time.perf_counter(), 0
    with _progress(run, parts, counters.epoch, len(batches)) as tick:
        for x, y in iterate(loader):
            stats = train_step(run, parts, counters, x, y)
            images += int(stats[2])
            tick(stats, images / max(1e-9, time.perf_counter() - start))
            if stats[4] > 0:
                return EpochRun(time.perf_counter() - start, images, f"received {signal.Signals(run.stop.signal or signal.SIGINT).name}")
            if stop_after_steps is not None and counters.global_step >= stop_after_steps:
                return EpochRun(time.perf_counter() - start, images, "stop_after_steps reached")
    return EpochRun(time.perf_counter() - start, images)


@contextlib.contextmanager
def _progress(run: Run, parts: Parts, epoch: int, total: int) -> Iterator[Any]:
    """A per-epoch progress bar on a terminal (rank 0); ``tick(stats, images_per_second)`` after each step."""
    if not run.show_progress:
        yield lambda stats, ips: None
        return
    lr = lambda: parts.optimizer.param_groups[0]["lr"]  # noqa: E731
    bar = report.progress_bar(run.console)
    task = bar.add_task(f"epoch {epoch + 1}/{run.config.epochs}", total=total, loss=0.0, acc=0.0, lr=lr(), ips=0.0)

    def tick(stats: torch.Tensor, ips: float) -> None:
        n = max(1.0, float(stats[2]))
        bar.update(task, advance=1, loss=float(stats[0]) / n, acc=100.0 * float(stats[1]) / n, lr=lr(), ips=ips)

    with bar:
        yield tick


@torch.no_grad()
def evaluate(run: Run, model: nn.Module, dataset: Any) -> tuple[float, float]:
    """(mean loss, accuracy in %) of ``model`` on ``dataset``, each rank taking a share, sums reduced."""
    config, dist = run.config, run.dist
    was = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=dist.device)
    loader = eval_loader(dataset, config.eval_batch_size, rank=dist.rank, world_size=dist.world_size,
                         num_workers=config.num_workers, pin_memory=dist.device.type == "cuda")
    # cached(): the model's weights do not change during evaluation, so each composed kernel is built once
    with parametrize.cached():
        for images, labels in iterate(loader):
            images, labels = images.to(dist.device), labels.to(dist.device)
            logits = model(images).float()
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums[1] += (logits.argmax(1) == labels).sum()
            sums[2] += labels.shape[0]
    dist.all_reduce_sum(sums)
    model.train(was)
    count = max(1.0, float(sums[2]))
    return float(sums[0]) / count, 100.0 * float(sums[1]) / count


def epoch_metrics(run: Run, parts: Parts, counters: Counters, seconds: float, images: int) -> dict[str, Any]:
    """The metrics row of the epoch just trained: training sums, validation/test (and EMA) evaluation.

    Raises :class:`TrainingDiverged` when the weights or the evaluation losses are not finite, so such an epoch is
    never saved.
    """
    data, dist = run.data, run.dist
    dist.broadcast_buffers(parts.model)
    if parts.ema is not None:  # each rank averaged its own BatchNorm statistics; rank 0's are the ones saved
        dist.broadcast_buffers(parts.ema.module)
    sums = counters.sums
    count = max(1.0, sums["count"])
    row: dict[str, Any] = {
        "epoch": counters.epoch + 1,
        "step": counters.global_step,
        # the rate of the epoch's last step, from the schedule (right after a resume no step has run yet)
        "lr": run.config.lr * parts.schedule.factor(max(0, counters.global_step - 1)),
        "train_loss": sums["loss"] / count,
        "train_acc": 100.0 * sums["correct"] / count,
        "penalty": sums["penalty"] / max(1, sums["steps"]),
    }
    if data.val is not None:
        row["val_loss"], row["val_acc"] = evaluate(run, parts.model, data.val)
    row["test_loss"], row["test_acc"] = evaluate(run, parts.model, data.test)
    check_finite(run, parts.model, row, counters.epoch)
    if parts.ema is not None:
        if data.val is not None:
            row["ema_val_acc"] = evaluate(run, parts.ema.module, data.val)[1]
        row["ema_test_loss"], row["ema_test_acc"] = evaluate(run, parts.ema.module, data.test)
    row["images_per_s"] = images / seconds if seconds > 0 else 0.0
    row["seconds"] = seconds
    return row


@torch.no_grad()
def check_finite(run: Run, model: nn.Module, row: dict[str, Any], epoch: int) -> None:
    """Refuse an epoch whose weights or evaluation losses are not finite (a step can blow the weights up without
    a non-finite training loss, e.g. the last step of an epoch)."""
    bad = [k for k in ("val_loss", "test_loss") if k in row and not math.isfinite(row[k])]
    if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
        bad.insert(0, "the weights")
    if bad:
        raise diverged(f"{' and '.join(bad)} became non-finite by the end of epoch {epoch + 1}", run.run_dir)


__all__ = ["EpochRun", "TrainingDiverged", "epoch_metrics", "evaluate", "task_loss", "train_one_epoch", "train_step"]

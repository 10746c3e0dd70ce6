"""DistributedDataParallel set-up from torchrun's environment (gloo on CPU, nccl on CUDA) and the collectives
the trainer needs. Without torchrun everything here degrades to a single process and no communication.

Semantics (documented in docs/training.md): ``--batch-size`` is the *global* batch; each of the N ranks gets
``batch_size / N`` samples of every global batch, DDP averages the gradients, so a run on N ranks follows the same
mathematics as a single process with the same ``--batch-size`` (BatchNorm statistics aside, which each rank
computes on its own share).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import KfloError


@dataclass
class DistContext:
    """Rank, world size and device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (a no-op on one process) and return it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (e.g. RNG states), in rank order; on one process ``[obj]``."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm statistics) to every rank, so evaluation and checkpoints agree."""
        if self.enabled:
            for buf in model.buffers():
                dist.broadcast(buf.data, src=0)

    def broadcast_state(self, model: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (what DistributedDataParallel does when it wraps).

        The tensors themselves, not ``state_dict()``'s entries: a module may save a converted copy there (DO-Conv's
        W in the paper's layout), and broadcasting into a copy would leave the parameter as it was."""
        if self.enabled:
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                dist.broadcast(tensor.data, src=0)

    def average_gradients(self, model: nn.Module) -> None:
        """Average the gradients over ranks in place, as DistributedDataParallel's backward does (one flat
        all-reduce; a parameter without a gradient stays without)."""
        if not self.enabled:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def ranks_identical(self, model: nn.Module) -> bool:
        """Whether every rank holds bit-identical parameters and buffers (compares a SHA-256 of the bytes)."""
        if not self.enabled:
            return True
        digest = hashlib.sha256()
        for key, value in model.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return len(set(self.gather_objects(digest.hexdigest()))) == 1

    def close(self) -> None:
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def choose_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto``: the local CUDA device if there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KfloError(f"--device {requested} but CUDA is not available here; use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(requested_device: str = "auto") -> DistContext:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and join the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(requested_device, local_rank)
    if world <= 1:
        return DistContext(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        here = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, initialised_here=here)


def wrap(model: nn.Module, ctx: DistContext, *, manual_sync: bool = False) -> nn.Module:
    """The module to call for training: ``model`` itself, or a DistributedDataParallel around it.

    ``manual_sync`` (``--accumulate``, whose micro-batches back-propagate into composed kernels held as leaves,
    not into the parameters DistributedDataParallel watches): ``model`` itself, with rank 0's state broadcast now;
    the training step then syncs buffers and averages gradients itself (:meth:`DistContext.average_gradients`).
    """
    if not ctx.enabled:
        return model
    if manual_sync:
        ctx.broadcast_state(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


__all__ = ["DistContext", "choose_device", "setup", "wrap"]

"""Batches whose content is a pure function of (seed, epoch, step): what makes resume and DDP exact.

* The order of epoch ``e`` is ``torch.randperm`` from a generator seeded with (seed, e); global batch ``k`` is
  positions ``[k*B, (k+1)*B)`` of it (the last partial batch is dropped) and rank ``r`` of ``N`` takes its
  ``r``-th contiguous share of ``B/N`` samples. Resuming at step ``k`` just starts at batch ``k``.
* Augmentation draws from torch's global RNG inside the dataset's ``__getitem__``. Each sample is produced with
  the CPU generator seeded from (seed, epoch, sample index) and the generator's state restored afterwards, so a
  sample's augmentation does not depend on what ran before it: not on interruptions, not on the rank that loads
  it, not on the number of DataLoader workers, and the training loop's own RNG stream (dropout) is untouched.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import KfloError

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """SplitMix64's finaliser: a cheap, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def stream_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (e.g. epoch and sample index)."""
    x = _mix(seed & _MASK)
    for k in keys:
        x = _mix(x ^ (k & _MASK))
    return x & ((1 << 63) - 1)


class SeededSamples(Dataset):
    """``dataset[(epoch, index)]``: ``dataset[index]`` with the CPU generator seeded from (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        saved = torch.get_rng_state()
        torch.default_generator.manual_seed(stream_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Full global batches per epoch; refuses a batch larger than the training set."""
    if num_samples < batch_size:
        raise KfloError(f"--batch-size {batch_size} is larger than the training set ({num_samples} samples); lower --batch-size")
    return num_samples // batch_size


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """Each process's share of the global batch; refuses a batch the processes cannot share equally."""
    if batch_size % world_size:
        raise KfloError(f"--batch-size {batch_size} (the global batch) must be divisible by the number of processes "
                        f"({world_size}); pick a multiple of {world_size}")
    return batch_size // world_size


def epoch_batches(num_samples: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[list[tuple[int, int]]]:
    """This rank's share of every global batch of ``epoch``, as ``(epoch, index)`` keys for :class:`SeededSamples`."""
    per_rank = per_rank_batch(batch_size, world_size)
    gen = torch.Generator().manual_seed(stream_seed(seed, 0x5EED, epoch))
    order = torch.randperm(num_samples, generator=gen).tolist()
    batches = []
    for k in range(steps_per_epoch(num_samples, batch_size)):
        chunk = order[k * batch_size : (k + 1) * batch_size][rank * per_rank : (rank + 1) * per_rank]
        batches.append([(epoch, i) for i in chunk])
    return batches


def train_loader(dataset: Dataset, batches: Sequence[list[tuple[int, int]]], *, seed: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader that yields exactly ``batches`` (skip the first ``k`` by slicing the list to resume)."""
    return DataLoader(
        SeededSamples(dataset, seed),
        batch_sampler=list(batches),
        num_workers=num_workers,
        pin_memory=pin_memory,
        # A private generator: the loader must not draw from the global RNG when it starts an iterator.
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def eval_loader(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """This rank's share (indices ``rank::world_size``) of an evaluation set, in order, without padding."""
    indices = list(range(rank, len(dataset), world_size))  # type: ignore[arg-type]
    return DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )


def iterate(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` with labels as a long tensor.

    A :class:`KfloError` raised in a DataLoader worker arrives wrapped in the worker's whole traceback; it is
    raised again with its own one-sentence message, as it would be without workers.
    """
    batches = iter(loader)
    while True:
        try:
            images, labels = next(batches)
        except StopIteration:
            return
        except KfloError as exc:
            raise KfloError(_worker_message(str(exc))) from None
        yield images, torch.as_tensor(labels, dtype=torch.long)


def _worker_message(text: str) -> str:
    """The original message of an error that a DataLoader worker wrapped (the last line of its traceback)."""
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(f"{KfloError.__name__}: ", 1)[-1]


__all__ = ["SeededSamples", "epoch_batches", "eval_loader", "iterate", "per_rank_batch", "steps_per_epoch", "stream_seed", "train_loader"]

"""Seeded, stratified index selection and label noise: the validation split, the KFLO paper's training
fraction and the ExpandNets paper's corrupted labels. Each step draws from its own stream of the run's seed.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import KfloError


def seed_stream(seed: int, purpose: int) -> np.random.Generator:
    """An independent stream per (seed, purpose), so e.g. the validation split does not change with label noise."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, purpose])


def _round(x: float) -> int:
    """Round half up (Python's ``round`` rounds 2.5 to 2)."""
    return math.floor(x + 0.5)


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class: ``round(fraction * n_c)`` of each class ``c`` held out, at least one kept.

    Returns:
        (kept, held_out) sorted index arrays.
    """
    kept, held = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = min(_round(fraction * len(members)), len(members) - 1)
        held.append(members[:n])
        kept.append(members[n:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def class_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``max(1, round(fraction * n_c))`` random members of each class ``c``."""
    picks = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        picks.append(members[: max(1, _round(fraction * len(members)))])
    return np.sort(np.concatenate(picks))


def corrupt_labels(labels: np.ndarray, fraction: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``labels`` where exactly ``round(fraction * N)`` random entries are a uniformly random other class."""
    noisy = np.array(labels, dtype=np.int64, copy=True)
    count = _round(fraction * len(noisy))
    if count == 0:
        return noisy
    if num_classes < 2:
        raise KfloError(f"--label-noise needs at least 2 classes to swap labels between, the data has {num_classes}")
    flip = rng.choice(len(noisy), size=count, replace=False)
    noisy[flip] = (noisy[flip] + rng.integers(1, num_classes, size=count)) % num_classes
    return noisy


__all__ = ["class_subset", "corrupt_labels", "seed_stream", "stratified_split"]

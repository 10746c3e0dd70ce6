"""The ``torch`` data sets behind :class:`kflo_cli.data.DataBundle`: images kept in memory (or read from an
image folder), converted, resized, augmented and normalised per item with tensor operations.

Augmentation draws one ``torch.rand(3)`` (crop row, crop column, flip coin) from torch's global CPU generator
inside ``__getitem__``, so seeding that generator before each item makes the item a pure function of the seed:
:class:`kflo_cli.train.loader.SeededSamples` does exactly that for bit-exact resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import KfloError
from .formats import read_image

#: ITU-R BT.601 luma weights, the ones PIL's ``convert("L")`` and torchvision's ``rgb_to_grayscale`` use.
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Augment:
    """Training augmentation: a random crop of the zero-padded image, then an optional horizontal flip.

    ``pad`` is a fraction of the image side, so it scales with ``img_size``: the output pads
    ``max(1, floor(pad * side + 0.5))`` pixels on each side (e.g. CIFAR's 4/32 gives 4 pixels at 32x32).
    """

    pad: float = 0.0
    flip: bool = False

    def pixels(self, side: int) -> int:
        """Padding in pixels at an output side of ``side``."""
        return max(1, math.floor(self.pad * side + 0.5)) if self.pad > 0 else 0


class TensorSource:
    """Images held in memory as one N x C x H x W tensor (uint8 unless stated); ``raw * scale`` is in [0, 1]."""

    def __init__(self, images: np.ndarray | torch.Tensor, scale: float = 1 / 255) -> None:
        self.images = torch.as_tensor(images)
        self.scale = scale
        self.chans = int(self.images.shape[1])
        self.size = int(self.images.shape[-1])
        self.batchable = True
        self.stats: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {}  # channel_stats' cache

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, index: int | list[int]) -> torch.Tensor:
        """Stored image ``index`` (C x H x W) or images (B x C x H x W), not scaled."""
        return self.images[index]

    def sample_for_stats(self) -> Iterator[torch.Tensor]:
        """Chunks covering every image, in [0, 1], for exact statistics."""
        for i in range(0, len(self), 4096):
            yield self.images[i : i + 4096].to(torch.float32).mul_(self.scale)


class FolderSource:
    """Image files read with Pillow when an item is asked for, centre-cropped to a square, in [0, 1].

    ``size`` is the side the bundle reports before any resize (the first training image's shorter side).
    """

    def __init__(self, files: Sequence[str], mode: str, size: int) -> None:
        self.files = list(files)
        self.mode = mode
        self.chans = 1 if mode == "L" else 3
        self.size = size
        self.scale = 1.0
        self.batchable = False
        self.stats: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {}  # channel_stats' cache

    def __len__(self) -> int:
        return len(self.files)

    def raw(self, index: int) -> torch.Tensor:
        """Image ``index`` as float32 C x S x S in [0, 1], S its shorter side."""
        image = torch.from_numpy(read_image(self.files[index], self.mode))
        h, w = image.shape[1:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return image[:, top : top + side, left : left + side].to(torch.float32).div_(255)

    def sample_for_stats(self, limit: int = 256) -> Iterator[torch.Tensor]:
        """Up to ``limit`` evenly spaced images at ``size``: decoding a whole folder would be too slow."""
        for i in np.unique(np.linspace(0, len(self) - 1, num=min(limit, len(self))).round().astype(int)):
            yield resize(self.raw(int(i))[None], self.size)


def resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear resize of B x C x H x W to ``side`` x ``side`` (half-pixel centres; antialiased when shrinking)."""
    if x.shape[-2:] == (side, side):
        return x
    shrink = side < max(x.shape[-2:])
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=shrink)


def convert_channels(x: torch.Tensor, chans: int) -> torch.Tensor:
    """B x C x H x W to ``chans`` channels: grey -> any number by replication, RGB -> grey by :data:`LUMA`."""
    have = x.shape[1]
    if have == chans:
        return x
    if have == 1:
        return x.expand(-1, chans, -1, -1)
    if have == 3 and chans == 1:
        weights = torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    raise KfloError(f"cannot turn {have}-channel images into {chans} channels; kflo replicates grey images and turns RGB into grey, nothing else")


def channel_stats(source: TensorSource | FolderSource, chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``source`` after conversion to ``chans`` channels (float64 sums)."""
    if chans in source.stats:
        return source.stats[chans]
    total, sq, count = torch.zeros(chans, dtype=torch.float64), torch.zeros(chans, dtype=torch.float64), 0
    for chunk in source.sample_for_stats():
        x = convert_channels(chunk, chans).to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        sq += x.square().sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (sq / count - mean.square()).clamp_min(0).sqrt()
    # Four decimals, as the published constants are given; a constant channel gets std 1e-4, not a division by 0.
    source.stats[chans] = tuple(round(float(m), 4) for m in mean), tuple(max(round(float(s), 4), 1e-4) for s in std)
    return source.stats[chans]


class ImageSet(Dataset):
    """A view (an index list) of a source, yielding ``(float32 C x S x S image, int label)``.

    Per item: read -> channels -> resize to ``img_size`` -> augmentation (training sets only) -> ``(x - mean) / std``.
    Padding is zero in [0, 1] pixel space (black), as in torchvision's ``RandomCrop(padding=...)``.

    Attributes:
        labels: int64 labels of the view (after label noise for a training set).
        clean_labels: the labels before label noise (equal to ``labels`` when there is none).
    """

    def __init__(self, source: TensorSource | FolderSource, index: np.ndarray, labels: np.ndarray, *,
                 augment: Augment | None, clean_labels: np.ndarray | None = None) -> None:
        self.source = source
        self.index = torch.as_tensor(np.asarray(index, dtype=np.int64))
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.clean_labels = self.labels if clean_labels is None else torch.as_tensor(np.asarray(clean_labels, dtype=np.int64))
        self.augment = augment
        # Python lists: indexing them per item is several times cheaper than indexing a tensor.
        self._index, self._labels = self.index.tolist(), self.labels.tolist()
        self.set_output(source.chans, source.size, (0.0,) * source.chans, (1.0,) * source.chans)

    def set_output(self, chans: int, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        """Make items ``chans`` x ``size`` x ``size``, normalised with ``mean`` and ``std``."""
        if self.source.chans != chans:
            convert_channels(torch.zeros(1, self.source.chans, 1, 1), chans)  # raises when impossible
        self.chans, self.size = chans, size
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        # Normalisation as one multiply-add; stored pixels that need no conversion fold the [0, 1] scale in too.
        self._direct = self.source.batchable and (chans, size) == (self.source.chans, self.source.size)
        self._mul = (self.source.scale if self._direct else 1.0) / std_t
        self._add = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t
        self._pad = self.augment.pixels(size) if self.augment is not None else 0

    def __len__(self) -> int:
        return len(self.index)

    def _pixels(self, raw: torch.Tensor) -> torch.Tensor:
        """B x C x H x W stored pixels -> float32 at the output channels and size (scaled unless direct)."""
        x = raw.to(torch.float32)
        if self._direct:
            return x
        if self.source.scale != 1.0:
            x = x * self.source.scale  # not in place: ``to`` returns float storage itself
        # Shrink channels before resizing and grow them after: the same result, less work.
        if self.chans < x.shape[1]:
            x = convert_channels(x, self.chans)
        return convert_channels(resize(x, self.size), self.chans)

    def _augmented(self, x: torch.Tensor) -> torch.Tensor:
        # One draw of three uniforms from the global generator per item: crop row, crop column, flip.
        u_top, u_left, u_flip = torch.rand(3, dtype=torch.float64).tolist()
        if self._pad:
            p, side = self._pad, self.size
            top, left = int(u_top * (2 * p + 1)), int(u_left * (2 * p + 1))
            x = F.pad(x, (p, p, p, p))[:, top : top + side, left : left + side]
        if self.augment is not None and self.augment.flip and u_flip < 0.5:
            x = x.flip(-1)
        return x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self._pixels(self.source.raw(self._index[i])[None])[0]
        if self.augment is not None:
            x = self._augmented(x)
        return x.mul(self._mul).add_(self._add), self._labels[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Many items at once (DataLoader uses this); one batched pass for in-memory sets without augmentation."""
        if self.augment is not None or not self.source.batchable:
            return [self[i] for i in indices]
        x = self._pixels(self.source.raw([self._index[i] for i in indices])).mul(self._mul).add_(self._add)
        return list(zip(x.unbind(0), [self._labels[i] for i in indices]))


__all__ = ["LUMA", "Augment", "FolderSource", "ImageSet", "TensorSource", "channel_stats", "convert_channels", "resize"]

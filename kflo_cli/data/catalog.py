"""The named data sets of ``kflo train --data``: names and aliases, published statistics, the training
augmentation of each, and one loader per data set that reads its files (through :mod:`kflo_cli.data.formats`)
into sources and labels before any split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import KfloError
from . import formats as fmt
from .sets import Augment, FolderSource, TensorSource
from .splits import stratified_split

DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100",
            "image-folder": "imagefolder", "image_folder": "imagefolder"}

#: Published per-channel statistics of the training sets (pixels in [0, 1]); the other sets are measured.
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
#: Training augmentation per data set; ``pad`` is a fraction of the side (see :class:`~kflo_cli.data.sets.Augment`).
AUGMENT: dict[str, Augment] = {
    "digits": Augment(pad=1 / 16),
    "mnist": Augment(pad=2 / 28),
    "fashion-mnist": Augment(pad=2 / 28),
    "cifar10": Augment(pad=4 / 32, flip=True),
    "cifar100": Augment(pad=4 / 32, flip=True),
    "imagefolder": Augment(pad=4 / 32, flip=True),
    "synthetic": Augment(pad=4 / 32, flip=True),
}
#: The digits test split: a stratified 20 % drawn with this fixed seed, whatever the run's seed.
DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED = 0.2, 0
#: The synthetic images depend on this fixed seed only; a run's seed changes its splits, not its pixels.
SYNTHETIC_SEED = 0
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_DIGIT_NAMES = tuple(str(i) for i in range(10))


# -- the data sets ----------------------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    """A data set as read from disk, before splits: sources, labels and what the bundle needs to know."""

    train: TensorSource | FolderSource
    train_labels: np.ndarray
    test: TensorSource | FolderSource
    test_labels: np.ndarray
    num_classes: int
    classes: tuple[str, ...]
    source_dir: str | None = None
    val: tuple[TensorSource | FolderSource, np.ndarray] | None = None


def _digits(**_: Any) -> _Loaded:
    images, labels = fmt.read_digits()
    train, test = stratified_split(labels, DIGITS_TEST_FRACTION, np.random.default_rng(DIGITS_SPLIT_SEED))
    return _Loaded(TensorSource(images[train], scale=1 / 16), labels[train], TensorSource(images[test], scale=1 / 16),
                   labels[test], 10, _DIGIT_NAMES)


def _idx(name: str, data_dir: Path | None, download: bool, **_: Any) -> _Loaded:
    files = ", ".join(f"{stem}.gz" for pair in fmt.IDX_FILES.values() for stem in pair)
    if name == "fashion-mnist":
        fix = "install them with `apt-get install dataset-fashion-mnist`, pass --data-dir DIR holding them, or add --download"
    else:
        fix = "pass --data-dir DIR holding them or add --download"
    if data_dir is not None:
        roots = [data_dir]
    else:
        roots = [fmt.DEBIAN_FASHION_MNIST, fmt.cache_dir(name)] if name == "fashion-mnist" else [fmt.cache_dir(name)]
    folder = fmt.find_idx_folder(name, roots)
    if folder is None and download:
        target = data_dir or fmt.cache_dir(name)
        fmt.download_idx(name, target)
        folder = fmt.find_idx_folder(name, [target])
    if folder is None:
        raise KfloError(f"{name} needs {files} (or the same names uncompressed) and {' / '.join(map(str, roots))} lacks some; {fix}")
    train_images, train_labels = fmt.read_idx_split(folder, "train", 10, fix)
    test_images, test_labels = fmt.read_idx_split(folder, "test", 10, fix)
    return _Loaded(TensorSource(train_images), train_labels, TensorSource(test_images), test_labels, 10,
                   FASHION_MNIST_CLASSES if name == "fashion-mnist" else _DIGIT_NAMES, str(folder))


def _cifar(name: str, data_dir: Path | None, download: bool, **_: Any) -> _Loaded:
    layout = fmt.CIFAR[name]
    root = data_dir or fmt.cache_dir(name)
    fix = f"pass --data-dir DIR holding {layout.folder}/ (the python version of {name}) or add --download"
    folder = fmt.find_cifar_folder(name, [root])
    if folder is None and download:
        fmt.download_cifar(name, root)
        folder = fmt.find_cifar_folder(name, [root])
    if folder is None:
        raise KfloError(f"{name} needs {layout.folder}/{{{','.join(layout.train + layout.test)}}} and {root} lacks some; {fix}")
    train_images, train_labels = fmt.read_cifar_batches(name, folder, "train", fix)
    test_images, test_labels = fmt.read_cifar_batches(name, folder, "test", fix)
    return _Loaded(TensorSource(train_images), train_labels, TensorSource(test_images), test_labels,
                   layout.num_classes, fmt.read_cifar_classes(name, folder, fix), str(folder))


def _imagefolder(name: str, data_dir: Path | None, download: bool, **_: Any) -> _Loaded:
    if data_dir is None:
        raise KfloError("imagefolder needs --data-dir DIR with DIR/train/<class>/*.png and DIR/test/ (or DIR/val/)")
    if download:
        raise KfloError("imagefolder reads your own image files and cannot download them; drop --download")
    folder = fmt.scan_image_folder(data_dir)
    size = int(FolderSource([folder.train[0][0]], folder.mode, 1).raw(0).shape[-1])

    def source(entries: list[tuple[str, int]]) -> tuple[FolderSource, np.ndarray]:
        return FolderSource([p for p, _ in entries], folder.mode, size), np.array([y for _, y in entries], dtype=np.int64)

    train, test = source(folder.train), source(folder.test)
    return _Loaded(*train, *test, len(folder.classes), folder.classes, str(data_dir),
                   val=source(folder.val) if folder.val else None)


def _synthetic(name: str, in_chans: int | None, img_size: int | None, num_classes: int | None, num_samples: int | None, **_: Any) -> _Loaded:
    classes, chans, size = num_classes or 10, in_chans or 3, img_size or 32
    n_train = num_samples or 1000
    if classes < 2 or n_train < classes:
        raise KfloError(f"synthetic data needs at least 2 classes and one training sample per class, got {classes} classes and {n_train} samples")
    gen = torch.Generator().manual_seed(SYNTHETIC_SEED)
    # One smooth random pattern per class; samples are the pattern plus pixel noise: learnable, not trivial.
    patterns = F.interpolate(torch.rand(classes, chans, 4, 4, generator=gen), size=(size, size), mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[TensorSource, np.ndarray]:
        labels = torch.arange(n) % classes
        x = 0.2 + 0.6 * patterns[labels] + 0.15 * torch.randn(n, chans, size, size, generator=gen)
        return TensorSource(x.clamp(0, 1).mul(255).round().to(torch.uint8)), labels.numpy()

    train, test = draw(n_train), draw(max(classes, n_train // 5))
    return _Loaded(*train, *test, classes, tuple(str(i) for i in range(classes)))


#: One loader per data set: reads its files into sources and labels, before any split.
LOADERS: dict[str, Callable[..., _Loaded]] = {
    "digits": _digits, "mnist": _idx, "fashion-mnist": _idx, "cifar10": _cifar, "cifar100": _cifar,
    "imagefolder": _imagefolder, "synthetic": _synthetic,
}


def canonical_name(name: str) -> str:
    """The data set's name in :data:`DATASETS` for ``name`` or one of its aliases (any case)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise KfloError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")
    return key


__all__ = ["AUGMENT", "DATASETS", "LOADERS", "STATS", "canonical_name"]

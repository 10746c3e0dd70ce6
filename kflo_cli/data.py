"""The data layer of ``kflo train``: named data sets as in-memory ``torch`` data sets with seeded splits.

Besides the usual train/validation/test splits it implements the two data settings of the papers kflo follows:
the KFLO paper's (Henig & Giryes) transfer-learning setting that trains on a stratified fraction of the training
set (``train_fraction=0.4``), and the ExpandNets paper's (Guo, Alvarez & Salzmann, NeurIPS 2020) corrupted-label
study, where a fraction of the training labels is replaced by a uniformly random other class (``label_noise``).

File formats live in :mod:`kflo_cli.data_formats`, the per-item pipeline in :mod:`kflo_cli.data_sets`;
docs/data.md has the data sets, where their files go, the augmentations and the decisions behind them.

Example:
    >>> bundle = build_data("digits", img_size=28, val_split=0.1, seed=1)
    >>> x, y = bundle.train[0]
    >>> tuple(x.shape), bundle.num_classes
    ((1, 28, 28), 10)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import data_formats as fmt
from .data_sets import Augment, FolderSource, ImageSet, TensorSource, channel_stats
from .errors import KfloError

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
#: Training augmentation per data set; ``pad`` is a fraction of the side (see :class:`~kflo_cli.data_sets.Augment`).
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


@dataclass
class DataBundle:
    """A data set ready for training: three splits and the input the model must accept.

    ``train`` yields ``(float32 C x H x W image, int label)``, normalised and augmented; ``val`` (``None`` without
    a validation split) and ``test`` are not augmented. ``mean``/``std`` are the per-channel statistics the
    images were normalised with.
    """

    name: str
    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: class names, index = label (empty when unknown).
    classes: tuple[str, ...] = ()
    #: the folder the files were read from (``None`` for built-in data).
    source_dir: str | None = None


# -- seeded, stratified index selection -------------------------------------------------------------------------------


def _rng(seed: int, purpose: int) -> np.random.Generator:
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


_LOADERS: dict[str, Callable[..., _Loaded]] = {
    "digits": _digits, "mnist": _idx, "fashion-mnist": _idx, "cifar10": _cifar, "cifar100": _cifar,
    "imagefolder": _imagefolder, "synthetic": _synthetic,
}


def _canonical(name: str) -> str:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise KfloError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")
    return key


def _check(name: str, *, data_dir: str | None, val_split: float, train_fraction: float, label_noise: float,
           in_chans: int | None, img_size: int | None, num_classes: int | None, num_samples: int | None) -> None:
    if not 0.0 <= val_split < 1.0:
        raise KfloError(f"--val-split {val_split} must be in [0, 1): the fraction of the training set held out")
    if not 0.0 < train_fraction <= 1.0:
        raise KfloError(f"--train-fraction {train_fraction} must be in (0, 1]: the fraction of the training set used")
    if not 0.0 <= label_noise <= 1.0:
        raise KfloError(f"--label-noise {label_noise} must be in [0, 1]: the fraction of training labels corrupted")
    if (in_chans is not None and in_chans < 1) or (img_size is not None and img_size < 1):
        raise KfloError(f"--in-chans {in_chans} / --img-size {img_size} must be positive")
    if data_dir is not None and name in ("digits", "synthetic"):
        raise KfloError(f"{name} is built in and reads no files; drop --data-dir")
    if (num_classes is not None or num_samples is not None) and name != "synthetic":
        raise KfloError(f"num_classes / num_samples choose the size of synthetic data; {name} has its own")


def build_data(name: str, *, data_dir: str | None = None, download: bool = False, val_split: float = 0.0,
               train_fraction: float = 1.0, label_noise: float = 0.0, seed: int = 0, in_chans: int | None = None,
               img_size: int | None = None, augment: bool = True, num_classes: int | None = None,
               num_samples: int | None = None) -> DataBundle:
    """Read data set ``name`` and split it, deterministically for a given ``seed``.

    Order: the validation split is held out of the training set (stratified), then ``train_fraction`` of each
    class of the rest is kept, then ``label_noise`` corrupts that training subset's labels. Each step draws from
    its own stream of ``seed``; the test set and the validation labels are never touched.

    Args:
        name: One of :data:`DATASETS`.
        data_dir: Where the files are (see docs/data.md for defaults).
        download: Fetch missing files with torchvision's download helpers (needs internet).
        val_split: Fraction of each training class held out as validation data.
        train_fraction: Fraction of each training class kept (the KFLO paper's 40 % setting is 0.4).
        label_noise: Fraction of training labels replaced by a uniformly random other class (ExpandNets).
        seed: Seeds the splits, the subset and the label noise.
        in_chans: Channels to produce (grey replicated, RGB -> 1 by luminance); default: the data's.
        img_size: Square side to produce (bilinear resize); default: the data's own.
        augment: Augment the training set (docs/data.md lists the augmentation of each data set).
        num_classes: Number of classes of ``synthetic`` data (default 10).
        num_samples: Training samples of ``synthetic`` data (default 1000; the test set has a fifth as many).

    Raises:
        KfloError: unknown name, bad fraction, missing or corrupt files, impossible channel conversion.
    """
    key = _canonical(name)
    _check(key, data_dir=data_dir, val_split=val_split, train_fraction=train_fraction, label_noise=label_noise,
           in_chans=in_chans, img_size=img_size, num_classes=num_classes, num_samples=num_samples)
    loaded = _LOADERS[key](name=key, data_dir=Path(data_dir).expanduser() if data_dir else None, download=download,
                           in_chans=in_chans, img_size=img_size, num_classes=num_classes, num_samples=num_samples)
    labels = loaded.train_labels
    kept, val = np.arange(len(labels)), None
    if val_split > 0:
        if loaded.val is not None:
            raise KfloError(f"{loaded.source_dir} has its own val/ folder used as validation data; drop --val-split")
        kept, held = stratified_split(labels, val_split, _rng(seed, 1))
        if len(held) == 0:
            raise KfloError(f"--val-split {val_split} holds out no image (it rounds to 0 of every class); raise it "
                            "or drop it to evaluate on the test set")
        val = ImageSet(loaded.train, held, labels[held], augment=None)
    elif loaded.val is not None:
        val = ImageSet(loaded.val[0], np.arange(len(loaded.val[1])), loaded.val[1], augment=None)
    if train_fraction < 1:
        kept = kept[class_subset(labels[kept], train_fraction, _rng(seed, 2))]
    clean = labels[kept]
    noisy = corrupt_labels(clean, label_noise, loaded.num_classes, _rng(seed, 3)) if label_noise > 0 else clean
    train = ImageSet(loaded.train, kept, noisy, augment=AUGMENT[key] if augment else None, clean_labels=clean)
    test = ImageSet(loaded.test, np.arange(len(loaded.test_labels)), loaded.test_labels, augment=None)
    mean, std = STATS.get(key) or channel_stats(loaded.train, loaded.train.chans)
    bundle = DataBundle(key, train, val, test, loaded.num_classes, loaded.train.chans, loaded.train.size, mean, std,
                        loaded.classes, loaded.source_dir)
    for part in (train, val, test):
        if part is not None:
            part.set_output(bundle.in_chans, bundle.img_size, mean, std)
    model_input_for(bundle, in_chans or bundle.in_chans, img_size)
    return bundle


def model_input_for(bundle: DataBundle, model_in_chans: int, model_img_size: int | None) -> None:
    """Make ``bundle`` yield what a model takes: ``model_in_chans`` channels, ``model_img_size`` square (in place).

    Grey images are replicated to ``model_in_chans`` channels (3 for most models); RGB images become 1 channel by luminance (ITU-R BT.601:
    0.299 R + 0.587 G + 0.114 B), normalised with statistics measured on the converted training images; images are
    resized bilinearly. Conversions always start from the stored images, so calling this again is not lossy.
    ``model_img_size=None`` keeps the current size.

    Raises:
        KfloError: a conversion kflo does not do (e.g. 3 -> 4 or 2 -> 1 channels), a size below 1, or a bundle whose data
        sets are not kflo's own and do not already match.
    """
    size = bundle.img_size if model_img_size is None else model_img_size
    if (model_in_chans, size) == (bundle.in_chans, bundle.img_size):
        return
    want = f"{model_in_chans} x {size} x {size}"
    have = f"{bundle.in_chans} x {bundle.img_size} x {bundle.img_size}"
    parts = [p for p in (bundle.train, bundle.val, bundle.test) if p is not None]
    if not all(isinstance(p, ImageSet) for p in parts):
        raise KfloError(f"the model takes {want} images but the {bundle.name} data gives {have} and is not a kflo data set; build it at that size")
    if model_in_chans < 1 or size < 1:
        raise KfloError(f"cannot make {want} images from the {bundle.name} data; pass a positive --in-chans and --img-size")
    source = bundle.train.source
    native = source.chans
    if model_in_chans != native and not (native == 1 or (native == 3 and model_in_chans == 1)):
        raise KfloError(f"the model takes {model_in_chans} channels but the {bundle.name} data has {native}; kflo replicates grey images and turns RGB into grey, nothing else, so build the model with --in-chans {native}")
    if model_in_chans == native:
        mean, std = STATS.get(bundle.name) or channel_stats(source, native)
    elif native == 1:
        base_mean, base_std = STATS.get(bundle.name) or channel_stats(source, 1)
        mean, std = base_mean * model_in_chans, base_std * model_in_chans
    else:
        mean, std = channel_stats(source, 1)
    for part in parts:
        part.set_output(model_in_chans, size, mean, std)
    bundle.in_chans, bundle.img_size, bundle.mean, bundle.std = model_in_chans, size, tuple(mean), tuple(std)


__all__ = ["AUGMENT", "DATASETS", "STATS", "DataBundle", "build_data", "class_subset", "corrupt_labels", "model_input_for", "stratified_split"]

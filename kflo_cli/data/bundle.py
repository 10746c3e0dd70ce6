"""The API of the data layer: :func:`build_data` reads a named data set and splits it deterministically into a
:class:`DataBundle`; :func:`model_input_for` makes a bundle yield the channels and size a model takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import KfloError
from .catalog import AUGMENT, LOADERS, STATS, canonical_name
from .sets import ImageSet, channel_stats
from .splits import class_subset, corrupt_labels, seed_stream, stratified_split


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
        name: One of :data:`~kflo_cli.data.catalog.DATASETS` (or an alias).
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
    key = canonical_name(name)
    _check(key, data_dir=data_dir, val_split=val_split, train_fraction=train_fraction, label_noise=label_noise,
           in_chans=in_chans, img_size=img_size, num_classes=num_classes, num_samples=num_samples)
    loaded = LOADERS[key](name=key, data_dir=Path(data_dir).expanduser() if data_dir else None, download=download,
                           in_chans=in_chans, img_size=img_size, num_classes=num_classes, num_samples=num_samples)
    labels = loaded.train_labels
    kept, val = np.arange(len(labels)), None
    if val_split > 0:
        if loaded.val is not None:
            raise KfloError(f"{loaded.source_dir} has its own val/ folder used as validation data; drop --val-split")
        kept, held = stratified_split(labels, val_split, seed_stream(seed, 1))
        if len(held) == 0:
            raise KfloError(f"--val-split {val_split} holds out no image (it rounds to 0 of every class); raise it "
                            "or drop it to evaluate on the test set")
        val = ImageSet(loaded.train, held, labels[held], augment=None)
    elif loaded.val is not None:
        val = ImageSet(loaded.val[0], np.arange(len(loaded.val[1])), loaded.val[1], augment=None)
    if train_fraction < 1:
        kept = kept[class_subset(labels[kept], train_fraction, seed_stream(seed, 2))]
    clean = labels[kept]
    noisy = corrupt_labels(clean, label_noise, loaded.num_classes, seed_stream(seed, 3)) if label_noise > 0 else clean
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


__all__ = ["DataBundle", "build_data", "model_input_for"]

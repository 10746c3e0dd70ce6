"""Readers for the on-disk data formats behind ``kflo train --data``: idx files (MNIST, Fashion-MNIST), the
python-pickle CIFAR batches through a restricted unpickler, scikit-learn's bundled digits, image folders, and
the ``--download`` pass-through to torchvision's download helpers.

Every reader returns numpy arrays or file lists and raises :class:`~kflo_cli.errors.KfloError` naming the file
that is missing or broken and how to get a good one. Nothing here is specific to a training run; the splits,
label noise and tensors are built in the rest of :mod:`kflo_cli.data`.
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import KfloError

# -- where files are looked for -----------------------------------------------------------------------------------

#: Debian's ``dataset-fashion-mnist`` package installs the four idx ``.gz`` files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def cache_dir(name: str) -> Path:
    """Where a data set goes when no ``--data-dir`` is given: ``$XDG_CACHE_HOME/kflo/data/NAME`` (``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kflo" / "data" / name


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KfloError(f"cannot create {folder} for the download ({exc}); pass --data-dir with a writable folder") from None


# -- idx (MNIST, Fashion-MNIST) ------------------------------------------------------------------------------------

IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The type byte of an idx magic number -> numpy dtype (the data are big-endian).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# torchvision's root layout (ROOT/MNIST/raw, ROOT/FashionMNIST/raw), so an existing torchvision root is found.
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def parse_idx(data: bytes, where: str) -> np.ndarray:
    """The array stored in idx bytes (magic ``0 0 TYPE NDIM``, NDIM big-endian uint32 sizes, then the data)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{where} does not start with an idx magic number (00 00 TYPE NDIM)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{where} has unknown idx data type 0x{code:02x}")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{where} ends inside its idx header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - 4 - 4 * ndim
    if payload != expected:
        raise ValueError(f"{where} holds {payload} data bytes but its header {dims} needs {expected}")
    array = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


#: The most bytes a gzip-compressed idx file may decompress to (MNIST's training images are 47 MB), so a small
#: hostile ``.gz`` cannot make kflo allocate without bound.
MAX_IDX_BYTES = 1 << 30


def read_idx(path: Path, fix: str) -> np.ndarray:
    """Read an idx file, gzip-compressed or not (decided by its first bytes, not its name)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
                raw = f.read(MAX_IDX_BYTES + 1)
            if len(raw) > MAX_IDX_BYTES:
                raise ValueError(f"it decompresses to more than {MAX_IDX_BYTES:,} bytes")
        return parse_idx(raw, str(path))
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise KfloError(f"{path} cannot be read as an idx file ({exc}); {fix}") from None


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_idx_folder(name: str, roots: Sequence[Path]) -> Path | None:
    """The first folder among ``roots`` (and their torchvision ``raw`` sub-folders) holding all four idx files."""
    for root in roots:
        for folder in (root, root / "raw", root / _TORCHVISION_FOLDER[name] / "raw"):
            if all(_idx_file(folder, stem) for pair in IDX_FILES.values() for stem in pair):
                return folder
    return None


def download_idx(name: str, folder: Path) -> None:
    """Fetch the four idx ``.gz`` files of ``name`` into ``folder`` with torchvision's mirrors and checksums."""
    from torchvision.datasets import MNIST, FashionMNIST
    from torchvision.datasets.utils import download_url

    cls = FashionMNIST if name == "fashion-mnist" else MNIST
    _make_folder(folder)
    for filename, md5 in cls.resources:
        if (folder / filename).is_file():
            continue
        errors = []
        for mirror in cls.mirrors:
            try:
                download_url(mirror + filename, root=str(folder), filename=filename, md5=md5)
                break
            except Exception as exc:  # noqa: BLE001  (any network failure: try the next mirror)
                errors.append(f"{mirror}: {exc}")
        else:
            raise KfloError(f"downloading {filename} failed ({'; '.join(errors)}); fetch the idx files yourself and pass --data-dir DIR holding them")


def read_idx_split(folder: Path, split: str, num_classes: int, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 1 x H x W, int64 labels) of the ``train`` or ``test`` split in ``folder``."""
    images_stem, labels_stem = IDX_FILES[split]
    images_path, labels_path = _idx_file(folder, images_stem), _idx_file(folder, labels_stem)
    assert images_path is not None and labels_path is not None, "find_idx_folder checked they exist"
    images, labels = read_idx(images_path, fix), read_idx(labels_path, fix)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise KfloError(f"{images_path} holds {images.dtype} data of shape {images.shape}, not N x H x W bytes; {fix}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise KfloError(f"{labels_path} holds {labels.shape} labels for {len(images)} images in {images_path.name}; {fix}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise KfloError(f"{labels_path} has label {bad}, outside 0..{num_classes - 1}; {fix}")
    return images[:, None], labels.astype(np.int64)


# -- CIFAR python batches through a restricted unpickler ----------------------------------------------------------


def _codecs_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Python 3's protocol-2 pickles store ``bytes`` as ``_codecs.encode(str, "latin1")``; allow only that."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): only latin1 text is expected")
    return codecs.encode(text, "latin1", errors)


# The exact globals a pickled numpy array references (module paths of numpy 1.x and 2.x), taken from numpy's
# own reduce methods rather than imported by name.
_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]
_NUMPY_FROMBUFFER = np.empty(1).__reduce_ex__(5)[0]
SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles builtin containers, numbers, strings, bytes and numpy arrays, and nothing else.

    A pickle can name any importable callable and have the loader call it (``os.system`` is the classic); every
    callable goes through :meth:`find_class`, which here resolves only the numpy array reconstruction
    functions in :data:`SAFE_GLOBALS` and refuses every other name. Object arrays are refused after loading.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}'") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id")


def _no_object_arrays(value: Any, limit: int | None = None) -> None:
    """Refuse arrays of Python objects, and arrays of more than ``limit`` bytes in all: a real batch's pixels are
    stored in the file, so more than the file's size means a forged shape (numpy reserved it without touching it).
    Walks containers without recursion, each object once (a pickle may nest deeply or hold cycles)."""
    total, seen, stack = 0, set(), [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, np.ndarray):
            if item.dtype.hasobject:
                raise pickle.UnpicklingError("refusing an array of Python objects")
            total += item.nbytes
            if limit is not None and total > limit:
                raise pickle.UnpicklingError(f"refusing arrays of more than the file's {limit:,} bytes")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def load_pickle(path: Path, fix: str) -> Any:
    """Load a pickle with :class:`RestrictedUnpickler` (``latin1`` decodes Python 2's ``str`` as numpy expects)."""
    try:
        with path.open("rb") as f:
            value = RestrictedUnpickler(f, encoding="latin1").load()
        _no_object_arrays(value, path.stat().st_size)
        return value
    except pickle.UnpicklingError as exc:
        raise KfloError(f"{path} is not a plain data pickle: {exc}; {fix}") from None
    except (OSError, EOFError, ValueError, TypeError, IndexError, AttributeError, KeyError, MemoryError,
            RecursionError) as exc:
        raise KfloError(f"{path} cannot be read as a CIFAR batch ({type(exc).__name__}: {exc}); {fix}") from None


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and labels."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: str
    meta: str
    names_key: str
    num_classes: int


CIFAR: dict[str, CifarLayout] = {
    "cifar10": CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                           "labels", "batches.meta", "label_names", 10),
    "cifar100": CifarLayout("cifar-100-python", ("train",), ("test",), "fine_labels", "meta", "fine_label_names", 100),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def find_cifar_folder(name: str, roots: Sequence[Path]) -> Path | None:
    """The first of ``roots`` or ``root/<cifar folder>`` that holds every batch file of ``name``."""
    layout = CIFAR[name]
    for root in roots:
        for folder in (root, root / layout.folder):
            if all((folder / f).is_file() for f in layout.train + layout.test):
                return folder
    return None


def download_cifar(name: str, root: Path) -> None:
    """Fetch and unpack the CIFAR archive into ``root`` with torchvision's URL and checksum (no unpickling)."""
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    _make_folder(root)
    try:
        download_and_extract_archive(cls.url, download_root=str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as exc:  # noqa: BLE001  (network, disk or checksum failure)
        raise KfloError(f"downloading {cls.url} failed ({exc}); fetch and unpack it yourself and pass --data-dir DIR") from None


def _text_keys(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a dict, got {type(value).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in value.items()}


def read_cifar_batches(name: str, folder: Path, split: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 3 x 32 x 32, int64 labels) of the ``train`` or ``test`` batches of ``name``."""
    layout = CIFAR[name]
    images, labels = [], []
    for filename in layout.train if split == "train" else layout.test:
        path = folder / filename
        try:
            batch = _text_keys(load_pickle(path, fix))
            data = batch["data"]
            y = np.asarray(batch[layout.label_key])
        except (TypeError, KeyError, ValueError) as exc:
            raise KfloError(f"{path} is not a {name} batch (need a dict with 'data' and '{layout.label_key}': {exc}); {fix}") from None
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise KfloError(f"{path}: 'data' must be a uint8 array of N x 3072 pixels, got {getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}; {fix}")
        if y.ndim != 1 or len(y) != len(data) or not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= layout.num_classes)):
            raise KfloError(f"{path}: '{layout.label_key}' must hold {len(data)} integers in 0..{layout.num_classes - 1}; {fix}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def read_cifar_classes(name: str, folder: Path, fix: str) -> tuple[str, ...]:
    """Class names from the meta file when there is one, else CIFAR-10's names or ``"0"``..``"99"``."""
    layout = CIFAR[name]
    path = folder / layout.meta
    if path.is_file():
        names = _text_keys(load_pickle(path, fix)).get(layout.names_key)
        if isinstance(names, list) and len(names) == layout.num_classes:
            return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    return CIFAR10_CLASSES if name == "cifar10" else tuple(str(i) for i in range(layout.num_classes))


# -- scikit-learn digits ---------------------------------------------------------------------------------------------


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: (uint8 images 1797 x 1 x 8 x 8 with grey levels 0..16, int64 labels)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.uint8)[:, None], bunch.target.astype(np.int64)


# -- image folders ---------------------------------------------------------------------------------------------------

GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


@dataclass
class Folder:
    """An image-folder data set: file lists per split, class names, and the colour mode every image is read in."""

    classes: tuple[str, ...]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    val: list[tuple[str, int]] | None
    mode: str  # "L" or "RGB"


def scan_image_folder(root: Path) -> Folder:
    """Scan ``root/train/<class>/*`` and ``root/test`` (or ``root/val``), numbering classes by ``train``'s sorted names."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    layout = "DIR/train/<class>/*.png and DIR/test/<class>/... (or DIR/val/...)"
    if not (root / "train").is_dir():
        raise KfloError(f"{root / 'train'} does not exist; imagefolder needs --data-dir DIR laid out as {layout}")
    held = [s for s in ("val", "test") if (root / s).is_dir()]
    if not held:
        raise KfloError(f"{root} has a train/ folder but neither val/ nor test/; add one laid out like train/ ({layout})")
    try:
        classes, class_to_idx = find_classes(str(root / "train"))
        train = make_dataset(str(root / "train"), class_to_idx, extensions=IMG_EXTENSIONS)
        splits = {}
        for split in held:
            own, _ = find_classes(str(root / split))
            unknown = sorted(set(own) - set(class_to_idx))
            if unknown:
                raise KfloError(f"{root / split} has classes {unknown} that train/ lacks; every class must have training images")
            splits[split] = make_dataset(str(root / split), {c: class_to_idx[c] for c in own}, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as exc:
        raise KfloError(f"{exc}; imagefolder needs {layout} with image files ({', '.join(IMG_EXTENSIONS)})") from None
    test = splits["test"] if "test" in splits else splits["val"]
    if not test:
        raise KfloError(f"{root / held[-1]} holds no images; put the held-out images there by class ({layout})")
    val = splits["val"] if len(splits) == 2 else None
    return Folder(tuple(classes), train, test, val, mode=_folder_mode(train[0][0]))


def _folder_mode(path: str) -> str:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return "L" if img.mode in GREY_MODES else "RGB"
    except (OSError, Image.DecompressionBombError) as exc:  # more than twice Pillow's MAX_IMAGE_PIXELS
        raise KfloError(f"cannot read image {path} ({exc}); remove or replace it") from None


def read_image(path: str, mode: str) -> np.ndarray:
    """One image as uint8 C x H x W in ``mode`` ("L" or "RGB")."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            array = np.array(img.convert(mode), dtype=np.uint8)  # a writable copy for torch
    except (OSError, Image.DecompressionBombError) as exc:
        raise KfloError(f"cannot read image {path} ({exc}); remove or replace it") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

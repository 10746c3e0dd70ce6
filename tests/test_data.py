"""The data layer: every loader on tiny files written here in the standard formats, the seeded splits, label
noise and training subsets, channel/size matching, augmentation, and the restricted unpickler."""

from __future__ import annotations

import gzip
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from kflo_cli.data import formats as fmt
from kflo_cli.data import DATASETS, DataBundle, build_data, corrupt_labels, model_input_for, stratified_split
from kflo_cli.errors import KfloError

# -- writers for the standard formats -------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file: 00 00 TYPE NDIM, big-endian uint32 sizes, big-endian data."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx_set(folder: Path, *, n_train: int = 30, n_test: int = 10, side: int = 6, gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """The four MNIST files with random pixels; labels cycle through 0..9."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for stem, array in arrays.items():
        payload = idx_bytes(array)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(payload) if gz else payload)
    return arrays


def write_cifar10(root: Path, *, per_batch: int = 4, n_test: int = 5, seed: int = 0, str_keys: bool = False) -> dict[str, np.ndarray]:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta, pickled like the real files."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    images, labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [(i * per_batch + j) % 10 for j in range(per_batch)]
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({key("batch_label"): key("training batch"), key("data"): data, key("labels"): y}, protocol=2))
        images.append(data)
        labels += y
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_y = [j % 10 for j in range(n_test)]
    (folder / "test_batch").write_bytes(pickle.dumps({key("data"): test, key("labels"): test_y}, protocol=2))
    names = [key(n) for n in fmt.CIFAR10_CLASSES[::-1]]
    (folder / "batches.meta").write_bytes(pickle.dumps({key("label_names"): names}, protocol=2))
    return {"train": np.concatenate(images), "train_y": np.array(labels), "test": test, "test_y": np.array(test_y)}


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def pixels(bundle: DataBundle, x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: back to [0, 1] pixels."""
    return x * torch.tensor(bundle.std).view(-1, 1, 1) + torch.tensor(bundle.mean).view(-1, 1, 1)


def per_class(labels) -> dict[int, int]:
    return dict(sorted(Counter(np.asarray(labels).tolist()).items()))


def half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


# -- digits ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_raw():
    return fmt.read_digits()


def test_digits_shapes_classes_and_fixed_test_split(digits_raw):
    images, labels = digits_raw
    a, b = build_data("digits", seed=0), build_data("digits", seed=7, val_split=0.2)
    assert (a.num_classes, a.in_chans, a.img_size) == (10, 1, 8)
    assert len(a.train) + len(a.test) == 1797 == len(images)
    x, y = a.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    # stratified 20 % test split per class, the same whatever the run's seed
    assert per_class(a.test.labels) == {c: half_up(0.2 * n) for c, n in per_class(labels).items()}
    assert torch.equal(a.test.index, b.test.index)
    assert torch.equal(torch.stack([a.test[i][0] for i in range(len(a.test))]), torch.stack([b.test[i][0] for i in range(len(b.test))]))
    # the documented split: stratified_split(labels, 0.2) with the fixed seed 0; pixels are the 16 grey levels / 16
    _, held = stratified_split(labels, 0.2, np.random.default_rng(0))
    assert np.array_equal(a.test.labels.numpy(), labels[held])
    assert torch.allclose(pixels(a, a.test[3][0]) * 16, torch.from_numpy(images[held[3]]).float(), atol=1e-5)


def test_digits_resized_and_replicated_to_what_lenet_takes():
    small, big = build_data("digits", augment=False), build_data("digits", in_chans=3, img_size=28, augment=False)
    assert (big.in_chans, big.img_size) == (3, 28)
    assert big.mean == small.mean * 3 and big.std == small.std * 3
    x = pixels(big, big.test[5][0])
    assert x.shape == (3, 28, 28) and torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    expected = F.interpolate(pixels(small, small.test[5][0])[None], size=(28, 28), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(x[0], expected, atol=1e-5)


# -- splits, subsets, label noise ----------------------------------------------------------------------------------


def test_val_split_is_stratified_disjoint_and_seeded():
    a, b, c = (build_data("digits", val_split=0.25, seed=s) for s in (3, 3, 4))
    train_counts = per_class(torch.cat([a.train.labels, a.val.labels]))
    assert per_class(a.val.labels) == {k: half_up(0.25 * n) for k, n in train_counts.items()}
    assert set(a.train.index.tolist()).isdisjoint(a.val.index.tolist())
    assert len(a.train) + len(a.val) == len(build_data("digits").train)
    assert torch.equal(a.val.index, b.val.index) and torch.equal(a.train.index, b.train.index)
    assert not torch.equal(a.val.index, c.val.index)
    # validation items are not augmented
    state = torch.get_rng_state()
    assert torch.equal(a.val[0][0], a.val[0][0]) and torch.equal(state, torch.get_rng_state())


def test_train_fraction_keeps_the_fraction_of_each_class_after_the_val_split():
    full = build_data("digits", val_split=0.1, seed=1)
    part, again, other = (build_data("digits", val_split=0.1, train_fraction=0.4, seed=s) for s in (1, 1, 2))
    assert per_class(part.train.labels) == {c: half_up(0.4 * n) for c, n in per_class(full.train.labels).items()}
    assert set(part.train.index.tolist()) <= set(full.train.index.tolist())
    assert torch.equal(part.val.index, full.val.index)  # the subset does not move the validation split
    assert torch.equal(part.train.index, again.train.index) and not torch.equal(part.train.index, other.train.index)
    tiny = build_data("digits", train_fraction=0.001)
    assert per_class(tiny.train.labels) == {c: 1 for c in range(10)}


def test_label_noise_flips_exactly_round_pn_training_labels_to_other_classes():
    clean = build_data("digits", val_split=0.2, train_fraction=0.5, seed=5)
    noisy, again, other = (build_data("digits", val_split=0.2, train_fraction=0.5, label_noise=0.3, seed=s) for s in (5, 5, 6))
    n = len(noisy.train)
    flipped = noisy.train.labels != noisy.train.clean_labels
    assert int(flipped.sum()) == half_up(0.3 * n)
    assert torch.equal(noisy.train.clean_labels, clean.train.labels) and torch.equal(noisy.train.index, clean.train.index)
    assert torch.equal(noisy.val.labels, clean.val.labels) and torch.equal(noisy.test.labels, clean.test.labels)
    assert torch.equal(noisy.train.labels, again.train.labels) and not torch.equal(noisy.train.labels, other.train.labels)
    assert [noisy.train[i][1] for i in range(5)] == noisy.train.labels[:5].tolist()
    assert int((build_data("digits", label_noise=1.0).train.labels == build_data("digits").train.labels).sum()) == 0


def test_corrupt_labels_draws_the_new_class_uniformly_among_the_others():
    labels = np.arange(30000) % 3
    noisy = corrupt_labels(labels, 0.5, 3, np.random.default_rng(0))
    moved = noisy != labels
    assert moved.sum() == 15000 and noisy.min() == 0 and noisy.max() == 2
    shift = Counter(((noisy - labels) % 3)[moved].tolist())
    assert set(shift) == {1, 2} and abs(shift[1] - shift[2]) < 600  # ~4.9 standard deviations of a fair split
    assert np.array_equal(corrupt_labels(labels, 0.0, 3, np.random.default_rng(0)), labels)
    with pytest.raises(KfloError, match="at least 2 classes"):
        corrupt_labels(np.zeros(4, dtype=int), 0.5, 1, np.random.default_rng(0))


def test_stratified_split_keeps_one_sample_of_every_class():
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    kept, held = stratified_split(labels, 0.9, np.random.default_rng(0))
    assert per_class(labels[kept]) == {0: 1, 1: 1, 2: 1} and per_class(labels[held]) == {0: 3, 2: 1}


# -- idx files (MNIST, Fashion-MNIST) ------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_idx_files_pixel_exact(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    bundle = build_data("mnist", data_dir=str(tmp_path), augment=False)
    assert (bundle.num_classes, bundle.in_chans, bundle.img_size, len(bundle.train), len(bundle.test)) == (10, 1, 6, 30, 10)
    assert bundle.mean == (0.1307,) and bundle.std == (0.3081,)
    for i in (0, 7):
        x, y = bundle.test[i]
        assert y == arrays["t10k-labels-idx1-ubyte"][i]
        assert torch.allclose(pixels(bundle, x)[0] * 255, torch.from_numpy(arrays["t10k-images-idx3-ubyte"][i]).float(), atol=1e-3)
    assert bundle.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_fashion_mnist_default_dir_and_torchvision_layout(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "debian", seed=1)
    monkeypatch.setattr(fmt, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = build_data("fashion-mnist")
    assert bundle.source_dir == str(tmp_path / "debian") and bundle.classes[9] == "Ankle boot"
    assert bundle.mean == (0.2860,)
    write_idx_set(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)
    assert build_data("fashion-mnist", data_dir=str(tmp_path / "tv")).source_dir == str(tmp_path / "tv" / "FashionMNIST" / "raw")


def test_missing_idx_files_name_the_files_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(KfloError, match=r"train-images-idx3-ubyte\.gz.*apt-get install dataset-fashion-mnist.*--download"):
        build_data("fashion-mnist")
    with pytest.raises(KfloError, match=r"t10k-labels-idx1-ubyte\.gz.*--data-dir DIR holding them or add --download"):
        build_data("mnist", data_dir=str(tmp_path))


def corrupt(path: Path, how: str) -> None:
    raw = gzip.decompress(path.read_bytes())
    if how == "truncated":
        raw = raw[:-5]
    elif how == "magic":
        raw = b"\x01" + raw[1:]
    elif how == "gzip":
        path.write_bytes(path.read_bytes()[:40])
        return
    path.write_bytes(gzip.compress(raw))


@pytest.mark.parametrize("how, message", [("truncated", "data bytes but its header"), ("magic", "magic number"), ("gzip", "cannot be read as an idx file")])
def test_corrupt_idx_files_are_named(tmp_path, how, message):
    write_idx_set(tmp_path)
    corrupt(tmp_path / "train-images-idx3-ubyte.gz", how)
    with pytest.raises(KfloError, match=message) as err:
        build_data("mnist", data_dir=str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in str(err.value) and "--download" in str(err.value)


def test_idx_label_count_mismatch_is_refused(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3, dtype=np.uint8))))
    with pytest.raises(KfloError, match=r"3,\) labels for 10 images"):
        build_data("mnist", data_dir=str(tmp_path))


def test_negative_idx_labels_are_refused(tmp_path):
    write_idx_set(tmp_path)
    labels = (np.arange(30) % 10).astype(np.int32)
    labels[4] = -1
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(KfloError, match="has label -1, outside 0..9"):
        build_data("mnist", data_dir=str(tmp_path))


def test_a_val_split_that_holds_out_nothing_is_refused():
    with pytest.raises(KfloError, match="--val-split 0.001 holds out no image"):
        build_data("digits", val_split=0.001)


def test_parse_idx_reads_other_types_big_endian():
    ints = np.array([[1, -2, 70000]], dtype=np.int32)
    floats = np.array([0.5, -3.25], dtype=np.float32)
    assert np.array_equal(fmt.parse_idx(idx_bytes(ints), "x"), ints)
    assert np.array_equal(fmt.parse_idx(idx_bytes(floats), "x"), floats)
    with pytest.raises(ValueError, match="unknown idx data type"):
        fmt.parse_idx(b"\x00\x00\x07\x01\x00\x00\x00\x00", "x")


def test_download_passes_through_to_torchvision(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST, utils

    source = tmp_path / "mirror"
    write_idx_set(source)
    calls = []

    def fake_download_url(url, root, filename, md5):
        calls.append((url, filename, md5))
        (Path(root) / filename).write_bytes((source / filename).read_bytes())

    monkeypatch.setattr(utils, "download_url", fake_download_url)
    bundle = build_data("mnist", data_dir=str(tmp_path / "dl"), download=True)
    assert len(bundle.train) == 30 and [c[1:] for c in calls] == MNIST.resources
    assert all(url == MNIST.mirrors[0] + name for url, name, _ in calls)


# -- CIFAR ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar10_batches_read_pixel_exact_without_plain_pickle(tmp_path, monkeypatch, str_keys):
    raw = write_cifar10(tmp_path, str_keys=str_keys)

    def forbidden(*args, **kwargs):
        raise AssertionError("plain pickle.load used")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):
        bundle = build_data("cifar10", data_dir=str(where), augment=False)
        assert (bundle.num_classes, bundle.in_chans, bundle.img_size, len(bundle.train), len(bundle.test)) == (10, 3, 32, 20, 5)
        assert bundle.classes == fmt.CIFAR10_CLASSES[::-1]  # read from batches.meta
    x, y = bundle.train[13]
    expected = torch.from_numpy(raw["train"][13].reshape(3, 32, 32)).float() / 255  # rows: 1024 R, 1024 G, 1024 B
    assert y == raw["train_y"][13] and torch.allclose(pixels(bundle, x), expected, atol=1e-5)
    assert bundle.test.labels.tolist() == raw["test_y"].tolist()


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        fine = [(7 * i) % 100 for i in range(n)]
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]}
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    bundle = build_data("cifar100", data_dir=str(tmp_path))
    assert bundle.num_classes == 100 and bundle.train.labels.tolist() == [(7 * i) % 100 for i in range(12)]
    assert bundle.mean == (0.5071, 0.4865, 0.4409)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    with pytest.raises(KfloError, match=r"data_batch_3 is not a plain data pickle: refusing to load global '(os|posix)\.system'"):
        build_data("cifar10", data_dir=str(tmp_path))
    for payload in (b"cos\nsystem\n(S'touch %s'\ntR." % str(marker).encode(), b"cbuiltins\neval\n(S'1'\ntR.",
                    pickle.dumps(np.array([_Evil(marker)], dtype=object))):
        batch.write_bytes(payload)
        with pytest.raises(KfloError, match="refusing"):
            build_data("cifar10", data_dir=str(tmp_path))
    assert not marker.exists()


def test_cifar_errors_name_the_files(tmp_path):
    with pytest.raises(KfloError, match=r"cifar-10-batches-py/\{data_batch_1,.*test_batch\}.*--download"):
        build_data("cifar10", data_dir=str(tmp_path))
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(KfloError, match="test_batch: 'data' must be a uint8 array of N x 3072"):
        build_data("cifar10", data_dir=str(tmp_path))
    batch.write_bytes(b"\x80\x02}q\x00")  # truncated
    with pytest.raises(KfloError, match="test_batch cannot be read"):
        build_data("cifar10", data_dir=str(tmp_path))


def test_cifar_download_uses_torchvision_archive_then_own_reader(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10, utils

    calls = []

    def fake(url, download_root, filename, md5):
        calls.append((url, filename, md5))
        write_cifar10(Path(download_root))

    monkeypatch.setattr(utils, "download_and_extract_archive", fake)
    assert len(build_data("cifar10", data_dir=str(tmp_path), download=True).train) == 20
    assert calls == [(CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5)]


# -- image folders ----------------------------------------------------------------------------------------------------


def test_imagefolder_reads_classes_and_centre_crops(tmp_path):
    rng = np.random.default_rng(0)
    images = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                images[(split, cls, i)] = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)  # H x W x RGB
                write_png(tmp_path / split / cls / f"{i}.png", images[(split, cls, i)])
    bundle = build_data("imagefolder", data_dir=str(tmp_path), augment=False)
    assert (bundle.classes, bundle.num_classes, bundle.in_chans, bundle.img_size) == (("cat", "dog"), 2, 3, 10)
    assert bundle.val is None and len(bundle.train) == 6 and bundle.test.labels.tolist() == [0, 0, 1, 1]
    x, y = bundle.test[2]
    expected = torch.from_numpy(images[("test", "dog", 0)][:, 2:12]).permute(2, 0, 1).float() / 255
    assert y == 1 and torch.allclose(pixels(bundle, x), expected, atol=1e-5)
    small = build_data("imagefolder", data_dir=str(tmp_path), img_size=5, in_chans=1)
    assert small.train[0][0].shape == (1, 5, 5)


def test_imagefolder_grey_val_folder_and_errors(tmp_path):
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            write_png(tmp_path / split / cls / "0.png", np.full((8, 8), 40 if cls == "a" else 200, dtype=np.uint8))
    bundle = build_data("imagefolder", data_dir=str(tmp_path))
    assert bundle.in_chans == 1 and len(bundle.val) == 2 and len(bundle.test) == 2
    with pytest.raises(KfloError, match="own val/ folder"):
        build_data("imagefolder", data_dir=str(tmp_path), val_split=0.5)
    write_png(tmp_path / "test" / "zebra" / "0.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(KfloError, match=r"classes \['zebra'\] that train/ lacks"):
        build_data("imagefolder", data_dir=str(tmp_path))
    with pytest.raises(KfloError, match="needs --data-dir"):
        build_data("imagefolder")
    with pytest.raises(KfloError, match="train does not exist"):
        build_data("imagefolder", data_dir=str(tmp_path / "test"))


# -- synthetic, matching, augmentation ------------------------------------------------------------------------------


def test_synthetic_is_configurable_and_fixed():
    a = build_data("synthetic", num_classes=4, in_chans=2, img_size=12, num_samples=40, seed=0)
    b = build_data("synthetic", num_classes=4, in_chans=2, img_size=12, num_samples=40, seed=9, val_split=0.25)
    assert (a.num_classes, a.in_chans, a.img_size, len(a.train), len(a.test)) == (4, 2, 12, 40, 8)
    assert a.train[0][0].shape == (2, 12, 12) and per_class(a.train.labels) == {c: 10 for c in range(4)}
    assert torch.equal(a.train.source.images, b.train.source.images)  # the run seed moves splits, not pixels
    assert per_class(b.val.labels) == {c: 2 for c in range(4)} or per_class(b.val.labels) == {c: 3 for c in range(4)}


def test_rgb_to_grey_uses_luminance_and_measured_statistics(tmp_path):
    write_cifar10(tmp_path)
    rgb = build_data("cifar10", data_dir=str(tmp_path), augment=False)
    grey = build_data("cifar10", data_dir=str(tmp_path), in_chans=1, augment=False)
    x = pixels(grey, grey.test[1][0])
    expected = (torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1) * pixels(rgb, rgb.test[1][0])).sum(0, keepdim=True)
    assert x.shape == (1, 32, 32) and torch.allclose(x, expected, atol=1e-5)
    lum = (torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1) * rgb.train.source.images.double() / 255).sum(1)
    assert grey.mean[0] == pytest.approx(lum.mean().item(), abs=1e-4) and grey.std[0] == pytest.approx(lum.std(unbiased=False).item(), abs=1e-4)
    # conversions start from the stored images, so going back to 3 channels is exact
    model_input_for(grey, 3, 32)
    assert grey.mean == rgb.mean and torch.equal(grey.test[1][0], rgb.test[1][0])


def test_model_input_for_refuses_what_it_cannot_do():
    bundle = build_data("synthetic", in_chans=3, img_size=8, num_samples=20)
    with pytest.raises(KfloError, match="model takes 4 channels but the synthetic data has 3"):
        model_input_for(bundle, 4, None)
    with pytest.raises(KfloError, match="positive"):
        model_input_for(bundle, 3, 0)
    model_input_for(bundle, 3, 16)
    assert bundle.img_size == 16 and bundle.train[0][0].shape == (3, 16, 16)
    two = build_data("synthetic", in_chans=2, img_size=8, num_samples=20)
    with pytest.raises(KfloError, match="replicates grey images and turns RGB into grey, nothing else"):
        model_input_for(two, 1, None)
    grey = build_data("synthetic", in_chans=1, img_size=8, num_samples=20)
    model_input_for(grey, 2, None)
    assert grey.train[0][0].shape == (2, 8, 8) and grey.std == grey.std[:1] * 2
    foreign = DataBundle("tiny", TensorDataset(torch.zeros(4, 1, 5, 5)), None, TensorDataset(torch.zeros(2, 1, 5, 5)), 2, 1, 5, (0.0,), (1.0,))
    model_input_for(foreign, 1, 5)  # already matching: nothing to do
    with pytest.raises(KfloError, match="not a kflo data set"):
        model_input_for(foreign, 3, 5)


@pytest.mark.parametrize("name, flips", [("synthetic", True), ("mnist", False)])
def test_augmentation_is_a_seeded_padded_crop_and_flip(tmp_path, name, flips):
    kw = {"num_samples": 20, "img_size": 16, "in_chans": 1} if name == "synthetic" else {"data_dir": str(tmp_path)}
    if name == "mnist":
        write_idx_set(tmp_path, side=16)
    aug, plain = build_data(name, **kw), build_data(name, augment=False, **kw)
    pad = 2 if name == "synthetic" else 1  # 4/32 and 2/28 of 16 pixels, rounded half up
    clean = pixels(plain, plain.train[3][0])
    padded = F.pad(clean, (pad,) * 4)
    candidates = {(t, l, f): (padded[:, t : t + 16, l : l + 16].flip(-1) if f else padded[:, t : t + 16, l : l + 16])
                  for t in range(2 * pad + 1) for l in range(2 * pad + 1) for f in (False, True)}
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        x = pixels(aug, aug.train[3][0])
        match = [k for k, c in candidates.items() if torch.allclose(x, c, atol=1e-5)]
        assert match, "an augmented image must be a shifted (and maybe flipped) copy with black padding"
        seen.update(match)
    assert any(k[2] for k in seen) == flips
    assert len({k[:2] for k in seen}) > 5  # offsets vary with the seed
    torch.manual_seed(0)
    first = aug.train[3][0]
    torch.manual_seed(0)
    assert torch.equal(first, aug.train[3][0])  # same global seed, same item


def test_batched_fetch_equals_item_by_item():
    for kw in ({}, {"img_size": 28, "in_chans": 3}):
        bundle = build_data("digits", **kw)
        batch = next(iter(DataLoader(bundle.test, batch_size=64)))
        items = [bundle.test[i] for i in range(64)]
        assert torch.equal(batch[0], torch.stack([x for x, _ in items])) and batch[1].tolist() == [y for _, y in items]


def test_bad_arguments_are_user_errors(tmp_path):
    assert DATASETS == ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
    cases = [
        (dict(name="svhn"), "unknown data set 'svhn'; choose one of digits"),
        (dict(name="digits", val_split=1.0), "--val-split"),
        (dict(name="digits", train_fraction=0.0), "--train-fraction"),
        (dict(name="digits", label_noise=1.5), "--label-noise"),
        (dict(name="digits", data_dir="/tmp"), "drop --data-dir"),
        (dict(name="digits", num_classes=3), "synthetic"),
        (dict(name="synthetic", num_classes=1), "at least 2 classes"),
    ]
    for kwargs, message in cases:
        with pytest.raises(KfloError, match=message):
            build_data(kwargs.pop("name"), **kwargs)
    write_idx_set(tmp_path)
    assert build_data("Fashion_MNIST", data_dir=str(tmp_path)).name == "fashion-mnist"

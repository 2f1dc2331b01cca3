"""The transfer benchmark's target loaders, on tiny fixtures written here (and the small built-in sets)."""
import gzip

import numpy as np
import pytest

from bench.transfer_data import (TARGETS, load_digits_to_mnist, load_fashion, load_target, read_idx,
                                 stratified_subset)


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    """A 3-class stand-in for Debian's files: 6 train images per class, 2 test images per class."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("t10k", 2)):
        labels = np.tile(np.arange(3, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, (labels.size, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels * 100  # each image names its class in one pixel
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def test_idx_files_read_back_as_written(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", array)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)  # float IDX: not what images are
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "bad")


def test_fashion_reads_the_idx_pair_and_subsamples_only_the_train_split(fashion_dir):
    target = load_fashion(per_class=4, seed=1, root=fashion_dir)
    assert target.train_x.shape == (12, 28, 28, 3) and target.train_x.dtype == np.uint8
    assert np.bincount(target.train_y).tolist() == [4, 4, 4] and target.train_y.dtype == np.int64
    assert target.test_x.shape == (6, 28, 28, 3) and np.bincount(target.test_y).tolist() == [2, 2, 2]
    assert np.array_equal(target.train_x[:, 0, 0, 0], target.train_y * 100)  # images stay with their labels
    assert np.array_equal(target.train_x[..., 0], target.train_x[..., 2])  # grey over three channels
    assert target.labels[0] == "t-shirt" and "none" in target.shift
    capped = load_fashion(per_class=None, seed=0, root=fashion_dir, max_train=9)
    assert np.bincount(capped.train_y).tolist() == [3, 3, 3] and "capped at 9" in capped.shift
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion(None, 0, root=fashion_dir / "missing")


def test_digits_to_mnist_reads_the_csv_sample(tmp_path):
    rows = np.zeros((4, 785))
    rows[:, -1] = [3, 1, 4, 1]
    rows[0, 28 * 14 + 14] = 255  # one white pixel in the middle of a black image
    with gzip.open(tmp_path / "mnist.csv.gz", "wt") as handle:
        np.savetxt(handle, rows, fmt="%d", delimiter=",")
    target = load_digits_to_mnist(per_class=5, seed=0, mnist_csv=tmp_path / "mnist.csv.gz")
    assert target.test_x.shape == (4, 28, 28, 3) and target.test_y.tolist() == [3, 1, 4, 1]
    assert target.test_x[0, 14, 14].tolist() == [255, 255, 255] and target.test_x[0, 0, 0, 0] == 0
    assert target.train_x.shape == (50, 8, 8, 3) and np.bincount(target.train_y).tolist() == [5] * 10
    assert "white-on-black" in target.shift


def test_digits_writer_halves_are_disjoint_and_cover_the_file():
    from sklearn.datasets import load_digits

    target = load_target("digits-writer", None, 0)
    assert len(target.train_y) + len(target.test_y) == 1797 and len(target.train_y) == 898
    pixels = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    assert np.array_equal(target.train_x[..., 0], pixels[:898]) and np.array_equal(target.test_x[..., 0], pixels[898:])
    assert target.train_x.max() == 255 and "writers" in target.shift


def test_per_class_subsampling_is_stratified_and_seeded():
    labels = np.repeat(np.arange(3), [10, 20, 5])
    picked = stratified_subset(labels, 4, seed=7)
    assert np.bincount(labels[picked]).tolist() == [4, 4, 4]
    assert np.array_equal(picked, stratified_subset(labels, 4, seed=7))
    assert not np.array_equal(picked, stratified_subset(labels, 4, seed=8))
    assert np.bincount(labels[stratified_subset(labels, 8, 0)]).tolist() == [8, 8, 5]  # a small class gives all it has
    a, b = load_target("digits-writer", 3, seed=1), load_target("digits-writer", 3, seed=1)
    assert np.bincount(a.train_y).tolist() == [3] * 10 and np.array_equal(a.train_x, b.train_x)
    assert len(a.test_y) == 899  # the test split is never subsampled


def test_faces_and_textures_splits():
    faces = load_target("faces", 10, seed=0)
    assert np.bincount(faces.train_y).tolist() == [10, 10] and np.bincount(faces.test_y).tolist() == [50, 50]
    assert faces.labels == ["face", "not-face"] and "no natural shift" in faces.shift
    other = load_target("faces", None, seed=1)
    assert len(other.train_y) == 100 and not np.array_equal(other.test_x, load_target("faces", None, 0).test_x)
    textures = load_target("textures", 5, seed=0)
    assert textures.train_x.shape == (20, 64, 64, 3) and np.bincount(textures.test_y).tolist() == [50] * 4
    assert textures.labels == ["brick", "grass", "gravel", "moon"] and "spatial" in textures.shift


def test_unknown_target_is_named():
    assert TARGETS == ("digits-writer", "digits-to-mnist", "fashion", "faces", "textures", "inspection-grey",
                       "inspection-colour")
    with pytest.raises(ValueError, match="unknown target 'mnist'.*digits-writer"):
        load_target("mnist", None, 0)

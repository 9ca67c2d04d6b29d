import gzip
import pickle

import numpy as np
import pytest
import scipy.io
import torch
from sklearn.datasets import load_digits

from utils.data import DATASET_NAMES, Dataset, expected_files, load_dataset
from utils.errors import UserError

FILE_DATASETS = ("cifar10", "fmnist", "mnist", "svhn")


def standardised(x_train: np.ndarray, x_test: np.ndarray):
    """Reference per-channel standardisation in float64 with the training split's statistics."""
    x_train, x_test = x_train.astype(np.float64), x_test.astype(np.float64)
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True)
    return (x_train - mean) / std, (x_test - mean) / std


def assert_matches(actual: torch.Tensor, expected: np.ndarray):
    assert actual.dtype == torch.float32
    np.testing.assert_allclose(actual.numpy(), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Tiny files in torchvision's on-disk layouts


def write_cifar10(root, rng):
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=2)]
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
        train_x.append(data)
        train_y += labels
    test_x = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    test_y = [1, 0, 9]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": test_x, b"labels": test_y}, f)
    return (np.concatenate(train_x).reshape(-1, 3, 32, 32), np.array(train_y),
            test_x.reshape(-1, 3, 32, 32), np.array(test_y))


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes((0, 0, 0x08, array.ndim)) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(root, name, rng, compress):
    raw = root / name / {"mnist": "MNIST", "fmnist": "FashionMNIST"}[name] / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([6, 5, 3, 5], dtype=np.uint8),
    }
    for stem, array in arrays.items():
        if compress:
            with gzip.open(raw / f"{stem}.gz", "wb") as f:
                f.write(idx_bytes(array))
        else:
            (raw / stem).write_bytes(idx_bytes(array))
    return (arrays["train-images-idx3-ubyte"][:, None], arrays["train-labels-idx1-ubyte"].astype(np.int64),
            arrays["t10k-images-idx3-ubyte"][:, None], arrays["t10k-labels-idx1-ubyte"].astype(np.int64))


def write_svhn(root, rng):
    folder = root / "svhn"
    folder.mkdir(parents=True)
    splits = []
    for filename, labels in (("train_32x32.mat", [10, 1, 2, 10, 7]), ("test_32x32.mat", [3, 10])):
        x_chw = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
        y = np.array(labels, dtype=np.uint8)[:, None]
        scipy.io.savemat(folder / filename, {"X": x_chw.transpose(2, 3, 1, 0), "y": y})  # (H, W, C, N)
        splits += [x_chw, np.array([0 if v == 10 else v for v in labels])]
    return tuple(splits)


# ---------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", root=None)


def test_digits_sizes_and_shapes(digits):
    assert isinstance(digits, Dataset)
    assert digits.X_train.shape == (1497, 1, 8, 8) and digits.X_test.shape == (300, 1, 8, 8)
    assert digits.X_train.dtype == torch.float32
    assert digits.Y_train.shape == (1497, 10) and digits.Y_test.shape == (300, 10)
    assert digits.input_shape == (1, 8, 8)
    assert digits.output_dim == 10 and digits.num_classes == 10


def test_digits_split_partitions_the_bundled_images(digits):
    # The raw pixels are the integers 0..16, and both extremes occur in the training split,
    # so the standardisation can be undone exactly from the training tensor alone.
    scale = 16.0 / (digits.X_train.max() - digits.X_train.min()).double()
    offset = -digits.X_train.min().double() * scale
    rows = []
    for x, y in ((digits.X_train, digits.Y_train), (digits.X_test, digits.Y_test)):
        raw = (x.double() * scale + offset).reshape(len(x), -1)
        np.testing.assert_allclose(raw.numpy(), raw.round().numpy(), atol=1e-4)
        rows.append(np.column_stack([raw.round().numpy(), y.argmax(dim=1).numpy()]))
    ours = np.concatenate(rows)
    bunch = load_digits()
    reference = np.column_stack([bunch.images.reshape(1797, -1), bunch.target])
    sort = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(sort(ours), sort(reference))


def test_digits_split_is_fixed_and_independent_of_dataset_seed(digits):
    other = load_dataset("digits", root=None, dataset_seed=1)
    for field in ("X_train", "Y_train", "X_test", "Y_test"):
        assert torch.equal(getattr(digits, field), getattr(other, field))


def test_standardisation_per_channel(digits):
    var, mean = torch.var_mean(digits.X_train.double(), dim=(0, 2, 3), correction=0)
    assert torch.allclose(mean, torch.zeros(1, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(var, torch.ones(1, dtype=torch.float64), atol=1e-5)


def test_num_data_subset_is_seeded():
    a = load_dataset("digits", root=None, num_data=100, dataset_seed=3, loss="ce")
    b = load_dataset("digits", root=None, num_data=100, dataset_seed=3, loss="ce")
    c = load_dataset("digits", root=None, num_data=100, dataset_seed=4, loss="ce")
    assert a.X_train.shape == (100, 1, 8, 8) and a.Y_train.shape == (100,)
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.Y_train, b.Y_train)
    assert not torch.equal(a.X_train, c.X_train)
    assert a.X_test.shape == (300, 1, 8, 8)
    # The subset is standardised with its own statistics.
    var, mean = torch.var_mean(a.X_train.double(), correction=0)
    assert abs(mean.item()) < 1e-6 and abs(var.item() - 1) < 1e-5


def test_mse_one_hot_agrees_with_ce_labels(digits):
    ce = load_dataset("digits", root=None, loss="ce")
    assert ce.Y_train.dtype == torch.int64 and ce.Y_train.shape == (1497,)
    assert ce.output_dim == 10
    assert digits.Y_train.dtype == torch.float32
    assert torch.equal(digits.Y_train, torch.nn.functional.one_hot(ce.Y_train, 10).float())
    assert torch.equal(digits.Y_test.argmax(dim=1), ce.Y_test)
    assert torch.equal(digits.X_train, ce.X_train)


def test_classes_filter_and_relabel_in_given_order():
    full = load_dataset("digits", root=None, loss="ce")
    kept = load_dataset("digits", root=None, loss="ce", classes=[7, 2, 4])
    for labels, sub in ((full.Y_train, kept.Y_train), (full.Y_test, kept.Y_test)):
        mask = (labels == 7) | (labels == 2) | (labels == 4)
        expected = torch.full_like(labels, -1)
        expected[labels == 7], expected[labels == 2], expected[labels == 4] = 0, 1, 2
        assert torch.equal(sub, expected[mask])
    assert kept.num_classes == 3 and kept.output_dim == 3
    assert kept.X_train.shape == (int(((full.Y_train == 7) | (full.Y_train == 2) | (full.Y_train == 4)).sum()), 1, 8, 8)


def test_two_classes_mse_is_a_single_plus_minus_one_output():
    ce = load_dataset("digits", root=None, loss="ce", classes=[5, 3])
    mse = load_dataset("digits", root=None, loss="mse", classes=[5, 3])
    assert mse.output_dim == 1 and mse.num_classes == 2 and ce.output_dim == 2
    assert mse.Y_train.shape == (len(ce.Y_train), 1) and mse.Y_train.dtype == torch.float32
    # First listed class (5) -> -1, second (3) -> +1.
    assert torch.equal(mse.Y_train[:, 0], 2.0 * ce.Y_train.float() - 1.0)
    assert torch.equal(mse.Y_test[:, 0], 2.0 * ce.Y_test.float() - 1.0)
    full = load_dataset("digits", root=None, loss="ce")
    assert int((mse.Y_train == -1).sum()) == int((full.Y_train == 5).sum())
    assert int((mse.Y_train == 1).sum()) == int((full.Y_train == 3).sum())


# ---------------------------------------------------------------------------------------------
# On-disk formats


def test_cifar10_reads_pickled_batches(tmp_path):
    train_x, train_y, test_x, test_y = write_cifar10(tmp_path, np.random.default_rng(0))
    data = load_dataset("cifar10", root=tmp_path, loss="ce")
    expected_train, expected_test = standardised(train_x, test_x)
    assert_matches(data.X_train, expected_train)
    assert_matches(data.X_test, expected_test)
    assert data.Y_train.tolist() == train_y.tolist() and data.Y_test.tolist() == test_y.tolist()
    assert data.input_shape == (3, 32, 32) and data.output_dim == 10


@pytest.mark.parametrize("name, compress", [("mnist", False), ("fmnist", True)])
def test_idx_files_plain_and_gzipped(tmp_path, name, compress):
    train_x, train_y, test_x, test_y = write_idx_dataset(tmp_path, name, np.random.default_rng(1), compress)
    data = load_dataset(name, root=str(tmp_path), loss="ce")
    expected_train, expected_test = standardised(train_x, test_x)
    assert_matches(data.X_train, expected_train)
    assert_matches(data.X_test, expected_test)
    assert data.Y_train.tolist() == train_y.tolist() and data.Y_test.tolist() == test_y.tolist()
    assert data.input_shape == (1, 28, 28)


def test_svhn_reads_mat_files_and_maps_label_ten_to_zero(tmp_path):
    train_x, train_y, test_x, test_y = write_svhn(tmp_path, np.random.default_rng(2))
    data = load_dataset("svhn", root=tmp_path, loss="ce")
    expected_train, expected_test = standardised(train_x, test_x)
    assert_matches(data.X_train, expected_train)
    assert_matches(data.X_test, expected_test)
    assert data.Y_train.tolist() == [0, 1, 2, 0, 7] and data.Y_test.tolist() == [3, 0]
    assert data.input_shape == (3, 32, 32)


def test_class_filter_and_subset_apply_to_files(tmp_path):
    train_x, train_y, test_x, test_y = write_idx_dataset(tmp_path, "mnist", np.random.default_rng(3), False)
    data = load_dataset("mnist", root=tmp_path, loss="mse", classes=[1, 5])
    # Training labels 3,1,4,1,5,9,2 keep rows 1,3,4; test labels 6,5,3,5 keep rows 1,3.
    expected_train, expected_test = standardised(train_x[[1, 3, 4]], test_x[[1, 3]])
    assert_matches(data.X_train, expected_train)
    assert_matches(data.X_test, expected_test)
    assert data.Y_train[:, 0].tolist() == [-1.0, -1.0, 1.0] and data.Y_test[:, 0].tolist() == [1.0, 1.0]
    subset = load_dataset("mnist", root=tmp_path, loss="ce", num_data=5, dataset_seed=0)
    assert subset.X_train.shape == (5, 1, 28, 28)
    assert set(subset.Y_train.tolist()) <= set(train_y.tolist())


@pytest.mark.parametrize("name", FILE_DATASETS)
def test_missing_files_name_folder_files_and_download(tmp_path, name):
    with pytest.raises(UserError) as info:
        load_dataset(name, root=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / name) in message and "--download" in message
    assert all(rel in message for rel in expected_files(name))


def test_expected_files_layouts():
    assert expected_files("cifar10")[0] == "cifar-10-batches-py/data_batch_1"
    assert expected_files("cifar10")[-1] == "cifar-10-batches-py/test_batch"
    assert "FashionMNIST/raw/t10k-labels-idx1-ubyte" in expected_files("fmnist")
    assert expected_files("mnist")[0] == "MNIST/raw/train-images-idx3-ubyte"
    assert expected_files("svhn") == ["train_32x32.mat", "test_32x32.mat"]
    assert expected_files("digits") == [] and expected_files("synthetic") == []


def test_download_goes_through_torchvision_then_our_reader(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            write_idx_dataset(tmp_path, "mnist", np.random.default_rng(4), compress=True)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    data = load_dataset("mnist", root=tmp_path, download=True, loss="ce")
    assert calls == [(str(tmp_path / "mnist"), False, True)]
    assert data.Y_train.tolist() == [3, 1, 4, 1, 5, 9, 2]
    load_dataset("mnist", root=tmp_path, download=True)
    assert len(calls) == 1  # files present: nothing fetched


def test_corrupt_files_raise_user_error_naming_the_file(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(5))
    broken = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    broken.write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)

    write_idx_dataset(tmp_path, "mnist", np.random.default_rng(6), compress=False)
    labels = tmp_path / "mnist" / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.array([1, 2, 3], dtype=np.uint8))[:-1])  # truncated
    with pytest.raises(UserError, match="train-labels-idx1-ubyte"):
        load_dataset("mnist", root=tmp_path)
    labels.write_bytes(idx_bytes(np.array([1, 2, 3, 4, 5, 6, 12], dtype=np.uint8)))  # label 12
    with pytest.raises(UserError, match="labels outside"):
        load_dataset("mnist", root=tmp_path)


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_default_shapes():
    data = load_dataset("synthetic", root=None, loss="ce")
    assert data.X_train.shape == (1024, 3, 32, 32) and data.X_test.shape == (256, 3, 32, 32)
    assert data.input_shape == (3, 32, 32) and data.output_dim == 10 and data.num_classes == 10
    assert data.Y_train.dtype == torch.int64
    assert set(data.Y_train.tolist()) == set(range(10))


def test_synthetic_custom_shape_is_deterministic_and_learnable():
    kwargs = dict(root=None, input_shape=(1, 4, 4), num_classes=4, num_data=2000)
    a = load_dataset("synthetic", dataset_seed=1, **kwargs)
    b = load_dataset("synthetic", dataset_seed=1, **kwargs)
    c = load_dataset("synthetic", dataset_seed=2, **kwargs)
    assert a.X_train.shape == (2000, 1, 4, 4) and a.Y_train.shape == (2000, 4) and a.output_dim == 4
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.Y_test, b.Y_test)
    assert not torch.equal(a.X_train, c.X_train)
    assert torch.equal(a.Y_test, c.Y_test)  # the test set does not follow dataset_seed

    # A linear teacher's labels are predicted by a least-squares linear fit far above chance.
    def with_bias(x):
        flat = x.reshape(len(x), -1).double()
        return torch.cat([flat, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)

    weights = torch.linalg.lstsq(with_bias(a.X_train), a.Y_train.double()).solution
    test_accuracy = (with_bias(a.X_test) @ weights).argmax(dim=1).eq(a.Y_test.argmax(dim=1)).double().mean()
    assert test_accuracy > 0.6


def test_synthetic_short_input_shape_is_padded_to_chw():
    assert load_dataset("synthetic", root=None, input_shape=(5, 6), num_data=8).X_train.shape == (8, 1, 5, 6)
    assert load_dataset("synthetic", root=None, input_shape=[7], num_data=8).input_shape == (1, 1, 7)


def test_synthetic_two_classes_mse_single_output():
    data = load_dataset("synthetic", root=None, input_shape=(2, 3, 3), num_classes=2, num_data=64)
    assert data.output_dim == 1 and data.Y_train.shape == (64, 1)
    assert set(data.Y_train.flatten().tolist()) == {-1.0, 1.0}


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_name_lists_choices():
    with pytest.raises(UserError) as info:
        load_dataset("imagenet", root=None)
    assert all(name in str(info.value) for name in DATASET_NAMES)
    with pytest.raises(UserError):
        expected_files("imagenet")


@pytest.mark.parametrize("classes, match", [([3, 10], "0..9"), ([2, 2], "repeat"), ([4], "at least two")])
def test_bad_classes(classes, match):
    with pytest.raises(UserError, match=match):
        load_dataset("digits", root=None, classes=classes)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_data=1498), "--num-data 1498 exceeds the 1497 training images of digits"),
        (dict(num_data=0), "positive"),
        (dict(loss="hinge"), "mse, ce"),
        (dict(dataset_seed=-1), "dataset_seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(UserError, match=match):
        load_dataset("digits", root=None, **kwargs)


def test_bad_synthetic_arguments():
    with pytest.raises(UserError, match="--num-classes"):
        load_dataset("synthetic", root=None, classes=[0, 1])
    with pytest.raises(UserError, match="--input-shape"):
        load_dataset("synthetic", root=None, input_shape=(2, 3, 32, 32))
    with pytest.raises(UserError, match="--input-shape"):
        load_dataset("synthetic", root=None, input_shape=(0, 5))
    with pytest.raises(UserError, match="at least 2"):
        load_dataset("synthetic", root=None, num_classes=1)


def test_file_dataset_without_root_asks_for_datasets_variable():
    with pytest.raises(UserError, match=r"\$DATASETS"):
        load_dataset("cifar10", root=None)

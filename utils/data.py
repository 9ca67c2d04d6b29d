"""Data sets, held whole on the device as tensors.

Every data set goes through the same steps:

1. raw splits: inputs (N, C, H, W) and integer labels for a training and a test split;
   ``digits`` is scikit-learn's bundled 8x8 digits split once with a fixed seed (1497 / 300),
   ``synthetic`` is generated, the others are read from torchvision's on-disk layout under
   ``<root>/<name>/``;
2. class filter: keep the listed labels and relabel them 0..k-1 in the listed order;
3. training subset: ``num_data`` images drawn without replacement with ``dataset_seed``;
4. per-channel standardisation x <- (x - mu_c) / sigma_c with the mean and (population)
   standard deviation of the training subset, applied to both splits;
5. targets for the loss: ``mse`` -> one-hot floats (n, k), except with exactly two classes a
   single output with target -1 for the first class and +1 for the second; ``ce`` -> int64
   labels (n,).

The files are parsed by the small readers below rather than by torchvision, whose loaders
verify MD5 sums that hand-made or trimmed files cannot match; torchvision is used only to
download missing files when asked to.
"""

import contextlib
import gzip
import math
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.losses import LOSS_NAMES

DATASET_NAMES = ("digits", "synthetic", "cifar10", "fmnist", "mnist", "svhn")

# The digits split is part of the data set's definition, so its seed is not a user seed.
_DIGITS_SPLIT_SEED = 0
_DIGITS_NUM_TEST = 300

# Synthetic data: the teacher and the test inputs are fixed; only the training inputs follow
# dataset_seed. The second entropy word keeps the three random streams apart.
_SYNTHETIC_SEED = 20241230
_SYNTHETIC_INPUT_SHAPE = (3, 32, 32)
_SYNTHETIC_NUM_TRAIN = 1024
_SYNTHETIC_NUM_TEST = 256

_NUM_LABELS = 10  # every bundled or on-disk data set has the labels 0..9

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"
_IDX_DIRS = {"mnist": "MNIST/raw", "fmnist": "FashionMNIST/raw"}
_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
_TORCHVISION_CLASSES = {"cifar10": "CIFAR10", "mnist": "MNIST", "fmnist": "FashionMNIST", "svhn": "SVHN"}


@dataclass
class Dataset:
    """Standardised inputs and loss-ready targets of both splits, on one device."""

    name: str
    X_train: torch.Tensor
    Y_train: torch.Tensor
    X_test: torch.Tensor
    Y_test: torch.Tensor
    input_shape: tuple  # (C, H, W)
    output_dim: int  # network outputs
    num_classes: int  # classes kept


class _Split(NamedTuple):
    x: np.ndarray  # (N, C, H, W), uint8 or float
    y: np.ndarray  # (N,), int64


def load_dataset(
    name,
    *,
    root,
    loss="mse",
    num_data=None,
    dataset_seed=888,
    classes=None,
    input_shape=None,
    num_classes=10,
    download=False,
    device="cpu",
) -> Dataset:
    """Load data set ``name`` (one of DATASET_NAMES) as tensors on ``device``.

    ``root`` holds ``<name>/`` for the on-disk data sets. ``input_shape`` (C, H, W) and
    ``num_classes`` apply to ``synthetic`` only, where ``num_data`` is the number of training
    points generated (default 1024); elsewhere ``num_data`` draws a training subset.
    """
    _check_choice(name, DATASET_NAMES, "data set")
    _check_choice(loss, LOSS_NAMES, "loss")
    if isinstance(dataset_seed, bool) or not isinstance(dataset_seed, int) or dataset_seed < 0:
        raise UserError(f"dataset_seed must be a non-negative integer, got {dataset_seed!r}")
    if num_data is not None:
        _check_positive_int(num_data, "--num-data")

    if name == "synthetic":
        if classes is not None:
            raise UserError("--classes does not apply to synthetic data; set --num-classes instead")
        _check_positive_int(num_classes, "--num-classes")
        if num_classes < 2:
            raise UserError(f"--num-classes must be at least 2, got {num_classes}")
        shape = _check_input_shape(_SYNTHETIC_INPUT_SHAPE if input_shape is None else input_shape)
        train, test = _synthetic_splits(shape, num_classes, num_data or _SYNTHETIC_NUM_TRAIN, dataset_seed)
        kept = num_classes
    else:
        train, test = _digits_splits() if name == "digits" else _file_splits(name, root, download)
        kept = _NUM_LABELS
        if classes is not None:
            keep = _check_classes(classes, name)
            train, test = _keep_classes(train, keep), _keep_classes(test, keep)
            if len(train.y) == 0:
                raise UserError(f"no training images of {name} carry the labels {keep}; choose other --classes")
            kept = len(keep)
        if num_data is not None:
            train = _subset(train, num_data, dataset_seed, name)

    x_train, x_test = _to_device(train.x, device), _to_device(test.x, device)
    mean, std = _channel_stats(x_train)
    # In place: the training set may fill much of the device.
    x_train.sub_(mean).div_(std)
    x_test.sub_(mean).div_(std)
    return Dataset(
        name=name,
        X_train=x_train,
        Y_train=_targets(train.y, kept, loss).to(device),
        X_test=x_test,
        Y_test=_targets(test.y, kept, loss).to(device),
        input_shape=tuple(x_train.shape[1:]),
        output_dim=1 if loss == "mse" and kept == 2 else kept,
        num_classes=kept,
    )


def expected_files(name) -> list[str]:
    """Files that data set ``name`` reads, relative to ``<root>/<name>/`` (idx files may be .gz)."""
    _check_choice(name, DATASET_NAMES, "data set")
    if name == "cifar10":
        return [f"{_CIFAR_DIR}/{batch}" for batch in (*_CIFAR_TRAIN_BATCHES, _CIFAR_TEST_BATCH)]
    if name in _IDX_DIRS:
        return [f"{_IDX_DIRS[name]}/{stem}" for split in ("train", "test") for stem in _IDX_STEMS[split]]
    if name == "svhn":
        return [_SVHN_FILES["train"], _SVHN_FILES["test"]]
    return []


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean mu_c and population std sigma_c of x (n, C, H, W), shaped (1, C, 1, 1).

    A constant channel gets sigma_c = 1 so that standardising it gives zeros, not NaNs.
    """
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)
    std = var.sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


# ---------------------------------------------------------------------------------------------
# Raw splits


def _digits_splits() -> tuple[_Split, _Split]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(y))
    train, test = order[:-_DIGITS_NUM_TEST], order[-_DIGITS_NUM_TEST:]
    return _Split(x[train], y[train]), _Split(x[test], y[test])


def _synthetic_splits(shape, num_classes, num_train, seed) -> tuple[_Split, _Split]:
    """Gaussian inputs labelled by a fixed random linear teacher, y = argmax_c (W x)_c."""
    dim = math.prod(shape)
    teacher = np.random.default_rng([_SYNTHETIC_SEED, 0]).standard_normal((dim, num_classes), dtype=np.float32)

    def draw(rng, n):
        x = rng.standard_normal((n, dim), dtype=np.float32)
        return _Split(x.reshape(n, *shape), (x @ teacher).argmax(axis=1).astype(np.int64))

    train = draw(np.random.default_rng([seed, 1]), num_train)
    test = draw(np.random.default_rng([_SYNTHETIC_SEED, 2]), _SYNTHETIC_NUM_TEST)
    return train, test


def _file_splits(name, root, download) -> tuple[_Split, _Split]:
    if root is None:
        raise UserError(f"no data root for {name}: set $DATASETS to the folder that holds {name}/")
    folder = Path(root) / name
    if _missing_files(name, folder) and download:
        _download(name, folder)
    missing = _missing_files(name, folder)
    if missing:
        gz_note = " (each may also end in .gz)" if name in _IDX_DIRS else ""
        raise UserError(
            f"{name} files missing in {folder}: expected {', '.join(expected_files(name))}{gz_note}; "
            f"put them there or pass --download to fetch them"
        )
    if name == "cifar10":
        train = [_parse(folder / _CIFAR_DIR / batch, _read_cifar_batch) for batch in _CIFAR_TRAIN_BATCHES]
        test = _parse(folder / _CIFAR_DIR / _CIFAR_TEST_BATCH, _read_cifar_batch)
        return _Split(np.concatenate([s.x for s in train]), np.concatenate([s.y for s in train])), test
    if name == "svhn":
        return tuple(_parse(folder / _SVHN_FILES[split], _read_svhn) for split in ("train", "test"))
    return tuple(_idx_split(folder / _IDX_DIRS[name], split) for split in ("train", "test"))


def _missing_files(name, folder: Path) -> list[str]:
    gz = name in _IDX_DIRS
    return [rel for rel in expected_files(name) if _find(folder / rel, gz) is None]


def _find(path: Path, gz: bool = True) -> Path | None:
    """``path``, or with ``gz`` its gzipped twin ``path.gz`` (idx files are often kept compressed)."""
    candidates = (path, path.with_name(path.name + ".gz")) if gz else (path,)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _download(name, folder: Path) -> None:
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, _TORCHVISION_CLASSES[name])
    try:
        if name == "svhn":
            for split, filename in _SVHN_FILES.items():
                if not (folder / filename).is_file():
                    with _undone_on_failure(folder):
                        dataset_class(str(folder), split=split, download=True)
        else:
            with _undone_on_failure(folder):
                # One call fetches both splits' files.
                dataset_class(str(folder), train=False, download=True)
    except (OSError, RuntimeError) as err:
        raise UserError(f"downloading {name} into {folder} failed: {_one_line(err)}") from err


@contextlib.contextmanager
def _undone_on_failure(folder: Path):
    """A download into ``folder`` that fails or is interrupted removes the folders and files it
    created (a partial archive among them), never what was there before, so it leaves no empty
    or half-filled data folder; files of an earlier, finished download stay."""
    created_from = folder
    while not created_from.parent.exists():
        created_from = created_from.parent
    existed = set(folder.rglob("*")) if folder.exists() else None
    try:
        yield
    except BaseException:
        if existed is None:
            _remove(created_from)
        else:
            for path in set(folder.rglob("*")) - existed:
                if path.parent == folder or path.parent in existed:  # the top of what is new
                    _remove(path)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# File readers: each returns arrays or raises; _parse turns any failure into a UserError.


def _parse(path: Path, reader, *args):
    try:
        return reader(path, *args)
    except Exception as err:  # a reader of a damaged file can fail in any way; all mean "unusable"
        raise UserError(
            f"cannot read {path}: {_one_line(err)}; replace the file or delete it and pass --download"
        ) from err


def _check_labels(labels: np.ndarray) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= _NUM_LABELS):
        raise ValueError(f"labels outside 0..{_NUM_LABELS - 1}")


def _read_cifar_batch(path: Path) -> _Split:
    """A CIFAR-10 python batch: pickled dict, b'data' uint8 (N, 3072) in CHW order, b'labels'."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError("not a CIFAR-10 batch (a dict with b'data' and b'labels')")
    data = batch[b"data"]
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError("b'data' is not a uint8 array of shape (N, 3072)")
    if labels.shape != (len(data),):
        raise ValueError(f"{len(data)} images but {labels.size} labels")
    _check_labels(labels)
    return _Split(data.reshape(-1, 3, 32, 32), labels)


def _idx_split(raw: Path, split: str) -> _Split:
    images_path, labels_path = (_find(raw / stem) for stem in _IDX_STEMS[split])
    images = _parse(images_path, _read_idx, 3)
    labels = _parse(labels_path, _read_idx_labels)
    if len(images) != len(labels):
        raise UserError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    return _Split(images[:, None], labels)


def _read_idx_labels(path: Path) -> np.ndarray:
    labels = _read_idx(path, 1).astype(np.int64)
    _check_labels(labels)
    return labels


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file: magic 0x0000 0x08 (ubyte) ndim, then ndim big-endian uint32 sizes, then the bytes."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        content = f.read()
    header = 4 + 4 * ndim
    if len(content) < header or content[:4] != bytes((0, 0, 0x08, ndim)):
        raise ValueError(f"not an idx file of unsigned bytes with {ndim} dimension(s)")
    shape = tuple(int(n) for n in np.frombuffer(content, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(content, dtype=np.uint8, offset=header)
    if data.size != math.prod(shape):
        raise ValueError(f"header announces shape {shape} but {data.size} bytes follow")
    return data.reshape(shape).copy()  # frombuffer views are read-only; tensors want writable memory


def _read_svhn(path: Path) -> _Split:
    """An SVHN .mat file: 'X' uint8 (32, 32, 3, N) as (H, W, C, N), 'y' (N, 1) with 10 for digit 0."""
    from scipy.io import loadmat

    mat = loadmat(path)
    if "X" not in mat or "y" not in mat:
        raise ValueError("no 'X' and 'y' arrays")
    x, y = mat["X"], mat["y"].reshape(-1).astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise ValueError("'X' is not a uint8 array of shape (H, W, 3, N)")
    if len(y) != x.shape[3]:
        raise ValueError(f"{x.shape[3]} images but {len(y)} labels")
    y[y == 10] = 0
    _check_labels(y)
    return _Split(np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y)


# ---------------------------------------------------------------------------------------------
# Selection, targets, checks


def _keep_classes(split: _Split, keep: list[int]) -> _Split:
    """Rows whose label is in ``keep``, relabelled to the label's position in ``keep``."""
    relabel = np.full(_NUM_LABELS, -1, dtype=np.int64)
    relabel[keep] = np.arange(len(keep))
    new = relabel[split.y]
    rows = new >= 0
    return _Split(split.x[rows], new[rows])


def _subset(split: _Split, num_data: int, seed: int, name: str) -> _Split:
    available = len(split.y)
    if num_data > available:
        raise UserError(
            f"--num-data {num_data} exceeds the {available} training images of {name}; choose at most {available}"
        )
    rows = np.sort(np.random.default_rng(seed).choice(available, size=num_data, replace=False))
    return _Split(split.x[rows], split.y[rows])


def _targets(labels: np.ndarray, num_kept: int, loss: str) -> torch.Tensor:
    y = torch.from_numpy(labels)
    if loss == "ce":
        return y
    if num_kept == 2:
        return (2.0 * y - 1.0).to(torch.float32).unsqueeze(1)  # first class -1, second +1
    return F.one_hot(y, num_kept).to(torch.float32)


def _to_device(x: np.ndarray, device) -> torch.Tensor:
    # uint8 travels to the device as bytes, a quarter of the float32 traffic.
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    return tensor.to(device).to(torch.float32)


def _check_choice(value, choices, what):
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _check_positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")


def _check_input_shape(shape) -> tuple:
    """(C, H, W); a shorter shape such as (H, W) or (d,) is padded on the left with ones."""
    shape = tuple(shape)
    if not 1 <= len(shape) <= 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise UserError(f"--input-shape must be one to three positive integers (C,H,W), got {shape}")
    return (1,) * (3 - len(shape)) + shape


def _check_classes(classes, name) -> list[int]:
    keep = list(classes)
    valid = f"valid labels of {name} are 0..{_NUM_LABELS - 1}"
    for label in keep:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < _NUM_LABELS:
            raise UserError(f"unknown class label {label!r} in --classes; {valid}")
    keep = [int(label) for label in keep]
    if len(set(keep)) != len(keep):
        raise UserError(f"--classes {keep} repeat a label; list each label once")
    if len(keep) < 2:
        raise UserError(f"--classes {keep} keeps fewer than two labels; list at least two ({valid})")
    return keep


def _one_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

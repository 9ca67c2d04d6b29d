"""A user's own data and loss, turned into what the measurements take: tensors (X, Y) and a
loss ``fn(outputs, targets, reduction='mean')``.

Data may be a pair of tensors, a map-style ``torch.utils.data.Dataset`` (indexable, with a
length), a ``DataLoader`` or an iterable dataset. The samples are read once into two tensors
on the model's device, so the data must fit in memory; Monte Carlo batches are then drawn by
index as for the built-in data sets, and full-batch Hessian products run over the rows in
chunks (``hvp_chunk``). A loader is read through its dataset when that is map-style (its
batch size and sampler play no part: the measurements draw their own batches). A pure
iterable has no indices to draw batches by, so it serves the full-batch quantities only.

A sample is a pair ``(input, target)``, or a dict read by ``batch_to_inputs(sample) ->
(input, target)``; without that function a dict's input is the first of the keys
:data:`INPUT_KEYS` it has and its target the first of :data:`TARGET_KEYS`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from utils.hvp import as_model_data
from utils.losses import LOSS_NAMES, ce_loss, get_loss, mse_loss

INPUT_KEYS = ("x", "input", "inputs", "image", "pixel_values")
TARGET_KEYS = ("y", "target", "targets", "label", "labels")
# Samples read from a map-style dataset at a time when it is turned into tensors.
READ_CHUNK = 1024


@dataclass
class UserData:
    """The rows of a user's data set as tensors. ``indexable``: batches can be drawn by index
    (false for a pure iterable, which serves the full-batch quantities only); ``source``
    names what it was read from, for messages and config.json."""

    X: torch.Tensor
    Y: torch.Tensor
    indexable: bool
    source: str


def _sample_pair(sample, batch_to_inputs: Callable | None):
    if batch_to_inputs is not None:
        pair = batch_to_inputs(sample)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"batch_to_inputs must return (inputs, targets), got {type(pair).__name__}")
        return pair
    if isinstance(sample, dict):
        inputs = next((key for key in INPUT_KEYS if key in sample), None)
        targets = next((key for key in TARGET_KEYS if key in sample), None)
        if inputs is None or targets is None:
            raise ValueError(f"a dict sample needs an input key ({', '.join(INPUT_KEYS)}) and a target key "
                             f"({', '.join(TARGET_KEYS)}), got keys {sorted(sample)}; or pass batch_to_inputs")
        return sample[inputs], sample[targets]
    if isinstance(sample, (tuple, list)) and len(sample) == 2:
        return sample
    raise ValueError(f"a sample must be (input, target) or a dict, got {type(sample).__name__}; or pass batch_to_inputs")


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def _stack_samples(samples, batch_to_inputs) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = zip(*(_sample_pair(s, batch_to_inputs) for s in samples))
    return torch.stack([_as_tensor(x) for x in inputs]), torch.stack([_as_tensor(y) for y in targets])


def _read_map_style(dataset, batch_to_inputs) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2 and batch_to_inputs is None:
        return dataset.tensors
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    parts = [_stack_samples([dataset[i] for i in range(start, min(start + READ_CHUNK, n))], batch_to_inputs)
             for start in range(0, n, READ_CHUNK)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def _read_batches(batches, batch_to_inputs) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for batch in batches:
        x, y = _sample_pair(batch, batch_to_inputs)
        xs.append(_as_tensor(x))
        ys.append(_as_tensor(y))
    if not xs:
        raise ValueError("the iterable yielded no data")
    return torch.cat(xs), torch.cat(ys)


def as_data(data, *, batch_to_inputs: Callable | None = None, device=None, dtype=None) -> UserData:
    """``data`` as :class:`UserData` on ``device``, inputs (and float targets) in ``dtype``
    (None: as they are). See the module's docstring for what ``data`` may be."""
    if isinstance(data, UserData):
        X, Y, indexable, source = data.X, data.Y, data.indexable, data.source
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        (X, Y), indexable, source = data, True, "tensors"
    elif isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            (X, Y), indexable = _read_batches(data, batch_to_inputs), False
        else:
            (X, Y), indexable = _read_map_style(data.dataset, batch_to_inputs), True
        source = type(data.dataset).__name__
    elif isinstance(data, IterableDataset):
        (X, Y), indexable, source = _stack_samples(list(data), batch_to_inputs), False, type(data).__name__
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        (X, Y), indexable, source = _read_map_style(data, batch_to_inputs), True, type(data).__name__
    else:
        raise TypeError(f"data must be (X, Y) tensors, a Dataset or a DataLoader, got {type(data).__name__}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"the data have {X.shape[0]} inputs but {Y.shape[0]} targets")
    if dtype is not None:  # integer inputs (token ids) and labels stay integers
        X, Y = as_model_data(X, dtype, device), as_model_data(Y, dtype, device)
    return UserData(X.to(device) if device is not None else X, Y.to(device) if device is not None else Y,
                    indexable, source)


class _MeanLoss:
    """A callable returning the mean loss of a batch, given the ``reduction`` argument of the
    suite's losses: ``sum`` is the mean times the batch size, ``none`` one call per sample."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    # Equal for the same function, so that what is cached per loss (the closed forms' check of
    # separability) holds across calls that wrap it anew.
    def __eq__(self, other):
        return isinstance(other, _MeanLoss) and other.fn is self.fn

    def __hash__(self):
        return hash(self.fn)

    def __call__(self, outputs, targets, reduction: str = "mean"):
        if reduction == "mean":
            return self.fn(outputs, targets)
        if reduction == "sum":
            return self.fn(outputs, targets) * outputs.shape[0]
        if reduction == "none":
            return torch.stack([self.fn(outputs[i:i + 1], targets[i:i + 1]) for i in range(outputs.shape[0])])
        raise ValueError(f"unknown reduction {reduction!r}")


def as_loss(loss) -> tuple[Callable, str]:
    """(loss function, its name for config.json) of ``loss``: ``"mse"`` (the paper's convention:
    summed over outputs, no 1/2, averaged over samples), ``"ce"``, or any callable
    ``loss(outputs, targets)`` returning the mean loss of a batch.

    ``torch.nn.MSELoss()`` averages over the outputs too, which divides the Hessian, and so
    every curvature value, by the number of outputs C against the paper's ``"mse"``. The
    thresholds (2/eta ...) still hold for the eta that steps on that loss (whose update is the
    paper's at eta/C), but its values are not the paper's, so it gets a warning.
    """
    if isinstance(loss, str):
        if loss not in LOSS_NAMES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSS_NAMES)} or pass a callable")
        return get_loss(loss), loss
    if loss is mse_loss or loss is ce_loss:
        return loss, "mse" if loss is mse_loss else "ce"
    if not callable(loss):
        raise TypeError(f"loss must be 'mse', 'ce' or a callable, got {type(loss).__name__}")
    if isinstance(loss, torch.nn.MSELoss) and loss.reduction == "mean":
        warnings.warn("torch.nn.MSELoss() averages over the outputs as well as the samples: every curvature value is "
                      "the paper's (loss='mse') divided by the number of outputs C; the thresholds stay 2/eta for "
                      "the eta that steps on this loss (the paper's update at eta/C); pass loss='mse' for the "
                      "paper's values", stacklevel=3)
    name = getattr(loss, "__name__", None) or type(loss).__name__
    return _MeanLoss(loss, name), name

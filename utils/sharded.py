"""The training set split over the ranks of a launch, and every sum over it computed in parts.

Rank r of K holds the contiguous block of rows [r n / K, (r + 1) n / K) of the training (and
test) set, as a :class:`Rows`. A batch is a set of global indices known to every rank
(the same permutation, the same Monte Carlo draws as a single process); ``X[idx]`` on a
:class:`Rows` keeps the rows of the batch that this rank holds (any number, zero included)
and remembers the batch's size b. With the loss a mean over samples,

    L_B = (1/b) sum_{i in B} l_i = sum_r (c_r / b) L_{B_r},

with c_r the rows of B on rank r and L_{B_r} the mean loss on them, and likewise for the
gradient, every Hessian(-vector) product and every quadratic form. :class:`ShardedOperator`
applies the operator of :mod:`utils.hvp` (or :mod:`utils.gauss_newton`) to the local rows,
weights it by c_r / b and sums over the ranks, so every rank holds the product of the whole
batch (or data set); solvers and stopping rules then run on identical numbers on every rank
and take identical decisions. The per-batch forms of Batch Sharpness (and its ratio form and the
step sharpness) go the other way: whole batches are split over the ranks, each computed by the
single-process route on its gathered rows (:func:`same_batch_route`).

BatchNorm in train mode couples the rows of a batch, so its loss is no sum of per-rank losses
computed apart: there every rank's layers take the whole batch's statistics
(:mod:`utils.whole_batch_norm`), every rank runs each pass, one without rows too, and its loss
is its share (1/b) sum over its rows before differentiation, so that the weight c_r / b is 1.

Outside a launch every function here hands its tensors to the single-process code unchanged.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from utils import batch_forms, distributed
from utils.distributed import World, all_reduce_sum
from utils.hvp import PLAIN_HVP_MODE, HessianOperator, flatten, forward, params_and_data, trainable_params
from utils.hvp import flat_grad as local_flat_grad
from utils.whole_batch_norm import couples_rows, share_of_mean, whole_batch_statistics

# Rows of Monte Carlo batches gathered onto every rank at once (bounds the memory of a gather).
_ROWS_PER_GATHER = 8192


class Rows:
    """The rows of a data set (or of one batch of it) that this rank holds.

    ``local`` holds them, ``positions`` (ascending) says where each one sits in the whole, and
    ``total`` is the size of the whole: n for the data set, b for a batch. ``shape``,
    ``device`` and indexing by global indices work as on the whole tensor."""

    def __init__(self, local: torch.Tensor, positions: torch.Tensor, total: int):
        self.local, self.positions, self.total = local, positions, int(total)

    @classmethod
    def shard(cls, whole: torch.Tensor, world: World, device=None) -> "Rows":
        """This rank's contiguous block of ``whole``, copied to ``device`` (default: where ``whole``
        is), so that the whole can be freed."""
        n = whole.shape[0]
        start, stop = shard_range(n, world)
        device = whole.device if device is None else torch.device(device)
        return cls(whole[start:stop].to(device, copy=True), torch.arange(start, stop, device=device), n)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.total, *self.local.shape[1:]))

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def count(self) -> int:
        """The rows held here."""
        return self.local.shape[0]

    @property
    def weight(self) -> float:
        """c / total: this rank's share of a mean over the whole."""
        return self.count / self.total

    def __getitem__(self, idx: torch.Tensor) -> "Rows":
        """The rows of the batch ``idx`` (global indices, any order) held here, in batch order."""
        idx = idx.to(self.positions.device).reshape(-1)
        if self.positions.numel() == 0:
            hit = torch.zeros_like(idx, dtype=torch.bool)
            where = idx[:0]
        else:
            where = torch.searchsorted(self.positions, idx).clamp(max=self.positions.numel() - 1)
            hit = self.positions[where] == idx
            where = where[hit]
        return Rows(self.local[where.to(self.local.device)], hit.nonzero().reshape(-1), idx.numel())


def shard_range(n: int, world: World) -> tuple[int, int]:
    """[start, stop) of the rows rank ``world.rank`` holds: contiguous blocks whose sizes differ by at most one."""
    return world.rank * n // world.size, (world.rank + 1) * n // world.size


def is_sharded(X) -> bool:
    return isinstance(X, Rows)


def local(X):
    """The tensor of rows held here (``X`` itself outside a launch)."""
    return X.local if isinstance(X, Rows) else X


class ShardedOperator:
    """sum_r (c_r / total) A_r with A_r an operator of the mean loss on rank r's rows: the operator
    of the mean loss on all of them. ``matvec``, ``gradient`` and ``quadratic_forms`` return the
    same numbers on every rank; ``hvps`` counts products of the whole (one per vector).

    With train-mode BatchNorm (rows coupled) A_r is the operator of this rank's share of the
    mean, (1/total) sum over its rows, under the whole batch's statistics: weight 1, built on
    every rank, with plain double backward (the coupling's all-reduces cannot be batched)."""

    def __init__(self, operator_class, model, loss_fn, X: Rows, Y: Rows, **options):
        params = trainable_params(model)
        self.dim = sum(p.numel() for p in params)
        self.dtype, self.device = params[0].dtype, params[0].device
        self.n, self.weight = X.total, X.weight
        self.coupled = couples_rows(model, options.get("train_mode", True))
        if self.coupled:
            if options.get("chunk_size") is not None:
                raise ValueError("the rows of a train-mode BatchNorm batch cannot be taken in chunks")
            if operator_class is HessianOperator:
                options["mode"] = PLAIN_HVP_MODE
            self.weight = 1.0
            with whole_batch_statistics(model):
                self.local = operator_class(model, share_of_mean(loss_fn, X.total), X.local, Y.local, **options)
        else:
            self.local = operator_class(model, loss_fn, X.local, Y.local, **options) if X.count else None
        self.statistics = (lambda: whole_batch_statistics(model)) if self.coupled else nullcontext
        self.mode = getattr(self.local, "mode", options.get("mode"))
        self.hvps = 0

    def _summed(self, local_part, shape) -> torch.Tensor:
        with self.statistics():
            part = (self.weight * local_part() if self.local is not None
                    else torch.zeros(shape, dtype=self.dtype, device=self.device))
        return all_reduce_sum(part.contiguous())

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """H V (or G V) of the whole, for V of shape (P,) or (P, m)."""
        V = V.to(device=self.device, dtype=self.dtype)
        result = self._summed(lambda: self.local.matvec(V), V.shape)
        self.hvps += 1 if V.dim() == 1 else V.shape[1]
        return result

    def gradient(self) -> torch.Tensor:
        """grad L of the whole, (P,)."""
        return all_reduce_sum(self.local_gradient())

    def local_gradient(self) -> torch.Tensor:
        """(c_r / total) grad L_r, this rank's part of grad L (summed by the caller, many at once)."""
        if self.local is None:
            return torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with self.statistics():
            return self.weight * self.local.gradient()

    def quadratic_forms(self, V: torch.Tensor) -> torch.Tensor:
        """v^T H v of the whole for every column v of V (P, m): m numbers summed over the ranks."""
        V = V.to(device=self.device, dtype=self.dtype)
        forms = self._summed(lambda: self.local.quadratic_forms(V), (V.shape[1],))
        self.hvps += V.shape[1]
        return forms

    def local_quadratic_form(self, v: torch.Tensor) -> torch.Tensor:
        """(c_r / total) v^T A_r v, this rank's part of v^T A v (summed by the caller, many at once)."""
        if self.local is None:
            return torch.zeros((), dtype=self.dtype, device=self.device)
        with self.statistics():
            return self.weight * self.local.quadratic_forms(v[:, None])[0]

    def gradient_quadratic_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(g^T H g, |g|^2) of the whole, g its gradient (one product)."""
        g = self.gradient()
        self.hvps += 1
        return all_reduce_sum(self.local_quadratic_form(g).reshape(1))[0], g @ g


def operator(operator_class, model, loss_fn, X, Y, **options):
    """``operator_class(model, loss_fn, X, Y, **options)``, or its :class:`ShardedOperator` when X is :class:`Rows`."""
    if isinstance(X, Rows):
        return ShardedOperator(operator_class, model, loss_fn, X, Y, **options)
    return operator_class(model, loss_fn, X, Y, **options)


def flat_grad(model, loss_fn, X, Y, **options) -> torch.Tensor:
    """grad L as a flat vector (:func:`utils.hvp.flat_grad`), summed over the ranks for :class:`Rows`."""
    if not isinstance(X, Rows):
        return local_flat_grad(model, loss_fn, X, Y, **options)
    return ShardedOperator(_GradientOnly, model, loss_fn, X, Y, **options).gradient()


class _GradientOnly:
    """The gradient of the mean loss on some rows, as an operator that has only ``gradient``."""

    def __init__(self, model, loss_fn, X, Y, **options):
        self.model, self.loss_fn, self.X, self.Y, self.options = model, loss_fn, X, Y, options

    def gradient(self) -> torch.Tensor:
        if not couples_rows(self.model, self.options.get("train_mode", True)):
            return local_flat_grad(self.model, self.loss_fn, self.X, self.Y, **self.options)
        # One pass over the rows, which every rank takes, even with none of them.
        params, X, Y = params_and_data(self.model, self.X, self.Y)
        loss = self.loss_fn(forward(self.model, X, self.options.get("train_mode", True)), Y)
        return flatten(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))


def same_batch_route(model, loss_fn, X, Y, batch_size, *, train_mode=True, exact=False) -> batch_forms.Route:
    """:func:`utils.batch_forms.same_batch_route`; for :class:`Rows`, the batches of a call are
    split over the ranks: their rows are gathered (each rank adds the rows it holds, in groups of
    at most ``_ROWS_PER_GATHER``), rank r computes every K-th batch from the r-th by the route one
    process takes, and the per-batch forms are gathered back in the order drawn. Each batch's
    forms are those of one process on the same rows."""
    if not isinstance(X, Rows):
        return batch_forms.same_batch_route(model, loss_fn, X, Y, batch_size, train_mode=train_mode, exact=exact)
    # Blocks sized as the single process's route sizes them, so that as many batches are computed
    # (and counted in ``_hvps``) as there.
    single = batch_forms.same_batch_route(model, loss_fn, X.local, Y.local, batch_size, train_mode=train_mode,
                                          exact=exact)
    world = distributed.current()

    def forms(idx):
        quadratic = torch.zeros(idx.shape[0], dtype=torch.float64, device=X.device)
        norm2 = torch.zeros_like(quadratic)
        group = max(1, min(single.per_call, _ROWS_PER_GATHER // idx.shape[1]))
        for start in range(0, idx.shape[0], group):
            batches = idx[start:start + group]
            xs, ys = gather_rows(X, batches.reshape(-1)), gather_rows(Y, batches.reshape(-1))
            # Fewer batches than ranks leave the last ranks none.
            mine = torch.arange(world.rank, max(world.rank, batches.shape[0]), world.size, device=X.device)
            if mine.numel():
                route = batch_forms.same_batch_route(model, loss_fn, xs, ys, batch_size, train_mode=train_mode,
                                                     exact=exact)
                rows = mine[:, None] * idx.shape[1] + torch.arange(idx.shape[1], device=X.device)
                q, g2 = route.forms(rows)
                quadratic[start + mine], norm2[start + mine] = q.to(quadratic), g2.to(norm2)
        return all_reduce_sum(quadratic), all_reduce_sum(norm2)

    return batch_forms.Route(forms, per_call=single.per_call, min_block=single.min_block, ahead=single.ahead)


def gather_rows(X: Rows, idx: torch.Tensor) -> torch.Tensor:
    """The rows ``idx`` of the whole on every rank: each rank places the ones it holds, the rest
    zeros, and the sum over the ranks fills every row (each is held by exactly one rank)."""
    part = X[idx]
    whole = torch.zeros((idx.numel(), *X.local.shape[1:]), dtype=X.local.dtype, device=X.device)
    whole[part.positions.to(X.device)] = part.local
    return all_reduce_sum(whole)


def noise_route(model, loss_fn, X, Y, batch_size, *, chunk_size=None, train_mode=True, exact=False,
                min_samples: int, max_samples: int, block_size: int) -> batch_forms.NoiseRoute:
    """:func:`utils.batch_forms.noise_route`; for :class:`Rows`, g_B^T H g_B with g_B and H v
    each summed over the ranks (the batch gradients of a call in one collective), in blocks sized
    as the single process's route sizes them."""
    single = batch_forms.noise_route(model, loss_fn, local(X), local(Y), batch_size, chunk_size=chunk_size,
                                     train_mode=train_mode, exact=exact, min_samples=min_samples,
                                     max_samples=max_samples, block_size=block_size)
    if not isinstance(X, Rows):
        return single
    op = ShardedOperator(HessianOperator, model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode,
                         mode=PLAIN_HVP_MODE if exact else None)

    def forms(idx):
        return op.quadratic_forms(batch_gradients(model, loss_fn, X, Y, idx, train_mode=train_mode))

    def norm2():
        g = op.gradient()
        return (g @ g).item()

    return batch_forms.NoiseRoute(forms, per_call=single.per_call, min_block=single.min_block, ahead=single.ahead,
                                  norm2=norm2)


def batch_gradients(model, loss_fn, X: Rows, Y: Rows, idx: torch.Tensor, *, train_mode=True) -> torch.Tensor:
    """The gradients g_B of the batches of the index rows ``idx`` (K, b) as the columns of a (P, K)
    block on every rank: each rank computes its rows' part of each and the parts are summed in
    one collective. A batch of one row is that sample's gradient, computed by the rank that holds
    it: the per-sample gradients of the closed forms are gathered so."""
    parts = [ShardedOperator(_GradientOnly, model, loss_fn, X[rows], Y[rows], train_mode=train_mode) for rows in idx]
    return all_reduce_sum(torch.stack([part.local_gradient() for part in parts], dim=1))


def centred_forms(model, loss_fn, X, Y, *, chunk_size=None, train_mode=True, exact=False):
    """:func:`utils.batch_forms.centred_forms`; for :class:`Rows`, |g|^2, g^T H g and
    (g_B - g)^T H (g_B - g) with H, g and each g_B summed over the ranks
    (:func:`batch_gradients`), so every rank holds the same numbers."""
    if not isinstance(X, Rows):
        return batch_forms.centred_forms(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode,
                                         exact=exact)
    op = ShardedOperator(HessianOperator, model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode,
                         mode=PLAIN_HVP_MODE if exact else None)
    return batch_forms.OperatorCentredForms(
        op, lambda idx: batch_gradients(model, loss_fn, X, Y, idx, train_mode=train_mode))


def mean_loss_backward(model, loss_fn, xb: Rows, yb: Rows) -> torch.Tensor:
    """The mean loss of the global batch, its gradient left in every parameter's ``.grad``:
    each rank backpropagates (1/b) sum of its rows' losses, and the loss and the gradients
    are summed over the ranks in one collective. Train-mode BatchNorm takes the whole batch's
    statistics, and every rank runs the pass."""
    params = trainable_params(model)
    coupled = couples_rows(model, model.training)
    if xb.count or coupled:
        with whole_batch_statistics(model) if coupled else nullcontext():
            loss = share_of_mean(loss_fn, xb.total)(model(xb.local), yb.local)
        loss.backward()
        loss = loss.detach()
    else:
        loss = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([loss.reshape(1), *[g.reshape(-1) for g in grads]]))
    for p, piece in zip(params, flat[1:].split([p.numel() for p in params])):
        p.grad = piece.view_as(p).clone()
    return flat[0]


def mean_over_ranks(local_means: list[float], rows: Rows) -> list[float]:
    """Means over the whole from each rank's means over its rows (weighted by the rows held)."""
    values = torch.tensor([m * rows.count for m in local_means], dtype=torch.float64, device=rows.device)
    return [v / rows.total for v in all_reduce_sum(values).tolist()]

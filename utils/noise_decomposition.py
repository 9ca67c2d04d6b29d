"""GNI for every batch size from one estimate of tr(HS), the per-sample gradient noise seen by H.

With g_i the gradient of sample i, g their mean and S = (1/n) sum_i (g_i - g)(g_i - g)^T, a batch
B of b distinct points drawn uniformly has E[g_B] = g and Cov(g_B) = c_b S with
c_b = (n - b) / (b (n - 1)), hence exactly

    E_B[ g_B^T H g_B ] = g^T H g + c_b tr(H S),      GNI(b) = (g^T H g + c_b tr(H S)) / |g|^2.

:func:`gni_decomposition` estimates tr(HS) by Monte Carlo; :func:`utils.measures.gni_by_batch_size`
is the measurement built on it. The identity needs g_B = (1/b) sum_{i in B} g_i, which
train-mode BatchNorm breaks.

Closed forms. With the n per-sample gradients the same identities give the batch averages
exactly, with no batches drawn:

    tr(HS)       = (1/n) sum_i (g_i - g)^T H (g_i - g)               n + 1 Hessian products
    E_B|g_B|^2   = |g|^2 + c_b (1/n) sum_i |g_i - g|^2               n per-sample gradients

Where that costs less than the Monte Carlo estimate would need to meet its target (predicted
from its first ``min_samples`` batches, :meth:`utils.estimators.SamplesAhead.predicted_total`),
the measurements take it (:func:`closed_form_allowed` says where they may, and
:func:`samples_separable` checks that the model keeps its samples apart): the estimate then
has se = 0, n = 0 and ``exact`` set.

Under ``torchrun`` (data split over the ranks, :mod:`utils.sharded`) the same sums are summed
over the ranks: sum_i |g_i - g|^2 over each rank's rows, and tr(HS) with H v summed over the
ranks for each per-sample gradient, which the rank that holds the sample computes and every
rank receives (:func:`utils.sharded.batch_gradients`). The choice between the closed form and
sampling is made on all-reduced numbers, so every rank makes the same one.
"""

import math
import time
import weakref
from dataclasses import dataclass

import torch

from utils import batch_forms, distributed, sharded
from utils.estimators import GNI_REL_SE, MAX_SAMPLES, Estimate, SamplesAhead, draw_batches, mean_with_stopping
from utils.hvp import flat_grad
from utils.models import has_batchnorm


def noise_factor(n: int, b: int) -> float:
    """c_b = (n - b) / (b (n - 1)): Cov(g_B) = c_b S for b distinct points out of n."""
    return (n - b) / (b * (n - 1))


def closed_form_allowed(model, X, *, train_mode: bool, exact: bool) -> bool:
    """Whether the closed forms over per-sample gradients apply: not for ``exact``
    (``--exact-measurements``: the plain Monte Carlo path), and not where g_B is not the mean of
    per-sample gradients (BatchNorm in train mode normalises by the batch, dropout draws one
    mask per batch). Data split over the ranks of a launch (:mod:`utils.sharded`) take them too,
    with every sum over the samples summed over the ranks."""
    return not exact and not (train_mode and (has_batchnorm(model) or batch_forms.has_dropout(model)))


# Enough rows for a batch-level statistic of a user's model to differ from each row's own.
SEPARABILITY_PROBE_ROWS = 32
# samples_separable's answer per model, loss and mode: a property of the code, checked once.
_SEPARABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def closed_form_applies(model, loss_fn, X, Y, *, train_mode: bool, exact: bool) -> bool:
    """:func:`closed_form_allowed` and, once per model, loss and mode, :func:`samples_separable`."""
    if not closed_form_allowed(model, X, train_mode=train_mode, exact=exact):
        return False
    answers = _SEPARABLE.setdefault(model, {})
    key = (loss_fn, train_mode)
    if key not in answers:
        answers[key] = samples_separable(model, loss_fn, X, Y, train_mode=train_mode)
    return answers[key]


def samples_separable(model, loss_fn, X, Y, *, train_mode=True) -> bool:
    """Whether the gradient of a batch is the mean of its per-sample gradients, as the closed forms
    need: (1/m) sum_i g_i against g_B on the first m = min(n, 32) rows, equal to within 1e4 units of
    round-off of the data type (relative to the larger of |g_B| and the mean |g_i|). A model or loss
    that mixes the samples of a batch (its own batch normalisation, a branch on a batch statistic)
    fails it and is measured by sampling batches instead. Data split over the ranks of a launch
    gather those rows onto every rank, which all check the same rows and agree on the answer
    (one that fails anywhere fails everywhere), so that all take the same branch."""
    rows = torch.arange(min(X.shape[0], SEPARABILITY_PROBE_ROWS), device=X.device)
    if sharded.is_sharded(X):
        probe = _separable(model, loss_fn, sharded.gather_rows(X, rows), sharded.gather_rows(Y, rows), train_mode)
        return not distributed.any_rank(not probe, device=X.device)
    return _separable(model, loss_fn, X[rows], Y[rows], train_mode)


def _separable(model, loss_fn, X, Y, train_mode) -> bool:
    per_sample = torch.cat(list(batch_forms.per_sample_gradients(model, loss_fn, X, Y, train_mode=train_mode)))
    whole = flat_grad(model, loss_fn, X, Y, train_mode=train_mode).detach()
    scale = max(float(whole.norm()), float(per_sample.norm(dim=1).mean()))
    tolerance = 1e4 * torch.finfo(whole.dtype).eps
    return float((per_sample.mean(dim=0) - whole).norm()) <= tolerance * scale


def gradient_spread(model, loss_fn, X, Y, g: torch.Tensor, *, train_mode=True) -> float:
    """(1/n) sum_i |g_i - g|^2 over the per-sample gradients g_i of (X, Y), ``g`` their mean
    (:func:`utils.batch_forms.per_sample_gradients`, a block at a time); on data split over the
    ranks of a launch each rank sums over its rows and the sums are summed over the ranks."""
    total = torch.zeros((), dtype=torch.float64, device=g.device)
    for block in batch_forms.per_sample_gradients(model, loss_fn, sharded.local(X), sharded.local(Y),
                                                  train_mode=train_mode):
        total += (block - g).square().sum().double()
    return float(distributed.all_reduce_sum(total)) / X.shape[0]


def closed_form_cheaper(ahead: SamplesAhead, pilot: int, cost: int, per_sample: int = 1) -> bool:
    """Whether the closed form (``cost`` units) costs less than what the Monte Carlo estimate
    still needs after its first ``pilot`` samples (``per_sample`` units each), predicted from
    those samples."""
    remaining = ahead.predicted_total(pilot) - ahead.computed
    return remaining * per_sample > cost


@dataclass
class NoiseDecomposition:
    """The batch-size dependence of GNI through the per-sample gradient covariance S.

        GNI(b) = (g^T H g + c_b tr(H S)) / |g|^2,   c_b = (n - b) / (b (n - 1))

    ``grad_norm2`` = |g|^2 and ``gHg`` = g^T H g are exact; ``trace_HS`` is a Monte Carlo
    estimate with standard error ``trace_HS_se`` from ``samples`` random batches of size
    ``sample_batch``, each giving the unbiased (g_B - g)^T H (g_B - g) / c_{sample_batch}.
    """

    num_data: int
    sample_batch: int
    grad_norm2: float
    gHg: float
    trace_HS: float
    trace_HS_se: float
    samples: int
    hvps: int
    seconds: float
    capped: bool = False
    exact: bool = False

    def gni(self, batch_size: int) -> Estimate:
        """GNI at batch size b; its SE is c_b SE(tr(HS)) / |g|^2 (g^T H g and |g|^2 are exact)."""
        c = noise_factor(self.num_data, batch_size)
        value = (self.gHg + c * self.trace_HS) / self.grad_norm2
        return Estimate(value, c * self.trace_HS_se / self.grad_norm2, self.samples, self.hvps,
                        self.seconds, capped=self.capped, exact=self.exact)


def closed_form_decomposition(model, loss_fn, X, Y, *, chunk_size=None, train_mode=True, spent: int = 0,
                              started: float | None = None) -> NoiseDecomposition:
    """The decomposition with tr(HS) = (1/n) sum_i (g_i - g)^T H (g_i - g) computed exactly from
    the n per-sample gradients (n + 1 Hessian products, after ``spent`` already made since
    ``started``): se 0, no samples. Only where :func:`closed_form_allowed`."""
    started = time.perf_counter() if started is None else started
    forms = sharded.centred_forms(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode)
    return _closed_form(forms, X, spent, started)


def _closed_form(forms, X, spent: int, started: float) -> NoiseDecomposition:
    n = X.shape[0]
    trace = float(forms.centred(torch.arange(n, device=X.device)[:, None]).mean()) if n > 1 else 0.0
    return NoiseDecomposition(n, 1, forms.norm2, forms.gHg, trace, 0.0, 0, spent + n + 1,
                              time.perf_counter() - started, exact=True)


def gni_decomposition(model, loss_fn, X, Y, *, generator, sample_batch: int,
                      target_batch: int | None = None, chunk_size=None, min_samples=20,
                      max_samples=MAX_SAMPLES, rel_se=GNI_REL_SE, train_mode=True,
                      exact=False, closed_form=True) -> NoiseDecomposition:
    """Estimate tr(HS) once, giving GNI for every batch size (see :class:`NoiseDecomposition`).

    Random batches of ``sample_batch`` points (1 <= sample_batch < n) are drawn from
    ``generator`` until GNI at ``target_batch`` (default ``sample_batch``) has SE / |GNI| <
    ``rel_se`` (at least ``min_samples``, at most ``max_samples`` batches). The forms
    (g_B - g)^T H (g_B - g) come from :func:`utils.sharded.centred_forms` (``exact``: plain
    double backward), chunked by ``chunk_size``. Where the closed form over the n per-sample
    gradients costs fewer products than the estimate needs (at once when n + 1 <=
    ``min_samples``, else as predicted from the first ``min_samples`` batches) tr(HS) is exact
    (see the module docstring; not with ``exact`` or ``closed_form=False``).
    """
    start = time.perf_counter()
    n = X.shape[0]
    if not 1 <= sample_batch < n:
        raise ValueError(f"sample_batch must be in [1, n) = [1, {n}), got {sample_batch}")
    if train_mode and has_batchnorm(model):
        raise ValueError("the identity needs per-sample gradients; with BatchNorm in train mode "
                         "measure GNI per batch size with utils.measures.gni")
    target_batch = sample_batch if target_batch is None else target_batch
    forms = sharded.centred_forms(model, loss_fn, X, Y, chunk_size=chunk_size, train_mode=train_mode,
                                  exact=exact)
    c_sample, c_target = noise_factor(n, sample_batch), noise_factor(n, target_batch)
    closed = closed_form and closed_form_applies(model, loss_fn, X, Y, train_mode=train_mode, exact=exact)
    if closed and n + 1 <= min_samples:
        return _closed_form(forms, X, 0, start)

    def compute(m):
        return forms.centred(draw_batches(n, sample_batch, m, generator, X.device)) / c_sample

    def gni_samples_of(trace_samples):
        return (forms.gHg + c_target * trace_samples) / forms.norm2

    # The stored samples estimate tr(HS); the rule runs on GNI at the target batch size.
    ahead = SamplesAhead(compute, rel_se=rel_se, max_samples=max_samples, min_block=min_samples,
                         rule_samples=lambda columns: [gni_samples_of(columns[0])])

    if closed and closed_form_cheaper(ahead, min_samples, n + 1):
        return _closed_form(forms, X, ahead.computed, start)

    def gni_samples(m):
        return gni_samples_of(ahead(m))

    estimate = mean_with_stopping(gni_samples, min_samples=min_samples, max_samples=max_samples,
                                  rel_se=rel_se)
    used = ahead.columns[0][: estimate.n]
    return NoiseDecomposition(n, sample_batch, forms.norm2, forms.gHg, float(used.mean()),
                              float(used.std(ddof=1) / math.sqrt(len(used))), estimate.n,
                              ahead.computed + 1, time.perf_counter() - start, capped=estimate.capped)

"""Monte Carlo machinery for curvature measurements: seeded generators, batches, stopping rules.

Every random choice a measurement makes comes from :func:`measurement_generator`, a private
``torch.Generator`` seeded from (measure_seed, step): a measurement can be recomputed from a
checkpoint and never touches the training RNG or the global one.

The stopping rules draw i.i.d. samples until the standard error of exactly the estimator they
return is below ``rel_se`` times its magnitude (after at least ``min_samples``) or
``max_samples`` are used. Samples may be drawn in blocks (several batches through one Hessian
pass); the rule is still checked after every single sample and the estimate uses the samples
up to the first one where it fires, so the block size only changes how many samples are
wasted, never the estimate. :class:`SamplesAhead` sizes those blocks for routes that compute
many batches at once: from the samples so far it predicts how many the rule will use.
"""

import hashlib
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from utils.errors import UserError

# Default cap on the Monte Carlo samples of one estimate; an estimate that uses all of them
# stopped short of its standard-error target.
MAX_SAMPLES = 1000
# Default standard-error targets, relative to the estimate, of the gHg family.
BATCH_SHARPNESS_REL_SE = 0.005
GNI_REL_SE = 0.01


@dataclass
class Estimate:
    """One measured quantity, logged as columns <col>, <col>_se, <col>_n, <col>_hvps, <col>_seconds.

    ``se`` is the standard error of ``value`` (nan for deterministic quantities), ``n`` the number
    of Monte Carlo samples used, ``hvps`` the Hessian-vector products spent (wasted block
    samples included) and ``seconds`` the wall time. ``capped``: a Monte Carlo estimate that
    the sample cap stopped before its standard-error target was met. ``exact``: a quantity
    that could have been sampled, computed in closed form instead (se = 0, n = 0: no batches).
    """

    value: float
    se: float
    n: int
    hvps: int
    seconds: float
    capped: bool = False
    exact: bool = False

    def costing(self, hvps: int, seconds: float) -> "Estimate":
        """The same estimate with its cost replaced (a measurement's products and wall time)."""
        return replace(self, hvps=int(hvps), seconds=float(seconds))


def measurement_generator(measure_seed: int, step: int, device="cpu") -> torch.Generator:
    """A generator seeded by a 63-bit hash of (measure_seed, step), independent of any other RNG."""
    digest = hashlib.blake2b(f"eoss-measure:{int(measure_seed)}:{int(step)}".encode(),
                             digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") >> 1)
    return generator


def sample_batch_indices(n: int, b: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """b distinct indices drawn uniformly from range(n) (a uniformly random b-subset)."""
    if not 1 <= b <= n:
        raise UserError(f"batch size {b} must be between 1 and the number of samples {n}; "
                        f"pass a smaller batch size")
    return torch.randperm(n, generator=generator, device=generator.device)[:b].to(device)


def draw_batches(n: int, b: int, m: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """m batches (m, b) drawn one after another, exactly as a one-batch-at-a-time loop draws them."""
    return torch.stack([sample_batch_indices(n, b, generator, device) for _ in range(m)])


def draw_partitions(n: int, b: int, groups: int, per_group: int, generator: torch.Generator,
                    device="cpu") -> torch.Tensor:
    """``groups`` x ``per_group`` batches (groups * per_group, b): each group the first
    ``per_group`` * b entries of one random permutation of range(n), cut into disjoint batches.
    Every batch is marginally a uniformly random b-subset (so a group's mean is unbiased) and the
    groups are independent (so an SE over group means is honest)."""
    if not 1 <= b * per_group <= n:
        raise UserError(f"{per_group} disjoint batches of {b} need at least {b * per_group} samples, "
                        f"the data hold {n}; pass a smaller batch size")
    return draw_batches(n, b * per_group, groups, generator, device).reshape(groups * per_group, b)


def group_limits(min_samples: int, max_samples: int, per_group: int) -> dict:
    """The stopping rule's limits in groups of ``per_group`` batches, for limits given in batches:
    at least ceil(min_samples / per_group) groups (and 2), at most max_samples // per_group."""
    fewest = max(2, -(-min_samples // per_group))
    return {"min_samples": fewest, "max_samples": max(fewest, max_samples // per_group)}


def _check_rule(min_samples: int, max_samples: int, rel_se: float, block_size: int):
    if not 2 <= min_samples <= max_samples:
        raise UserError(f"need 2 <= min_samples <= max_samples, got min_samples={min_samples}, "
                        f"max_samples={max_samples}; fix the sample limits")
    if not rel_se >= 0:
        raise UserError(f"rel_se must be non-negative, got {rel_se}; pass e.g. 0.01")
    if block_size < 1:
        raise UserError(f"block_size must be positive, got {block_size}")


def _first_stop(values: np.ndarray, ses: np.ndarray, rel_se: float, first_k: int) -> int | None:
    """The smallest prefix length k >= first_k whose estimate satisfies the rule, else None.

    ``values[i]`` and ``ses[i]`` belong to the prefix of length ``first_k + i``; an exact
    estimate (se == 0) stops even at a zero value.
    """
    hits = np.nonzero((ses < rel_se * np.abs(values)) | (ses == 0))[0]
    return None if hits.size == 0 else first_k + int(hits[0])


def _prefix_moments(x: np.ndarray, y: np.ndarray, first_k: int):
    """Means, variances (ddof=1) and covariance of every prefix of length >= first_k.

    Shifted by the first sample so the one-pass sums do not cancel catastrophically.
    """
    k = np.arange(1, len(x) + 1, dtype=np.float64)[first_k - 1:]
    dx, dy = x - x[0], y - y[0]
    sx, sy = np.cumsum(dx)[first_k - 1:], np.cumsum(dy)[first_k - 1:]
    sxx, syy = np.cumsum(dx * dx)[first_k - 1:], np.cumsum(dy * dy)[first_k - 1:]
    sxy = np.cumsum(dx * dy)[first_k - 1:]
    mean_x, mean_y = x[0] + sx / k, y[0] + sy / k
    var_x = np.maximum(sxx - sx * sx / k, 0) / (k - 1)
    var_y = np.maximum(syy - sy * sy / k, 0) / (k - 1)
    cov = (sxy - sx * sy / k) / (k - 1)
    return k, mean_x, mean_y, var_x, var_y, cov


def _run_with_stopping(sample_fn, statistics, *, min_samples, max_samples, rel_se, block_size):
    """Draw blocks of samples until ``statistics`` (prefix -> values, ses) says stop.

    ``sample_fn(m)`` returns one or two arrays of m new samples; returns (value, se, n, capped),
    ``capped`` when the rule had not fired by ``max_samples``.
    """
    _check_rule(min_samples, max_samples, rel_se, block_size)
    columns, drawn, checked = None, 0, min_samples
    while True:
        m = min(max(block_size, min_samples - drawn), max_samples - drawn)
        new = sample_fn(m)
        new = [_as_float64(c) for c in (new if isinstance(new, tuple) else (new,))]
        if any(len(c) != m for c in new):
            raise ValueError(f"sample_fn({m}) returned {[len(c) for c in new]} samples")
        columns = new if columns is None else [np.concatenate([a, b]) for a, b in zip(columns, new)]
        drawn += m
        if drawn < min_samples:
            continue
        values, ses = statistics(*columns, first_k=checked)
        stop = _first_stop(values, ses, rel_se, checked)
        capped = stop is None and drawn == max_samples
        if capped:
            stop = max_samples
        if stop is not None:
            i = stop - checked
            return float(values[i]), float(ses[i]), stop, capped
        checked = drawn + 1


def _as_float64(samples) -> np.ndarray:
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().double().numpy()
    return np.asarray(samples, dtype=np.float64).reshape(-1)


def _mean_statistics(x, *, first_k):
    k, mean, _, var, _, _ = _prefix_moments(x, x, first_k)
    return mean, np.sqrt(var / k)


def _ratio_statistics(a, b, *, first_k):
    k, mean_a, mean_b, var_a, var_b, cov = _prefix_moments(a, b, first_k)
    ratio = mean_a / mean_b
    # Delta method: Var(a_bar / b_bar) ~ Var(a - R b) / (k b_bar^2).
    var_ratio = np.maximum(var_a - 2 * ratio * cov + ratio * ratio * var_b, 0) / (k * mean_b ** 2)
    return ratio, np.sqrt(var_ratio)


def mean_with_stopping(sample_fn, *, min_samples: int, max_samples: int, rel_se: float,
                       block_size: int = 1) -> Estimate:
    """Sample mean x_bar = (1/k) sum_i x_i with SE = std_ddof1(x) / sqrt(k).

    ``sample_fn(m)`` returns m new i.i.d. samples (array or tensor). k is the first count
    >= ``min_samples`` with SE < ``rel_se`` |x_bar| (or SE = 0), else ``max_samples``.
    ``hvps`` is left at 0 for the caller to fill in.
    """
    start = time.perf_counter()
    value, se, n, capped = _run_with_stopping(sample_fn, _mean_statistics, min_samples=min_samples,
                                              max_samples=max_samples, rel_se=rel_se, block_size=block_size)
    return Estimate(value, se, n, 0, time.perf_counter() - start, capped=capped)


def ratio_of_means_with_stopping(sample_fn, *, min_samples: int, max_samples: int, rel_se: float,
                                 block_size: int = 1) -> Estimate:
    """Ratio of means R = a_bar / b_bar of paired samples (a_i, b_i), delta-method SE.

    SE^2 = (s_a^2 - 2 R s_ab + R^2 s_b^2) / (k b_bar^2) with ddof=1 (co)variances.
    ``sample_fn(m)`` returns a pair (a, b) of m new samples each; stopping as in
    :func:`mean_with_stopping`, on this ratio's SE.
    """
    start = time.perf_counter()
    value, se, n, capped = _run_with_stopping(sample_fn, _ratio_statistics, min_samples=min_samples,
                                              max_samples=max_samples, rel_se=rel_se, block_size=block_size)
    return Estimate(value, se, n, 0, time.perf_counter() - start, capped=capped)


class SamplesAhead:
    """A ``sample_fn`` for the stopping rules that computes samples in large blocks.

    ``compute(m)`` draws the next m batches from the generator and returns their m samples (a
    tensor, or a pair of tensors for a ratio of means). The rule still sees the samples one by
    one in the order drawn, so the estimate is the one a one-batch-at-a-time loop gives; only
    the block sizes change. Each block is sized from the samples so far: half the way to the
    count k' at which the relative SE (~ 1/sqrt(k)) is predicted to pass ``rel_se``,

        k' = 1.1 k (relative SE after k / rel_se)^2,

    at least ``min_block`` and at most ``max_block`` (one call of a route that computes at most
    that many at once). The prediction is renewed from each block's samples, so an early, noisy
    one (its variance is estimated from few samples) does not commit to all it asks for, and few
    samples are computed and not used. ``predict=False`` computes only what the rule asks for, in
    blocks of at least ``min_block``. ``rule_samples`` maps the stored columns to the samples the
    rule sees when those differ (for the prediction only). ``computed`` counts every sample
    computed, used or not.
    """

    def __init__(self, compute, *, rel_se: float, max_samples: int, min_block: int,
                 predict: bool = True, rule_samples=None, max_block: int | None = None):
        self.compute, self.rel_se, self.max_samples = compute, rel_se, max_samples
        self.min_block = max(1, min_block)
        self.max_block = max_samples if max_block is None else max(self.min_block, max_block)
        self.predict = predict
        self.rule_samples = rule_samples or (lambda columns: columns)
        self.columns = None
        self.used = 0

    @property
    def computed(self) -> int:
        return 0 if self.columns is None else len(self.columns[0])

    def _next_block(self, wanted: int) -> int:
        k = self.computed
        block = max(wanted - k, self.min_block)
        if self.predict and k >= 2 and self.rel_se > 0:
            relative = _relative_se(self.rule_samples(self.columns))
            if np.isfinite(relative):
                remaining = math.ceil(1.1 * k * (relative / self.rel_se) ** 2) - k
                block = max(block, min(math.ceil(remaining / 2), self.max_block))
        return min(block, self.max_samples - k)

    def predicted_total(self, m: int) -> int:
        """Computes the first ``m`` samples (the rule still gets them later, in order) and predicts
        from them how many the rule will use: k (relative SE after k / rel_se)^2, at most
        ``max_samples``; ``max_samples`` when the SE cannot be judged yet."""
        self._compute_until(m)
        k = self.computed
        relative = _relative_se(self.rule_samples(self.columns)) if k >= 2 else math.inf
        if not np.isfinite(relative) or self.rel_se <= 0:
            return self.max_samples if relative != 0 else k
        return min(self.max_samples, max(k, math.ceil(k * (relative / self.rel_se) ** 2)))

    def _compute_until(self, wanted: int) -> None:
        while self.computed < wanted:
            new = self.compute(self._next_block(wanted))
            new = [_as_float64(c) for c in (new if isinstance(new, tuple) else (new,))]
            self.columns = new if self.columns is None else [
                np.concatenate([old, more]) for old, more in zip(self.columns, new)]

    def __call__(self, m: int):
        wanted = self.used + m
        self._compute_until(wanted)
        out = [c[self.used : wanted] for c in self.columns]
        self.used = wanted
        return out[0] if len(out) == 1 else tuple(out)


def _relative_se(columns) -> float:
    """SE / |estimate| of a sample mean (one column) or a ratio of means (two, delta method)."""
    k = len(columns[0])
    with np.errstate(all="ignore"):
        if len(columns) == 1:
            x = columns[0]
            return float(x.std(ddof=1) / math.sqrt(k) / abs(x.mean()))
        a, b = columns
        ratio = a.mean() / b.mean()
        return float((a - ratio * b).std(ddof=1) / math.sqrt(k) / abs(b.mean() * ratio))


def exact_estimate(value: float, hvps: int, seconds: float) -> Estimate:
    """An Estimate for a deterministic quantity: se = nan, n = 1."""
    return Estimate(float(value), math.nan, 1, int(hvps), float(seconds))

import math
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch

from curvature_reference import check_honest, delta_method, mean_reference, stopping_point
from utils.errors import UserError
from utils.estimators import (Estimate, SamplesAhead, draw_batches, exact_estimate, mean_with_stopping,
                              measurement_generator, ratio_of_means_with_stopping, sample_batch_indices)


def test_measurement_generator_is_a_deterministic_private_stream():
    state = torch.get_rng_state()
    a = torch.randn(5, generator=measurement_generator(7, 100))
    b = torch.randn(5, generator=measurement_generator(7, 100))
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.randn(5, generator=measurement_generator(7, 101)))
    assert not torch.equal(a, torch.randn(5, generator=measurement_generator(8, 100)))
    seed = measurement_generator(7, 100).initial_seed()
    assert 0 <= seed < 2 ** 63
    assert torch.equal(torch.get_rng_state(), state)


def test_batch_indices_are_uniform_subsets():
    n, b = 5, 2
    generator = measurement_generator(0, 0)
    counts = Counter()
    for _ in range(5000):
        idx = sample_batch_indices(n, b, generator, "cpu")
        assert idx.shape == (b,) and len(set(idx.tolist())) == b
        assert 0 <= idx.min() and idx.max() < n
        counts[tuple(sorted(idx.tolist()))] += 1
    # 10 subsets, 500 expected each, binomial std about 21.
    assert set(counts) == set(combinations(range(n), b))
    assert all(abs(c - 500) < 90 for c in counts.values())
    with pytest.raises(UserError):
        sample_batch_indices(3, 4, generator, "cpu")


def stream(values):
    """A sample_fn that hands out ``values`` in order."""
    position = 0

    def sample(m):
        nonlocal position
        position += m
        return torch.as_tensor(values[position - m:position])

    return sample


def test_mean_stops_at_the_first_sample_that_meets_the_rule_whatever_the_block():
    x = np.random.default_rng(0).normal(3.0, 1.0, size=2000)
    k = stopping_point(x, 20, 1000, 0.03)
    assert 20 < k < 1000
    for block_size in (1, 7, 64):
        est = mean_with_stopping(stream(x), min_samples=20, max_samples=1000, rel_se=0.03,
                                 block_size=block_size)
        assert est.n == k
        assert est.value == pytest.approx(x[:k].mean(), rel=1e-13)
        assert est.se == pytest.approx(x[:k].std(ddof=1) / math.sqrt(k), rel=1e-10)
        assert est.hvps == 0 and est.seconds >= 0


def test_mean_stops_at_max_samples_and_is_exact_for_constant_samples():
    x = np.random.default_rng(1).normal(0.0, 1.0, size=500)
    est = mean_with_stopping(stream(x), min_samples=10, max_samples=300, rel_se=1e-3, block_size=32)
    assert est.n == 300 and est.value == pytest.approx(x[:300].mean(), abs=1e-14)
    constant = mean_with_stopping(stream(np.full(50, 2.5)), min_samples=5, max_samples=50,
                                  rel_se=0.01)
    assert (constant.value, constant.se, constant.n) == (2.5, 0.0, 5)
    # An exact zero (se = 0 at value 0) stops too, although se < rel_se * |value| cannot hold.
    zero = mean_with_stopping(stream(np.zeros(50)), min_samples=5, max_samples=50, rel_se=0.01)
    assert (zero.value, zero.se, zero.n) == (0.0, 0.0, 5)


def test_ratio_value_se_and_stopping():
    rng = np.random.default_rng(2)
    b = rng.gamma(4.0, 1.0, size=3000)
    a = 2.0 * b + rng.normal(0, 1.0, size=3000)
    rel_se = 0.01
    for block_size in (1, 10):
        position = 0

        def sample(m):
            nonlocal position
            position += m
            return a[position - m:position], b[position - m:position]

        est = ratio_of_means_with_stopping(sample, min_samples=20, max_samples=3000,
                                           rel_se=rel_se, block_size=block_size)
        k = est.n
        R, se = delta_method(a[:k], b[:k])
        assert est.value == pytest.approx(R, rel=1e-13)
        assert est.se == pytest.approx(se, rel=1e-9)
        assert est.se < rel_se * est.value
        R_before, se_before = delta_method(a[:k - 1], b[:k - 1])  # the rule had not fired yet
        assert se_before >= rel_se * R_before


def test_ratio_standard_errors_are_honest():
    """Over many repeats the delta-method SE matches the spread and 95% intervals cover."""
    true_ratio = 2.0 / 4.0  # E[a] / E[b] with b ~ Gamma(4, 1), a = 0.5 b + noise
    rng = np.random.default_rng(3)

    def sample(m):
        b = rng.gamma(4.0, 1.0, size=m)
        return 0.5 * b + rng.normal(0.0, 1.0, size=m), b

    estimates = [ratio_of_means_with_stopping(sample, min_samples=30, max_samples=30, rel_se=0)
                 for _ in range(400)]
    check_honest([e.value for e in estimates], [e.se for e in estimates], true_ratio)


def test_mean_standard_errors_are_honest_under_the_stopping_rule():
    rng = np.random.default_rng(4)  # Gamma(4, 1): mean 4, skewness 1
    estimates = [mean_with_stopping(lambda m: rng.gamma(4.0, 1.0, size=m), min_samples=20,
                                    max_samples=5000, rel_se=0.02, block_size=100)
                 for _ in range(400)]
    assert all(200 < e.n < 5000 for e in estimates)
    check_honest([e.value for e in estimates], [e.se for e in estimates], 4.0)


def test_invalid_rules_are_user_errors():
    sample = stream(np.ones(10))
    with pytest.raises(UserError):
        mean_with_stopping(sample, min_samples=1, max_samples=5, rel_se=0.1)
    with pytest.raises(UserError):
        mean_with_stopping(sample, min_samples=6, max_samples=5, rel_se=0.1)
    with pytest.raises(UserError):
        mean_with_stopping(sample, min_samples=2, max_samples=5, rel_se=-1)


def test_exact_estimate():
    est = exact_estimate(3.5, hvps=12, seconds=0.25)
    assert isinstance(est, Estimate)
    assert (est.value, est.n, est.hvps, est.seconds) == (3.5, 1, 12, 0.25) and math.isnan(est.se)


def test_draw_batches_draws_as_a_one_batch_loop():
    loop = measurement_generator(0, 1)
    expected = torch.stack([sample_batch_indices(9, 4, loop) for _ in range(5)])
    assert torch.equal(draw_batches(9, 4, 5, measurement_generator(0, 1)), expected)


@pytest.mark.parametrize("predict, min_block, max_block", [(True, 1, None), (True, 50, None), (False, 1, None),
                                                          (False, 7, None), (True, 1, 12)])
def test_samples_ahead_change_the_blocks_not_the_estimate(predict, min_block, max_block):
    """The rule sees the samples one by one in the order computed, so the estimate is the brute-force
    one whatever the blocks; predicted blocks waste few samples (at most ``max_block`` at a time,
    the prediction renewed after each), unpredicted ones compute only what the rule asks for, in
    whole blocks of ``min_block``."""
    x = np.random.default_rng(5).normal(3.0, 1.0, size=2000)
    rel_se = 0.03
    value, se, k = mean_reference(x, 20, 1000, rel_se)
    assert 20 < k < 1000
    blocks = []

    def compute(m):
        blocks.append(m)
        done = sum(blocks[:-1])
        return torch.as_tensor(x[done : done + m])

    ahead = SamplesAhead(compute, rel_se=rel_se, max_samples=1000, min_block=min_block, predict=predict,
                         max_block=max_block)
    est = mean_with_stopping(ahead, min_samples=20, max_samples=1000, rel_se=rel_se)
    assert est.n == k
    assert est.value == pytest.approx(value, rel=1e-13) and est.se == pytest.approx(se, rel=1e-10)
    assert ahead.computed == sum(blocks) >= k
    if max_block is not None:
        assert blocks[0] == 20 and max(blocks[1:]) == max_block and ahead.computed - k < max_block
    elif predict:
        assert len(blocks) < 10 and ahead.computed < 1.5 * k + min_block
    else:
        assert blocks == [20] + [min_block] * (len(blocks) - 1) and ahead.computed - k < min_block


def test_samples_ahead_serve_pairs_and_stop_at_max_samples():
    rng = np.random.default_rng(6)
    b = rng.gamma(4.0, 1.0, size=300)
    a = 2.0 * b + rng.normal(0, 3.0, size=300)
    done = 0

    def compute(m):
        nonlocal done
        done += m
        return torch.as_tensor(a[done - m : done]), torch.as_tensor(b[done - m : done])

    ahead = SamplesAhead(compute, rel_se=1e-6, max_samples=300, min_block=20)
    est = ratio_of_means_with_stopping(ahead, min_samples=20, max_samples=300, rel_se=1e-6)
    R, se = delta_method(a, b)
    assert est.n == ahead.computed == 300
    assert est.value == pytest.approx(R, rel=1e-13) and est.se == pytest.approx(se, rel=1e-9)


def test_an_estimate_says_whether_the_cap_or_the_target_stopped_it():
    rng = np.random.default_rng(0)
    samples = rng.normal(10.0, 1.0, 200)

    def draw(m, drawn=[0]):
        out = samples[drawn[0]:drawn[0] + m]
        drawn[0] += m
        return out

    by_target = mean_with_stopping(lambda m: np.full(m, 3.0), min_samples=5, max_samples=50, rel_se=0.01)
    by_cap = mean_with_stopping(draw, min_samples=5, max_samples=50, rel_se=0.001)
    assert not by_target.capped and by_target.n == 5
    assert by_cap.capped and by_cap.n == 50 and by_cap.se > 0.001 * by_cap.value
    ratio = ratio_of_means_with_stopping(lambda m: (samples[:m], samples[:m] + 1), min_samples=5, max_samples=20,
                                         rel_se=0.0)
    assert ratio.capped and ratio.n == 20

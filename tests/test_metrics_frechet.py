"""Fréchet distance: parity with scipy.linalg.sqrtm, exact answers on ill-conditioned cases, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from fae.metrics.frechet import (
    FrechetError,
    GaussianStats,
    StatsAccumulator,
    compute_stats,
    frechet_distance,
    trace_sqrt_product,
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs single-threaded (see conftest.one_thread)."""



def scipy_fd(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_cov(rng: np.random.Generator, d: int, n: int) -> np.ndarray:
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3
    return np.cov(x, rowvar=False)


@pytest.mark.parametrize("d,n", [(8, 100), (64, 500), (160, 1000)])
def test_matches_scipy_sqrtm_on_random_data(d: int, n: int) -> None:
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_cov(rng, d, n), random_cov(rng, d, n)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = scipy_fd(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9)


@pytest.mark.filterwarnings("ignore:only .* samples")
def test_rank_deficient_covariances_match_scipy() -> None:
    # fewer samples than dimensions: singular covariances, the usual small-N FID situation
    rng = np.random.default_rng(1)
    d = 64
    a, b = rng.standard_normal((20, d)), rng.standard_normal((30, d)) + 0.2
    sa, sb = compute_stats(a), compute_stats(b)
    ours = frechet_distance(sa, sb)
    ref = scipy_fd(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert ours == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("cond_exp", [6, 12, 16])
def test_ill_conditioned_exact(cond_exp: int) -> None:
    # commuting covariances (same eigenvectors) have a closed form: tr sqrt(S1 S2) = sum sqrt(l1 * l2)
    rng = np.random.default_rng(cond_exp)
    d = 128
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    l1 = np.logspace(0, -cond_exp, d)
    l2 = rng.permutation(np.logspace(0.5, -cond_exp, d))
    s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    exact_trace = np.sqrt(l1 * l2).sum()
    ours = trace_sqrt_product(s1, s2)
    scipy_trace = float(np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2))))
    # sqrt of eigenvalues near 1e-24 amplifies float64 round-off to ~1e-8 absolute for any method
    assert abs(ours - exact_trace) < 1e-7
    assert abs(ours - exact_trace) <= 2 * abs(scipy_trace - exact_trace) + 1e-11  # as exact as sqrtm, or better
    mu = rng.standard_normal(d)
    exact_fd = l1.sum() + l2.sum() - 2 * exact_trace
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(exact_fd, abs=3e-7)


def test_identical_stats_give_zero_and_is_symmetric() -> None:
    rng = np.random.default_rng(0)
    s = compute_stats(rng.standard_normal((300, 32)))
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-9)
    t = compute_stats(rng.standard_normal((300, 32)) * 1.5 + 0.3)
    assert frechet_distance(s, t) == pytest.approx(frechet_distance(t, s), rel=1e-10)


def test_one_dimensional_closed_form() -> None:
    # FD of N(m1, v1) and N(m2, v2) = (m1-m2)^2 + (sqrt v1 - sqrt v2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == \
        pytest.approx(4.0 + 1.0)


def test_accumulator_matches_np_cov_across_batches() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1000, 16)) * 3 + 5
    acc = StatsAccumulator(16)
    for chunk in np.array_split(x, [7, 300, 301, 999]):
        acc.update(chunk)
    st = acc.stats()
    np.testing.assert_allclose(st.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert st.num_samples == 1000
    torch_stats = compute_stats(torch.from_numpy(x).float())
    np.testing.assert_allclose(torch_stats.sigma, np.cov(x.astype(np.float32), rowvar=False), rtol=1e-5)


def test_clear_errors_for_degenerate_inputs() -> None:
    good = np.eye(4)
    with pytest.raises(FrechetError, match="NaN"):
        frechet_distance(np.zeros(4), np.full((4, 4), np.nan), np.zeros(4), good)
    with pytest.raises(FrechetError, match="positive semi-definite"):
        frechet_distance(np.zeros(4), np.diag([1.0, 1.0, 1.0, -0.5]), np.zeros(4), good)
    with pytest.raises(FrechetError, match="not symmetric"):
        bad = np.eye(4)
        bad[0, 1] = 0.5
        frechet_distance(np.zeros(4), bad, np.zeros(4), good)
    with pytest.raises(FrechetError, match="feature sizes differ"):
        frechet_distance(np.zeros(4), good, np.zeros(3), np.eye(3))
    with pytest.raises(FrechetError, match="at least 2"):
        compute_stats(np.ones((1, 4)))
    with pytest.raises(FrechetError, match="shapes"):
        GaussianStats(np.zeros(3), np.eye(4))
    with pytest.raises(FrechetError, match="NaN"):
        compute_stats(np.array([[0.0, 1.0], [np.inf, 2.0], [1.0, 1.0]]))


def test_rank_deficient_warning() -> None:
    with pytest.warns(UserWarning, match="rank"):
        compute_stats(np.random.default_rng(0).standard_normal((5, 16)))


@pytest.mark.filterwarnings("ignore:only .* samples")
def test_all_routes_agree_low_rank_factor_cholesky_and_eigh() -> None:
    rng = np.random.default_rng(4)
    d = 48
    small_a = compute_stats(rng.standard_normal((10, d)))            # singular, keeps its low-rank factor
    small_b = compute_stats(rng.standard_normal((12, d)) * 2.0)
    full = compute_stats(rng.standard_normal((400, d)) + 0.1)         # positive definite: Cholesky
    assert small_a.factor is not None and small_a.factor.shape == (10, d) and full.factor is None
    np.testing.assert_allclose(small_a.factor.T @ small_a.factor, small_a.sigma, atol=1e-12)

    def plain(s: GaussianStats) -> GaussianStats:  # the same statistics without the factor
        return GaussianStats(s.mu, s.sigma, s.num_samples)

    for x, y in [(small_a, small_b), (small_a, full), (full, small_b), (full, full)]:
        expected = scipy_fd(x.mu, x.sigma, y.mu, y.sigma)
        for a, b in [(x, y), (plain(x), plain(y)), (plain(x), y), (y, x)]:
            assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7, abs=1e-9)

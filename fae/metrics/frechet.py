"""Fréchet distance between Gaussians fitted to feature sets (FID, sFID, FD-DINOv2, rFID).

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The trace term is computed through a symmetric eigenvalue problem instead of `scipy.linalg.sqrtm(S1 @ S2)`:
with S1 = L L^T (Cholesky, or the symmetric square root when S1 is singular), S1 S2 is similar to A = L^T S2 L,
which is symmetric positive semi-definite, so tr((S1 S2)^(1/2)) = sum(sqrt(eigvalsh(A))). Everything is float64;
there is no complex arithmetic to discard and no "add eps to the diagonal and retry" fallback (the ADM
evaluator's `sqrtm` failure mode). Covariances that are
not finite, not symmetric or clearly not positive semi-definite raise `FrechetError` with the reason.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


class FrechetError(ValueError):
    """Statistics that cannot give a meaningful Fréchet distance (NaN, wrong shape, not a covariance)."""


@dataclass
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64, plus the sample count (0 = unknown).

    `factor` (r, D), kept when the set had no more samples than dimensions, satisfies sigma = factor^T factor; it
    turns the Fréchet trace term into a small r x r problem (`trace_sqrt_product`).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int = 0
    factor: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.mu = np.atleast_1d(np.asarray(self.mu, dtype=np.float64))
        self.sigma = np.atleast_2d(np.asarray(self.sigma, dtype=np.float64))
        d = self.mu.shape[0]
        if self.mu.ndim != 1 or self.sigma.shape != (d, d):
            raise FrechetError(f"stats shapes do not fit: mu {self.mu.shape}, sigma {self.sigma.shape} "
                               f"(expected ({d},) and ({d}, {d}))")
        if self.factor is not None and (self.factor.ndim != 2 or self.factor.shape[1] != d):
            raise FrechetError(f"stats factor must be (r, {d}), got {self.factor.shape}")

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


class StatsAccumulator:
    """Streaming mean/covariance in float64 (sum and centred Gram matrix updated per batch, Chan et al.).

    Gives the same numbers as `np.cov(features, rowvar=False)` (unbiased, N-1) without holding all features.
    """

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros((dim, dim), dtype=np.float64)
        self.rows: list[np.ndarray] | None = []  # the features themselves while there are at most `dim` of them

    def update(self, batch: np.ndarray | torch.Tensor) -> None:
        x = _as_float64(batch)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise FrechetError(f"expected features of shape (N, {self.mean.shape[0]}), got {x.shape}")
        if not np.isfinite(x).all():
            raise FrechetError("features contain NaN or infinity; the feature network output is broken")
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(axis=0)
        xc = x - mb
        delta = mb - self.mean
        n = self.n + nb
        self.m2 += xc.T @ xc + np.outer(delta, delta) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n
        if self.rows is not None:
            self.rows = self.rows + [x.copy()] if n <= self.mean.shape[0] else None

    def merge(self, other: StatsAccumulator) -> None:
        """Fold in another accumulator's features (Chan et al.'s pairwise update; sharded evaluation)."""
        if other.n == 0:
            return
        n = self.n + other.n
        delta = other.mean - self.mean
        self.m2 += other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        self.mean += delta * (other.n / n)
        keep = self.rows is not None and other.rows is not None and n <= self.mean.shape[0]
        self.rows = self.rows + other.rows if keep else None  # type: ignore[operator]  # keep: both are lists
        self.n = n

    def stats(self) -> GaussianStats:
        if self.n < 2:
            raise FrechetError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        if self.n <= self.mean.shape[0]:
            warnings.warn(f"only {self.n} samples for {self.mean.shape[0]}-d features: the covariance is rank "
                          "deficient and the Fréchet distance is strongly biased; use more samples", stacklevel=2)
        factor = None
        if self.rows is not None:
            factor = (np.concatenate(self.rows) - self.mean) / np.sqrt(self.n - 1)
        return GaussianStats(self.mean.copy(), self.m2 / (self.n - 1), self.n, factor)


def compute_stats(features: np.ndarray | torch.Tensor, chunk: int = 4096) -> GaussianStats:
    """Mean and unbiased covariance of (N, D) features in float64, computed chunk-wise."""
    x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if x.ndim != 2:
        raise FrechetError(f"expected features of shape (N, D), got {x.shape}")
    acc = StatsAccumulator(x.shape[1])
    for i in range(0, x.shape[0], chunk):
        acc.update(x[i:i + chunk])
    return acc.stats()


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_covariance(sigma: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(sigma).all():
        raise FrechetError(f"{name} contains NaN or infinity (too few samples, or broken features)")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-6 * scale:
        raise FrechetError(f"{name} is not symmetric (max |S - S^T| = {asym:.3g}); it is not a covariance matrix")
    return 0.5 * (sigma + sigma.T)


def _negative_eigenvalue_tolerance(w: torch.Tensor) -> float:
    # eigh of a PSD matrix returns negatives of size ~ D * eps * |S| from round-off; far below that is not round-off
    top = max(float(w.max()), 0.0)
    return max(1e-10, 100 * w.shape[0] * float(np.finfo(np.float64).eps)) * max(top, 1e-300)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, factor1: np.ndarray | None = None,
                       factor2: np.ndarray | None = None) -> float:
    """tr((S1 S2)^(1/2)) for covariances S1, S2 (float64; exact for singular matrices too).

    With any F such that S1 = F^T F, S1 S2 has the nonzero eigenvalues of the symmetric PSD matrix F S2 F^T.
    F is, in order of preference: a given low-rank factor (r x D: an r x r problem, for sets with fewer samples
    than dimensions), the transposed Cholesky factor of S1 (or of S2, swapping roles; tr sqrt(S1 S2) =
    tr sqrt(S2 S1)), or the symmetric square root of S1 from `eigh` when both are singular. torch's LAPACK is
    used: several times faster than NumPy's for these sizes on CPU.
    """
    s1 = torch.from_numpy(_check_covariance(np.asarray(sigma1, dtype=np.float64), "sigma1"))
    s2 = torch.from_numpy(_check_covariance(np.asarray(sigma2, dtype=np.float64), "sigma2"))
    names = ("sigma1", "sigma2")
    if factor1 is None and factor2 is not None:
        s1, s2, factor1, names = s2, s1, factor2, names[::-1]
    if factor1 is not None:
        factor = torch.from_numpy(np.asarray(factor1, dtype=np.float64))
    else:
        lower, info = torch.linalg.cholesky_ex(s1)
        if int(info) != 0:
            lower2, info2 = torch.linalg.cholesky_ex(s2)
            if int(info2) == 0:
                s1, s2, lower, info, names = s2, s1, lower2, info2, names[::-1]
        if int(info) == 0:
            factor = lower.T
        else:  # both singular (or one indefinite: an error)
            w1, v1 = torch.linalg.eigh(s1)
            if float(w1.min()) < -_negative_eigenvalue_tolerance(w1):
                raise FrechetError(f"{names[0]} is not positive semi-definite (smallest eigenvalue "
                                   f"{float(w1.min()):.3g}, largest {float(w1.max()):.3g}); it is not a covariance")
            factor = (v1 * w1.clamp_min(0.0).sqrt()) @ v1.T            # S1^(1/2), symmetric
    inner = factor @ s2 @ factor.T
    w = torch.linalg.eigvalsh(0.5 * (inner + inner.T))
    if float(w.min()) < -_negative_eigenvalue_tolerance(w):
        raise FrechetError(f"{names[1]} is not positive semi-definite (S1 S2 has eigenvalue {float(w.min()):.3g}, "
                           f"largest {float(w.max()):.3g}); it is not a covariance matrix")
    return float(w.clamp_min(0.0).sqrt().sum())


def frechet_distance(mu1: np.ndarray | GaussianStats, sigma1: np.ndarray | GaussianStats,
                     mu2: np.ndarray | None = None, sigma2: np.ndarray | None = None) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Call as `frechet_distance(mu1, sigma1, mu2, sigma2)` or `frechet_distance(stats1, stats2)`.
    """
    if isinstance(mu1, GaussianStats) and isinstance(sigma1, GaussianStats):
        a, b = mu1, sigma1
    else:
        if mu2 is None or sigma2 is None:
            raise TypeError("frechet_distance takes (mu1, sigma1, mu2, sigma2) or (stats1, stats2)")
        a, b = GaussianStats(mu1, sigma1), GaussianStats(mu2, sigma2)  # type: ignore[arg-type]  # mu1, sigma1: arrays here
    if a.dim != b.dim:
        raise FrechetError(f"feature sizes differ: {a.dim} vs {b.dim} (were both sets made by the same network?)")
    if not (np.isfinite(a.mu).all() and np.isfinite(b.mu).all()):
        raise FrechetError("a mean vector contains NaN or infinity")
    diff = a.mu - b.mu
    tr_covmean = trace_sqrt_product(a.sigma, b.sigma, a.factor, b.factor)
    fd = float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)
    if not np.isfinite(fd):
        raise FrechetError("the Fréchet distance is not finite; check the feature statistics")
    # identical sets give ~ -1e-13 from round-off; a distance cannot be negative
    return max(fd, 0.0)

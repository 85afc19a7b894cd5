"""Inception Score and k-NN precision/recall, as the ADM evaluator computes them (in torch, chunked).

Inception Score: softmax of the Inception logits (pool @ W^T, no bias, all 1008 outputs), split into `splits`
contiguous parts; per part exp(mean_i KL(p(y|x_i) || p(y))); the mean (and std) over parts. ADM uses parts of
5000 images; for its 50k samples that is exactly our default of 10 parts (`split_size=5000` reproduces ADM for
any N).

Precision/recall (Kynkäänniemi et al. 2019, as in ADM's ManifoldEstimator): the manifold of a set is the union
of balls around its points, each with radius = distance to its k-th nearest neighbour in the same set (k=3, the
point itself not counted). precision = share of samples inside the reference manifold; recall = share of
reference points inside the sample manifold. Distances are squared Euclidean, computed in row/column chunks so
50k x 50k never materialises. ADM computes the distance blocks in float16 (falling back to float32); we use
float32 (or float64), so a handful of borderline points can flip relative to ADM.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10,
                    split_size: int | None = None) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` equal parts (or parts of `split_size`, as ADM)."""
    x = torch.as_tensor(logits).double()
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected logits of shape (N, classes), got {tuple(x.shape)}")
    n = x.shape[0]
    if split_size is not None:
        bounds = [(i, min(i + split_size, n)) for i in range(0, n, split_size)]
    else:
        if not 1 <= splits <= n:
            raise ValueError(f"cannot split {n} samples into {splits} parts")
        edges = [round(i * n / splits) for i in range(splits + 1)]
        bounds = list(itertools.pairwise(edges))
    log_p = torch.log_softmax(x, dim=1)
    scores = []
    for lo, hi in bounds:
        part = log_p[lo:hi]
        log_marginal = torch.logsumexp(part, dim=0) - math.log(hi - lo)   # log mean_i p(y|x_i)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (|a|^2 - 2ab + |b|^2, clamped at 0, as ADM's DistanceBlock)."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"expected features of shape (N, D), got {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype)


def manifold_radii(features: np.ndarray | torch.Tensor, k: int = 3, chunk: int = 4096,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour in the same set (itself excluded)."""
    x = _as_tensor(features, torch.device(device), dtype)
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} points to estimate a manifold, got {n}")
    radii = torch.empty(n, dtype=dtype, device=x.device)
    for i in range(0, n, chunk):
        rows = x[i:i + chunk]
        best = None  # running k+1 smallest distances per row (the first is the point itself, 0)
        for j in range(0, n, chunk):
            d = _sq_dists(rows, x[j:j + chunk])
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[i:i + chunk] = best[:, k]  # type: ignore[index]  # set: the inner loop runs at least once
    return radii


def precision_recall(reference: np.ndarray | torch.Tensor, samples: np.ndarray | torch.Tensor, k: int = 3,
                     chunk: int = 4096, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(precision, recall) of `samples` against `reference` features (N, D), ADM's k-NN manifold estimate."""
    dev = torch.device(device)
    ref, smp = _as_tensor(reference, dev, dtype), _as_tensor(samples, dev, dtype)
    if ref.shape[1] != smp.shape[1]:
        raise ValueError(f"feature sizes differ: reference {ref.shape[1]}, samples {smp.shape[1]}")
    r_ref = manifold_radii(ref, k, chunk, dev, dtype)
    r_smp = manifold_radii(smp, k, chunk, dev, dtype)
    sample_in_ref = torch.zeros(smp.shape[0], dtype=torch.bool, device=dev)   # -> precision
    ref_in_sample = torch.zeros(ref.shape[0], dtype=torch.bool, device=dev)   # -> recall
    for i in range(0, ref.shape[0], chunk):
        for j in range(0, smp.shape[0], chunk):
            d = _sq_dists(ref[i:i + chunk], smp[j:j + chunk])               # (ref rows, sample cols)
            sample_in_ref[j:j + chunk] |= (d <= r_ref[i:i + chunk, None]).any(dim=0)
            ref_in_sample[i:i + chunk] |= (d <= r_smp[None, j:j + chunk]).any(dim=1)
    return float(sample_in_ref.double().mean()), float(ref_in_sample.double().mean())

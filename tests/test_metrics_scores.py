"""Inception Score on constructed logits; k-NN precision/recall on constructed distributions, against a brute-force
re-implementation of the ADM evaluator's ManifoldEstimator semantics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fae.metrics.scores import inception_score, manifold_radii, precision_recall


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs single-threaded (see conftest.one_thread)."""


def adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """The ADM evaluator's formula, in NumPy."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_is_uniform_predictions_is_one() -> None:
    mean, std = inception_score(torch.zeros(100, 1008))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_is_confident_and_diverse_equals_class_count() -> None:
    classes = 10
    logits = torch.full((200, classes), -1e4)
    logits[torch.arange(200), torch.arange(200) % classes] = 0.0   # one-hot, classes evenly used in every split
    mean, _ = inception_score(logits, splits=10)
    assert mean == pytest.approx(classes, rel=1e-6)


def test_is_splits_are_contiguous_parts() -> None:
    # first half all class 0, second half all class 1: each of 2 parts has IS 1, the whole set has IS 2
    logits = torch.full((100, 2), -1e4)
    logits[:50, 0] = 0.0
    logits[50:, 1] = 0.0
    assert inception_score(logits, splits=2)[0] == pytest.approx(1.0)
    assert inception_score(logits, splits=1)[0] == pytest.approx(2.0)


def test_is_matches_adm_formula() -> None:
    logits = np.random.default_rng(0).standard_normal((230, 50)) * 3
    assert inception_score(logits, split_size=50)[0] == pytest.approx(adm_inception_score(logits, 50), rel=1e-10)
    assert inception_score(logits, splits=1)[0] == pytest.approx(adm_inception_score(logits, 230), rel=1e-10)
    with pytest.raises(ValueError, match="split"):
        inception_score(logits[:5], splits=10)


def brute_force_pr(ref: np.ndarray, smp: np.ndarray, k: int) -> tuple[float, float]:
    def d2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
    r_smp = np.sort(d2(smp, smp), axis=1)[:, k]
    d = d2(ref, smp)
    precision = (d <= r_ref[:, None]).any(0).mean()
    recall = (d <= r_smp[None, :]).any(1).mean()
    return float(precision), float(recall)


def test_identical_sets_have_full_precision_and_recall() -> None:
    x = np.random.default_rng(0).standard_normal((150, 16))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_disjoint_sets_have_zero_precision_and_recall() -> None:
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((120, 16))
    assert precision_recall(ref, rng.standard_normal((100, 16)) + 50.0) == (0.0, 0.0)


def test_subset_has_full_precision_and_partial_recall() -> None:
    # reference = two far-apart modes; samples = exactly the points of one mode (mode dropping)
    rng = np.random.default_rng(2)
    mode_a, mode_b = rng.standard_normal((100, 8)), rng.standard_normal((100, 8)) + 40.0
    precision, recall = precision_recall(np.concatenate([mode_a, mode_b]), mode_a)
    assert precision == 1.0 and recall == 0.5


def test_chunked_computation_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((97, 12)).astype(np.float32)
    smp = (rng.standard_normal((83, 12)) * 1.3 + 0.4).astype(np.float32)
    expected = brute_force_pr(ref.astype(np.float64), smp.astype(np.float64), k=3)
    assert precision_recall(ref, smp, k=3, chunk=4096) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(ref, smp, k=3, chunk=10) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(ref, smp, k=5, chunk=7, dtype=torch.float64) == pytest.approx(
        brute_force_pr(ref.astype(np.float64), smp.astype(np.float64), k=5), abs=1e-12)
    radii = manifold_radii(ref, k=3, chunk=13, dtype=torch.float64).numpy()
    d = ((ref[:, None].astype(np.float64) - ref[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(radii, np.sort(d, 1)[:, 3], rtol=1e-9, atol=1e-9)


def test_precision_recall_errors() -> None:
    with pytest.raises(ValueError, match="feature sizes"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(np.zeros((3, 3)), np.zeros((10, 3)))

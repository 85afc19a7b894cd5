"""PSNR and SSIM: closed-form values, parity with scikit-image's Wang et al. settings, monotonicity."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fae.metrics.recon import PairedAccumulator, psnr, ssim


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs single-threaded (see conftest.one_thread)."""


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def test_psnr_closed_form_and_uint8() -> None:
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1                    # MSE 0.01 -> 20 dB
    y[1] += 0.5                    # MSE 0.25 -> 6.02 dB
    p = psnr(x, y)
    assert p[0].item() == pytest.approx(20.0) and p[1].item() == pytest.approx(10 * math.log10(4))
    assert psnr(x, x)[0].item() == math.inf
    xu = (x * 255).to(torch.uint8)
    yu = torch.full_like(xu, 51)   # 51/255 = 0.2 -> MSE 0.04 -> 13.98 dB
    assert psnr(xu, yu)[0].item() == pytest.approx(10 * math.log10(25))


def test_ssim_identity_and_monotone_in_noise() -> None:
    x = smooth_images(2)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    values = [ssim(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.02, 0.1, 0.3)]
    assert values[0] > values[1] > values[2]
    with pytest.raises(ValueError, match="one shape"):
        ssim(x, x[:, :, :16])


@pytest.mark.parametrize("size", [11, 32, 45])
def test_ssim_matches_scikit_image(size: int) -> None:
    skimage_metrics = pytest.importorskip("skimage.metrics")
    x = smooth_images(3, size, seed=size)
    g = torch.Generator().manual_seed(size)
    y = (x + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ours = ssim(x, y)
    for i in range(3):
        ref = skimage_metrics.structural_similarity(
            x[i].permute(1, 2, 0).numpy().astype(np.float64), y[i].permute(1, 2, 0).numpy().astype(np.float64),
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2)
        assert ours[i].item() == pytest.approx(ref, abs=1e-9)
        ref_psnr = skimage_metrics.peak_signal_noise_ratio(x[i].numpy().astype(np.float64),
                                                           y[i].numpy().astype(np.float64), data_range=1.0)
        assert psnr(x[i:i + 1], y[i:i + 1]).item() == pytest.approx(ref_psnr, rel=1e-9)


def test_paired_accumulator_averages_over_batches() -> None:
    x = smooth_images(5)
    y = (x + 0.05).clamp(0, 1)
    acc = PairedAccumulator()
    acc.update(x[:2], y[:2])
    acc.update(x[2:], y[2:])
    acc.update(x[:1], x[:1])    # an identical pair: infinite PSNR, capped at 100 dB
    s = acc.summarize()
    assert s["num_pairs"] == 6 and s["identical_pairs"] == 1
    expected_psnr = (psnr(x, y).sum().item() + 100.0) / 6
    assert s["psnr"] == pytest.approx(expected_psnr)
    assert s["ssim"] == pytest.approx((ssim(x, y).sum().item() + 1.0) / 6)

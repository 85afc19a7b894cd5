"""Reconstruction metrics on paired images: PSNR, SSIM, and rFID.

* PSNR = 10 log10(data_range^2 / MSE) per image (data range 1.0 for [0,1] images), averaged over images.
  Identical images give +inf; `psnr` returns it as is, reports cap it (see `summarize`).
* SSIM as Wang et al. (2004) define it: 11x11 Gaussian window with sigma 1.5, K1=0.01, K2=0.03, statistics with
  Gaussian weights (population, not sample, covariance), the mean of the SSIM map over the "valid" region (no
  padding), per channel then averaged. This equals scikit-image's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
  channel_axis=...)`. Images smaller than 11 pixels use a window of their size.
* rFID: the Fréchet distance between the feature statistics of the originals and of the reconstructions,
  through any feature network (Inception for the paper's rFID), see `fae.metrics.evaluate.reconstruction_fid`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two image batches of one shape (B, C, H, W), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")

    def unit(t: torch.Tensor) -> torch.Tensor:
        return t.double() / 255.0 if t.dtype == torch.uint8 else t.double()
    return unit(x), unit(y)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, (B,). uint8 inputs are scaled to [0, 1] first."""
    x, y = _check_pair(x, y)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (B,), Gaussian-weighted (Wang et al. 2004); see the module docstring."""
    x, y = _check_pair(x, y)
    b, c, h, w = x.shape
    size = min(window, h, w)
    g = gaussian_window(size, sigma).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable would be faster; images here are small
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(2).mean(2).mean(1)


class PairedAccumulator:
    """Running PSNR/SSIM sums over batches of (original, reconstruction) pairs."""

    def __init__(self) -> None:
        self.n = 0
        self.psnr_sum = 0.0
        self.ssim_sum = 0.0
        self.identical = 0

    def update(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        p = psnr(originals, reconstructions)
        finite = torch.isfinite(p)
        self.identical += int((~finite).sum())
        # an identical pair has infinite PSNR; cap at 100 dB (MSE 1e-10) so the mean stays informative
        self.psnr_sum += float(torch.where(finite, p, torch.full_like(p, 100.0)).sum())
        self.ssim_sum += float(ssim(originals, reconstructions).sum())
        self.n += int(p.shape[0])

    def merge(self, other: PairedAccumulator) -> None:
        """Add another process's sums (sharded evaluation)."""
        self.n, self.identical = self.n + other.n, self.identical + other.identical
        self.psnr_sum, self.ssim_sum = self.psnr_sum + other.psnr_sum, self.ssim_sum + other.ssim_sum

    def summarize(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no image pairs were given")
        return {"psnr": self.psnr_sum / self.n, "ssim": self.ssim_sum / self.n, "num_pairs": self.n,
                "identical_pairs": self.identical}


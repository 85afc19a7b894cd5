"""Error floor of the feature decoder's output layer on LayerNorm-affine targets (issue 14, item 5).

The feature decoder ends in a weight-only RMSNorm: y = w * u / rms(u) for any hidden state u. Its targets are
the frozen encoder's final LayerNorm outputs x = gamma * n + beta. Without beta every token is representable
(u = n, w = gamma); with beta, rms(x / w) varies from token to token and some error is left whatever u is.

This script measures that floor on real features of Fashion-MNIST images: for every token the best hidden state
exactly (a projection onto an ellipsoid), for the shared w by gradient descent; it reports the smallest MSE a
weight-only RMSNorm output can reach, as a fraction of the features' variance. With a bias the floor is 0.
Encoders: the demo's shipped self-supervised DINOv2 (trained norms) and a random tiny DINOv2 with
gamma ~ N(1, 0.2), beta ~ N(0, 0.2) (the test fixture's norms).

    PYTHONPATH=. python benchmarks/feature_decoder_floor.py [--images 512] [--steps 200]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from fae.assets import asset
from fae.data import DataConfig, build_dataset
from fae.encoders import EncoderConfig, FrozenEncoder, save_tiny_encoder


def features(encoder_dir: Path, images: int, image_size: int) -> torch.Tensor:
    encoder = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(encoder_dir), precision="fp32"))
    data = build_dataset(DataConfig(kind="fashion_mnist", image_size=image_size, limit=images), "train")
    batch = torch.stack([data[i]["image"] for i in range(len(data))])
    return encoder(batch).flatten(0, 1)  # (tokens, D)


@torch.no_grad()
def closest_unit_rms(x: torch.Tensor, w: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Per token, the u with rms(u) = 1 that minimises ||w * u - x||^2 (the closest point of an ellipsoid):
    u_i = w_i x_i / (w_i^2 + lam), lam > -min(w^2) found by bisection so that mean(u^2) = 1."""
    w2 = w.pow(2)
    lo = torch.full((x.shape[0], 1), float(-w2.min()) + 1e-12, dtype=x.dtype)
    hi = (w * x).norm(dim=1, keepdim=True) / x.shape[1] ** 0.5 + 1e-6
    for _ in range(iters):
        lam = (lo + hi) / 2
        too_long = ((w * x / (w2 + lam)).pow(2).mean(1, keepdim=True) > 1).to(x.dtype)
        lo, hi = lo + too_long * (lam - lo), hi + (1 - too_long) * (lam - hi)
    return w * x / (w2 + (lo + hi) / 2)


def floor(x: torch.Tensor, steps: int) -> float:
    """The smallest mean((y - x)^2) of a weight-only RMSNorm output y = w * u / rms(u) on the tokens x, over every
    hidden state (exact per-token projection) and the shared weight w (Adam on log w; at the projection the error's
    gradient in w is its partial derivative, the envelope theorem)."""
    x = x.double()
    log_w = x.pow(2).mean(0).sqrt().log().requires_grad_(True)
    opt = torch.optim.Adam([log_w], lr=0.02)
    best = float("inf")
    for _ in range(steps):
        u = closest_unit_rms(x, log_w.detach().exp())
        err = (log_w.exp() * u - x).pow(2).mean()
        best = min(best, err.item())
        opt.zero_grad()
        err.backward()
        opt.step()
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        random_dir = save_tiny_encoder("dinov2", Path(tmp) / "random", hidden_size=128, num_layers=2, num_heads=4,
                                       patch_size=4, image_size=32)
        for name, folder in (("demo encoder (trained)", asset("demo-encoder")), ("random tiny DINOv2", random_dir)):
            x = features(folder, args.images, 32)
            var = float(x.var(0, unbiased=False).mean())
            no_bias = floor(x, args.steps)
            print(f"{name}: D={x.shape[1]}, tokens={x.shape[0]}, mean(x^2)={float(x.pow(2).mean()):.4f}, "
                  f"var(x)={var:.4f}, |mean token|^2/D={float(x.mean(0).pow(2).mean()):.4f}")
            print(f"  RMSNorm (weight only): floor MSE {no_bias:.3e} = {no_bias / var:.3%} of the variance")
            print("  RMSNorm + bias:        floor 0 (w = gamma, b = beta represents every LayerNorm output)")


if __name__ == "__main__":
    main()

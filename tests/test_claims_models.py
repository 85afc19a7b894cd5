"""Model details the docs state, checked against the formula written out here (docs/diffusion.md)."""
from __future__ import annotations

import math

import torch

from fae.models.dit import timestep_embedding


def test_time_embedding_feeds_1000_t_to_dit_sinusoids():
    t = torch.tensor([0.0, 0.013, 0.5, 1.0])
    dim = 16
    freqs = torch.tensor([10000.0 ** (-i / (dim // 2)) for i in range(dim // 2)])
    args = 1000.0 * t[:, None] * freqs[None]    # DiT's integer steps 0..1000 <-> t in [0, 1]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    torch.testing.assert_close(timestep_embedding(t, dim), expected, rtol=1e-5, atol=1e-5)
    assert math.isclose(float(timestep_embedding(t, dim)[1, dim // 2]), math.sin(13.0), rel_tol=1e-5)

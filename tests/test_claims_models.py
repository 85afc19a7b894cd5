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


def test_rope_rotates_each_pair_by_position_times_the_standard_frequency():
    from fae.nn import RoPE2D

    rope = RoPE2D(head_dim=8, grid=(3, 3))          # quarter = 2: pairs 0, 1 follow the row, pairs 2, 3 the column
    x = torch.zeros(1, 1, 9, 8)
    x[..., 1] = 1.0                                  # channel pair (1, 5): row frequency 10000^(-1/2)
    x[..., 3] = 1.0                                  # channel pair (3, 7): column frequency 10000^(-1/2)
    out = rope(x)[0, 0]
    token = 2 * 3 + 1                                # row 2, column 1
    torch.testing.assert_close(out[token, [1, 5]], torch.tensor([math.cos(0.02), math.sin(0.02)]))
    torch.testing.assert_close(out[token, [3, 7]], torch.tensor([math.cos(0.01), math.sin(0.01)]))
    q, k = torch.randn(1, 1, 9, 8), torch.randn(1, 1, 9, 8)
    moved = lambda t: t[:, :, [6, 7, 8, 0, 1, 2, 3, 4, 5]]  # noqa: E731 (the same content one row further down)
    # attention logits depend on relative positions only: rows 0->1 and 1->2 give the same q.k
    a = (rope(q)[0, 0, 0] * rope(k)[0, 0, 3]).sum()
    b = (rope(moved(q))[0, 0, 3] * rope(moved(k))[0, 0, 6]).sum()
    torch.testing.assert_close(a, b)

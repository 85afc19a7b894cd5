"""Model details the docs state, checked by behaviour or against the formula written out here (docs/diffusion.md,
docs/flow.md, docs/text-to-image.md)."""
from __future__ import annotations

import math

import pytest
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



# ---------------------------------------------------------------------------------------------------- STARFlow
# docs/flow.md: blocks alternate the token order (grid order, reversed, ...), each at its own grid positions;
# `cond_top_only` conditions only the deep (last) block; token i of T is guided at t = 1 - (i + 1) / T.
def _flow(**kw):
    """A tiny STARFlow whose blocks are far from the identity (its zero-initialised output layers hide everything)."""
    from fae.models.starflow import StarFlow, starflow_config

    base = dict(input_size=(2, 2), in_channels=2, num_classes=0, class_dropout=0.0)
    model = StarFlow(starflow_config("tiny", **{**base, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _token_dependence(fn, tokens: torch.Tensor) -> torch.Tensor:
    """(N, N): the largest |d out_i / d in_j| over channels, for fn mapping tokens (1, N, C) -> (1, N, C)."""
    jac = torch.autograd.functional.jacobian(fn, tokens)[0, :, :, 0]   # (N, C, N, C)
    return jac.abs().amax(dim=(1, 3))


def test_flow_blocks_alternate_the_token_order_and_the_stack_sees_every_token(one_thread):
    model = _flow(layers_per_block=(1, 1, 1))
    n = model.config.num_tokens
    tokens = torch.randn(1, n, model.config.token_dim)
    before = torch.ones(n, n, dtype=torch.bool).tril(-1)          # [i, j]: j comes before i in grid order
    for i, block in enumerate(model.blocks):
        dep = _token_dependence(lambda h, b=block: b(h, None)[0], tokens)
        reads, ignores = (before, before.T) if i % 2 == 0 else (before.T, before)   # odd blocks: reversed order
        assert dep[ignores].max() < 1e-6, f"block {i} reads tokens after the one it transforms, in its order: {dep}"
        assert dep[reads].min() > 1e-4 and dep.diagonal().min() > 1e-2, f"block {i}: {dep}"

    def stack(h: torch.Tensor) -> torch.Tensor:
        for block in model.blocks:
            h = block(h, None)[0]
        return h

    whole = _token_dependence(stack, tokens)    # one order alone would leave the stack triangular
    assert whole.min() > 1e-4, f"some output token does not see some input token: {whole}"
    z = model(model.unpatchify(tokens))[0]
    torch.testing.assert_close(model.patchify(z), stack(tokens))


def test_each_flow_block_places_every_token_at_its_own_grid_position(one_thread):
    """Learned position table (rope: false): the row of grid position g first enters where token g is predicted,
    in grid order and in a reversed block alike: it moves z_g and no token predicted before g in that block."""
    model = _flow(rope=False)
    n = model.config.num_tokens
    tokens = torch.randn(1, n, model.config.token_dim)
    for i, block in enumerate(model.blocks):
        with torch.no_grad():
            base, table = block(tokens, None)[0], block.pos_embed.clone()
            for g in range(n):
                block.pos_embed[g] += torch.randn(model.config.hidden_size)   # (a constant would be normed away)
                moved = (block(tokens, None)[0] - base).abs().amax(-1)[0]   # (N,)
                block.pos_embed.copy_(table)
                earlier = list(range(g + 1, n)) if block.reverse else list(range(g))
                assert moved[g] > 1e-3, f"block {i}: position row {g} does not reach token {g}"
                assert all(moved[j] < 1e-6 for j in earlier), f"block {i}: row {g} moves tokens {earlier}: {moved}"
    assert [b.reverse for b in model.blocks] == [False, True]


@pytest.mark.parametrize("top_only", [True, False])
def test_cond_top_only_conditions_the_deep_block_alone(top_only, one_thread):
    model = _flow(layers_per_block=(1, 1, 1), num_classes=3, cond_top_only=top_only)
    tokens = torch.randn(1, model.config.num_tokens, model.config.token_dim)
    with torch.no_grad():
        cond_a, cond_b = model.y_embedder(torch.tensor([0])), model.y_embedder(torch.tensor([2]))
        for i, block in enumerate(model.blocks):
            a, b = block(tokens, cond_a)[0], block(tokens, cond_b)[0]
            if top_only and i < len(model.blocks) - 1:
                assert torch.equal(a, b), f"block {i} of {len(model.blocks)} reads the class with cond_top_only"
            else:
                assert (a - b).abs().max() > 1e-3, f"block {i} ignores the class"


def test_flow_guidance_time_of_token_i_is_one_minus_i_plus_one_over_t(one_thread):
    """One block (grid order = generation order): a schedule that guides only at t = 0 guides the last token only."""
    model = _flow(layers_per_block=(1,), num_classes=3)
    z, y = torch.randn(2, 2, 2, 2), torch.tensor([0, 2])
    asked: list[float] = []

    def last_only(t: float) -> float:
        asked.append(t)
        return 3.0 if t == 0.0 else 1.0

    with torch.no_grad():
        conditional = model.patchify(model.inverse(z, y))
        guided = model.patchify(model.inverse(z, y, last_only))
    n = model.config.num_tokens
    assert sorted(set(asked)) == sorted(1.0 - (i + 1) / n for i in range(n))
    torch.testing.assert_close(guided[:, :-1], conditional[:, :-1], atol=1e-5, rtol=1e-5)
    assert (guided[:, -1] - conditional[:, -1]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------- MMDiT
# docs/text-to-image.md: two streams (text, image) meet in joint attention; image tokens get 2-D RoPE; adaLN-Zero is
# conditioned on c = embed(t) + embed(pooled text); every block but the last updates the text tokens it passes on.
def _mmdit():
    from fae.models.mmdit import MMDiT, TextCondition, mmdit_config

    model = MMDiT(mmdit_config("tiny", input_size=(4, 4), in_channels=4, text_dim=16, text_tokens=5)).eval()
    for m in model.modules():   # away from adaLN-Zero's zeros, so the output depends on every input
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.2)
    y = TextCondition(torch.randn(2, 5, 16), torch.arange(5)[None] < torch.tensor([[3], [5]]), torch.randn(2, 16))
    return model, torch.randn(2, 4, 4, 4), torch.rand(2), y


@torch.no_grad()
def test_mmdit_image_tokens_carry_their_grid_positions(one_thread):
    """Without positions the image stream would be permutation-equivariant: mirroring the latent would mirror the
    velocity. With 2-D RoPE it does not."""
    model, x, t, y = _mmdit()
    out, mirrored = model(x, t, y), model(x.flip(-1), t, y).flip(-1)
    assert (mirrored - out).abs().amax(dim=(1, 2, 3)).min() > 1e-2


@torch.no_grad()
def test_mmdit_pooled_text_conditions_the_output(one_thread):
    from fae.models.mmdit import TextCondition

    model, x, t, y = _mmdit()
    out = model(x, t, y)
    pooled = y.pooled.clone()
    pooled[0] += 1.0                      # the same token states, another pooled vector for sample 0
    moved = model(x, t, TextCondition(y.tokens, y.mask, pooled))
    assert (moved[0] - out[0]).abs().max() > 1e-2 and torch.allclose(moved[1], out[1], atol=1e-6)


@torch.no_grad()
def test_mmdit_text_stream_is_updated_by_every_block_but_the_last(one_thread):
    model, x, t, y = _mmdit()
    out = model(x, t, y)
    assert model.blocks[-1].text.pre_only and not hasattr(model.blocks[-1].text, "mlp")
    mlp = model.blocks[0].text.mlp       # its output reaches the image only through block 1's joint attention
    for p in mlp.parameters():
        p.add_(0.5 * torch.randn_like(p))
    assert (model(x, t, y) - out).abs().max() > 1e-2

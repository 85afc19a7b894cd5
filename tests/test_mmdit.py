"""MMDiT (fae/models/mmdit.py): shapes, paper parameter counts on meta, masking, null condition, caption dropout; the
image tokens' positions, the pooled text in the conditioning, the text stream updated by every block but the last."""
from __future__ import annotations

import pytest
import torch
from margins import within
from torch import nn

from fae.models.mmdit import MMDiT, TextCondition, mmdit_config
from fae.nn import count_parameters


def tiny_model(**kw) -> MMDiT:
    base = dict(input_size=(4, 4), in_channels=4, text_dim=16, text_tokens=5)
    base.update(kw)
    model = MMDiT(mmdit_config("tiny", **base)).eval()
    for m in model.modules():  # leave adaLN-Zero so the output depends on its inputs
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.2)
    return model


def text(batch: int, lengths: list[int], dim: int = 16, tokens: int = 5) -> TextCondition:
    mask = torch.arange(tokens)[None] < torch.tensor(lengths)[:, None]
    return TextCondition(torch.randn(batch, tokens, dim), mask, torch.randn(batch, dim))


def test_paper_counts_on_meta():
    """App. D: MMDiT 603.46M (1024 wide, 16 layers, 16 heads, MLP 4, 16x16x32, T5-XL) and the 384-px 2017.84M."""
    with torch.device("meta"):
        paper = MMDiT(mmdit_config("paper"))
        big = MMDiT(mmdit_config("paper-384"))
    n, n384 = count_parameters(paper), count_parameters(big)
    assert abs(n - 603.46e6) / 603.46e6 < 0.005 and n == 600_607_776
    assert abs(n384 - 2017.84e6) / 2017.84e6 < 0.005 and n384 == 2_027_549_248
    assert paper.blocks[0].image.head_dim == 64 and paper.blocks[0].image.mlp.fc1.out_features == 4096
    # only the last block's text stream is pre-only: its outputs would never be read
    assert [b.text.pre_only for b in paper.blocks] == [False] * 15 + [True]


def test_shapes_zero_init_and_null_default():
    model = MMDiT(mmdit_config("tiny", input_size=(4, 6), in_channels=3, text_dim=16, text_tokens=5))
    x = torch.randn(2, 3, 4, 6)
    out = model(x, torch.rand(2), text(2, [2, 5]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0   # adaLN-Zero: starts at zero
    with pytest.raises(ValueError, match="expected latents"):
        model(torch.randn(2, 3, 4, 4), 0.5)
    with pytest.raises(ValueError, match="text_dim"):
        model(x, 0.5, text(2, [2, 2], dim=8))


def test_text_conditions_the_output_and_padding_is_ignored():
    model = tiny_model()
    x, t = torch.randn(2, 4, 4, 4), torch.rand(2)
    y = text(2, [2, 3])
    out = model(x, t, y)
    padded = TextCondition(y.tokens.clone(), y.mask, y.pooled)
    padded.tokens[0, 2:] = 100.0      # states behind the mask may hold anything
    assert torch.allclose(model(x, t, padded), out, atol=1e-5)
    changed = TextCondition(y.tokens.clone(), y.mask, y.pooled)
    changed.tokens[0, 0] += 1.0       # a real token moves that sample only
    moved = model(x, t, changed)
    assert not torch.allclose(moved[0], out[0], atol=1e-4) and torch.allclose(moved[1], out[1], atol=1e-5)


def test_null_condition_is_the_stored_empty_prompt():
    model = tiny_model()
    null = text(1, [1])
    model.set_null(null)
    x, t = torch.randn(3, 4, 4, 4), torch.rand(3)
    explicit = TextCondition(null.tokens.expand(3, -1, -1), null.mask.expand(3, -1), null.pooled.expand(3, -1))
    assert torch.allclose(model(x, t, None), model(x, t, explicit), atol=1e-6)
    with pytest.raises(ValueError, match="null text states"):
        model.set_null(text(1, [1], tokens=4))


@pytest.mark.margin
def test_caption_dropout_rate():
    model = tiny_model(caption_dropout=0.3)
    model.set_null(TextCondition(torch.zeros(1, 5, 16), torch.zeros(1, 5, dtype=torch.bool), torch.zeros(1, 16)))
    n = 40000   # standard error 0.0023: the bounds are 13 of them away
    y = TextCondition(torch.ones(n, 5, 16), torch.ones(n, 5, dtype=torch.bool), torch.ones(n, 16))
    dropped = model.drop_captions(y, torch.Generator().manual_seed(0))
    rows = dropped.pooled[:, 0] == 0
    within("caption drop rate (0.3)", rows.float().mean(), lo=0.27, hi=0.33)
    # a dropped row is the null in all three parts, a kept one untouched in all three
    assert torch.equal(rows, ~dropped.mask.any(1)) and torch.equal(rows, dropped.tokens.sum((1, 2)) == 0)


@pytest.mark.margin
def test_overfits_two_captions(one_thread):
    """Two prompts, two fixed latents (+1 and -1 everywhere): the velocity model learns which latent goes with which
    caption. At t = 1 from the origin -v points at the caption's latent; half the difference of the two captions'
    -v is 1 when learnt exactly (measured 1.15-1.38 over five seeds; the common part overshoots by up to 0.45, so
    the caption's effect is what is bounded; docs/testing.md)."""
    torch.manual_seed(0)
    model = MMDiT(mmdit_config("tiny", input_size=(2, 2), in_channels=2, text_dim=8, text_tokens=3,
                               caption_dropout=0.0))
    x0 = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]] * 2, [[[-1.0, -1.0], [-1.0, -1.0]]] * 2])
    y = TextCondition(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 8))
    pick = torch.arange(2).repeat(16)           # 16 draws of each caption per step: a smooth descent
    batch = TextCondition(y.tokens[pick], y.mask[pick], y.pooled[pick])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        t = torch.rand(len(pick))
        eps = torch.randn_like(x0[pick])
        xt = (1 - t.view(-1, 1, 1, 1)) * x0[pick] + t.view(-1, 1, 1, 1) * eps
        loss = (model(xt, t, batch) - (eps - x0[pick])).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        v = model(torch.zeros(2, 2, 2, 2), torch.ones(2), y)
    assert (-v[0]).mean() > 0 > (-v[1]).mean()
    within("half the difference of the two captions' -v (1 if exact)", ((-v[0]).mean() - (-v[1]).mean()) / 2, lo=0.4)


def test_paper_config_builds_the_paper_size():
    from fae.config import PACKAGED_CONFIGS
    from fae.stages import load_stage_config

    for config, size in (("mmdit_cc12m.yaml", "paper"), ("mmdit_cc12m_384.yaml", "paper-384")):
        name, cfg = load_stage_config(PACKAGED_CONFIGS / "paper" / config)
        assert name == "mmdit" and cfg.model == mmdit_config(size), config
        assert (cfg.transport.time_shift, cfg.optim.lr, cfg.optim.schedule, cfg.train.batch_size) == (
            0.4, 1e-4, "constant", 512)
        assert cfg.hflip is False   # STARFlow's T2I data setting (no_flip: 1): a caption's left/right and text hold


# ---------------------------------------------------------------------------------------------------- streams
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

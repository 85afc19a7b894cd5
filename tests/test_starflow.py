"""STARFlow model (fae/models/starflow.py): exact inverse, log-determinant, KV cache, guidance, denoising, paper size;
the blocks' alternating token order and grid positions, `cond_top_only`, the guidance time of each token."""
from __future__ import annotations

import math

import pytest
import torch
from margins import within

from fae.generators import FlowGenerator
from fae.models.starflow import StarFlow, StarFlowConfig, guided_affine, starflow_config
from fae.nn import count_parameters
from fae.transport import SamplerConfig


def perturbed(**kw) -> StarFlow:
    """A tiny flow whose blocks are far from the identity (zero-initialised outputs would hide every bug)."""
    base = dict(input_size=(4, 4), in_channels=3, num_classes=5, class_dropout=0.1)
    base.update(kw)
    model = StarFlow(starflow_config("tiny", **base))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # larger: z reaches ~100, ill-conditioned
    return model.eval()


@pytest.mark.parametrize("kw", [dict(), dict(patch_size=2, rope=False, scale_fn="exp", soft_clip=2.0),
                                dict(cond_top_only=True, mlp="swiglu", norm="rmsnorm")])
def test_forward_then_inverse_returns_the_input(kw, one_thread):
    model = perturbed(**kw)
    x, y = torch.randn(3, 3, 4, 4), torch.tensor([0, 2, 4])
    with torch.no_grad():
        z, logdet = model(x, y)
        assert not torch.allclose(z, x, atol=1e-2) and logdet.abs().min() > 1e-3  # the flow does something
        assert (model.inverse(z, y) - x).abs().max() <= 1e-4
        assert (model.inverse(z, y, kv_cache=False) - x).abs().max() <= 1e-4


def test_logdet_equals_the_brute_force_jacobian(one_thread):
    model = perturbed(input_size=(2, 2), in_channels=2)
    x, y = torch.randn(1, 2, 2, 2), torch.tensor([3])
    jac = torch.autograd.functional.jacobian(lambda v: model(v.view(1, 2, 2, 2), y)[0].flatten(), x.flatten())
    sign, brute = torch.linalg.slogdet(jac.double())
    _, logdet = model(x, y)
    assert sign > 0
    assert abs(logdet.item() - brute.item()) < 1e-4 * max(1.0, abs(brute.item()))


def test_kv_cached_inverse_equals_uncached_with_and_without_guidance(one_thread):
    model = perturbed(input_size=(3, 4))
    z, y = torch.randn(2, 3, 3, 4), torch.tensor([1, 3])
    ramp = lambda t: 1.0 + 3.0 * (1.0 - t)  # noqa: E731 (guidance that changes from token to token)
    with torch.no_grad():
        for scale_at in (None, ramp):
            cached = model.inverse(z, y, scale_at, kv_cache=True)
            uncached = model.inverse(z, y, scale_at, kv_cache=False)
            torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)


def test_guidance_at_scale_one_is_the_conditional_model(one_thread):
    a_c, a_u = torch.rand(4, 3) + 0.5, torch.rand(4, 3) + 0.5
    b_c, b_u = torch.randn(4, 3), torch.randn(4, 3)
    a, b = guided_affine(a_c, b_c, a_u, b_u, 1.0)
    assert torch.equal(a, a_c) and torch.equal(b, b_c)
    a2, b2 = guided_affine(a_c, b_c, a_u, b_u, 3.0)   # s = 3 moves the mean away from the unconditional one
    assert ((b2 - b_u).abs() >= (b_c - b_u).abs() - 1e-6).all() and (a2 <= a_c + 1e-6).all()
    model = perturbed()
    z, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 4])
    with torch.no_grad():
        conditional = model.inverse(z, y)
        # a scale that differs from 1 in the last bit forces the batched conditional/unconditional path
        batched = model.inverse(z, y, lambda t: 1.0 + 1e-12)
        guided = model.inverse(z, y, lambda t: 3.0)
    torch.testing.assert_close(batched, conditional, atol=1e-5, rtol=1e-5)
    assert (guided - conditional).abs().max() > 1e-2


def test_identity_flow_likelihood_and_denoising_step():
    """At initialisation every block is the identity: z = x, log p = log N(x; 0, I), grad log p = -x."""
    model = StarFlow(starflow_config("tiny", input_size=(2, 2), in_channels=2, num_classes=0)).eval()
    x = torch.randn(3, 2, 2, 2)
    expected = (0.5 * x.pow(2).flatten(1).sum(1) + 4 * math.log(2 * math.pi)) / (8 * math.log(2))
    torch.testing.assert_close(model.bits_per_dim(x), expected)
    torch.testing.assert_close(model.denoise(x, None, 0.3), x * (1 - 0.09))


@pytest.mark.margin
def test_label_dropout_and_null_class():
    model = perturbed(class_dropout=0.5)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x, None)[0], model(x, torch.full((2,), 5))[0])   # None = null class
        assert not torch.allclose(model(x, torch.tensor([0, 1]))[0], model(x, torch.tensor([2, 1]))[0])
    model.train()
    emb = model.y_embedder(torch.zeros(40000, dtype=torch.long), torch.Generator().manual_seed(0))  # s.e. 0.0025
    dropped = (emb == model.y_embedder.table.weight[5]).all(1).float().mean().item()
    within("|label drop rate - 0.5|", abs(dropped - 0.5), hi=0.03)
    # labels are checked where they enter (fae.data.labels), not in the forward (a host sync per call)
    gen = FlowGenerator(model, {"latent_stats": {"mean": [0.0] * 3, "std": [1.0] * 3}, "flow": {"noise_std": 0.0}},
                        "test")
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 5\] \(5 = the null class\); got \[6\]"):
        gen.sample(torch.randn(2, 3, 4, 4), torch.tensor([0, 6]), SamplerConfig())
    with pytest.raises(ValueError, match="expected latents"):
        model(torch.randn(2, 4, 4, 4))


def test_paper_default_is_1_4b_on_fae_latents():
    """ml-starflow's 1.4B layout (6 blocks, width 2048, layers 2-2-2-2-2-18, heads of 64) on 16x16x32, patch 1."""
    with torch.device("meta"):
        model = StarFlow(starflow_config("1.4B", input_size=(16, 16), in_channels=32, num_classes=1000))
    n = count_parameters(model)
    assert abs(n - 1.4e9) / 1.4e9 < 0.02 and n == 1_413_298_752
    assert [len(b.layers) for b in model.blocks] == [2, 2, 2, 2, 2, 18]
    assert [b.reverse for b in model.blocks] == [False, True, False, True, False, True]
    assert model.blocks[-1].layers[0].num_heads == 32 and model.config.num_tokens == 256


def test_config_validation():
    with pytest.raises(ValueError, match="unknown STARFlow size"):
        starflow_config("huge")
    with pytest.raises(ValueError, match="divisible by patch_size"):
        StarFlowConfig(input_size=(5, 4), patch_size=2).validate()
    with pytest.raises(ValueError, match="layers_per_block"):
        StarFlowConfig(layers_per_block=(2, 0)).validate()


# ---------------------------------------------------------------------------------------------------- blocks
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

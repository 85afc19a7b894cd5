"""STARFlow model (fae/models/starflow.py): exact inverse, log-determinant, KV cache, guidance, denoising, paper size;
the blocks' alternating token order and grid positions, `cond_top_only`, the guidance time of each token; ml-starflow's
switches (seq_order, class prefix, RoPE by step, top_block_channels, guide_top, annealed guidance, attention
temperature, Jacobi sampling, the latent-norm regulariser's inputs), the guidance convention and old configs."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from margins import within

from fae.config import ConfigError
from fae.generators import FlowGenerator, load_generator
from fae.models.starflow import (
    FlowSampling,
    StarFlow,
    StarFlowConfig,
    guidance_scales,
    guided_affine,
    latent_norm,
    starflow_config,
)
from fae.nn import count_parameters
from fae.transport import GuidanceSchedule, SamplerConfig


def perturbed(**kw) -> StarFlow:
    """A tiny flow whose blocks are far from the identity (zero-initialised outputs would hide every bug)."""
    base = dict(input_size=(4, 4), in_channels=3, num_classes=5, class_dropout=0.1)
    base.update(kw)
    model = StarFlow(starflow_config("tiny", **base))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # larger: z reaches ~100, ill-conditioned
    return model.eval()


STARFLOW_SWITCHES = dict(seq_order="L2R", class_conditioning="prefix", rope_index="step", top_block_channels=48)


@pytest.mark.parametrize("kw", [dict(), dict(patch_size=2, rope=False, scale_fn="exp", soft_clip=2.0),
                                dict(cond_top_only=True, mlp="swiglu", norm="rmsnorm"), STARFLOW_SWITCHES,
                                dict(STARFLOW_SWITCHES, cond_top_only=True, rope=False, soft_clip=4.0)])
def test_forward_then_inverse_returns_the_input(kw, one_thread):
    model = perturbed(**kw)
    x, y = torch.randn(3, 3, 4, 4), torch.tensor([0, 2, 4])
    with torch.no_grad():
        z, logdet = model(x, y)
        assert not torch.allclose(z, x, atol=1e-2) and logdet.abs().min() > 1e-3  # the flow does something
        assert (model.inverse(z, y) - x).abs().max() <= 1e-4
        assert (model.inverse(z, y, kv_cache=False) - x).abs().max() <= 1e-4


@pytest.mark.parametrize("kw", [dict(), STARFLOW_SWITCHES])
def test_logdet_equals_the_brute_force_jacobian(kw, one_thread):
    model = perturbed(input_size=(2, 2), in_channels=2, **kw)
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


# ------------------------------------------------------------------------------------------ ml-starflow's switches
# docs/flow.md's switch table: each switch changes what it names, and the flow stays invertible (round trip and
# log-det above run with all of them on).
def test_seq_order_l2r_reverses_every_block_and_the_deep_block_reads_raster_order(one_thread):
    r2l, l2r = _flow(layers_per_block=(1, 1, 1, 1)), _flow(layers_per_block=(1, 1, 1, 1), seq_order="L2R")
    assert [b.reverse for b in r2l.blocks] == [False, True, False, True]     # ml-starflow's R2L = fae's earlier order
    assert [b.reverse for b in l2r.blocks] == [True, False, True, False]     # L2R: the deep (last) one in grid order
    n = l2r.config.num_tokens
    tokens = torch.randn(1, n, l2r.config.token_dim)
    dep = _token_dependence(lambda h: l2r.blocks[-1](h, None)[0], tokens)
    after = torch.ones(n, n, dtype=torch.bool).triu(1)                       # [i, j]: j after i in grid order
    assert dep[after].max() < 1e-6 and dep[after.T].min() > 1e-4


def test_rope_by_step_turns_a_reversed_blocks_grid_by_180_degrees(one_thread):
    """Same weights: the grid-order block is unchanged; the reversed one rotates step j by position j (STARFlow) where
    grid indexing rotates it by the grid position N-1-j of the token it predicts."""
    grid = _flow()
    step = StarFlow(replace(grid.config, rope_index="step")).eval()
    step.load_state_dict(grid.state_dict())
    n = grid.config.num_tokens
    assert torch.equal(grid.blocks[1].rope_positions, torch.arange(n).flip(0))
    assert torch.equal(step.blocks[1].rope_positions, torch.arange(n))
    tokens = torch.randn(2, n, grid.config.token_dim)
    with torch.no_grad():
        torch.testing.assert_close(step.blocks[0](tokens, None)[0], grid.blocks[0](tokens, None)[0])
        assert (step.blocks[1](tokens, None)[0] - grid.blocks[1](tokens, None)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("top_only", [True, False])
def test_class_prefix_token_conditions_each_conditioned_block_through_its_own_table(top_only, one_thread):
    model = perturbed(class_conditioning="prefix", cond_top_only=top_only, layers_per_block=(1, 1, 1))
    assert model.y_embedder is None
    assert [b.class_prefix is not None for b in model.blocks] == [not top_only, not top_only, True]
    tokens = torch.randn(1, model.config.num_tokens, model.config.token_dim)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            a, b = block(tokens, torch.tensor([0]))[0], block(tokens, torch.tensor([2]))[0]
            assert torch.equal(a, b) if top_only and i < 2 else (a - b).abs().max() > 1e-3, f"block {i}"
        x = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(model(x, None)[0], model(x, torch.full((2,), 5))[0])   # None = the null class
    # with cond_top_only, one table of (classes + 1) x width, as the added table it replaces: the same count
    add = StarFlow(replace(model.config, class_conditioning="add"))
    assert (count_parameters(model) == count_parameters(add)) == top_only
    model.train()   # label dropout, once per sample, to the null class
    ids = model._condition(torch.zeros(4000, dtype=torch.long), 4000, torch.device("cpu"),
                           torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {0, 5} and 0.08 < (ids == 5).float().mean().item() < 0.12


def test_top_block_channels_widens_the_deep_block_only(one_thread):
    model = perturbed(top_block_channels=64, cond_top_only=True)
    assert [b.proj_in.out_features for b in model.blocks] == [32, 64]
    assert model.blocks[-1].layers[0].num_heads == 4 and model.y_embedder.table.weight.shape == (6, 64)
    with pytest.raises(ValueError, match="top_block_channels needs cond_top_only"):
        starflow_config("tiny", top_block_channels=64, num_classes=5)
    with pytest.raises(ValueError, match="must divide top_block_channels"):
        starflow_config("tiny", top_block_channels=40, cond_top_only=True)


def test_block_inputs_feed_the_latent_norm_regulariser(one_thread):
    model = perturbed(layers_per_block=(1, 1, 1))
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])
    with torch.no_grad():
        z, logdet, inputs = model(x, y, with_inputs=True)
        h = model.patchify(x)
        assert len(inputs) == 3 and torch.equal(inputs[0], h)
        for block, seen in zip(model.blocks, inputs, strict=True):   # each input is the previous block's output
            torch.testing.assert_close(seen, h)
            h = block(h, model._condition(y, 2, x.device))[0]
        torch.testing.assert_close(model.patchify(z), h)
        torch.testing.assert_close(latent_norm(inputs), sum(t.pow(2).mean() for t in inputs))


def test_guide_top_guides_the_deep_block_alone(one_thread):
    model = perturbed(layers_per_block=(1, 1, 1))
    z, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 4])
    three = lambda t: 3.0  # noqa: E731
    with torch.no_grad():
        top = model.inverse(z, y, three, sampling=FlowSampling(guide_top=True))
        cond, null = model._condition(y, 2, z.device), model._condition(None, 2, z.device)
        h = model.blocks[-1].inverse(model.patchify(z), cond, null, three)     # the deep block guided, ...
        for block in reversed(model.blocks[:-1]):
            h = block.inverse(h, cond)                                          # ... the others conditional
        torch.testing.assert_close(top, model.unpatchify(h), atol=1e-5, rtol=1e-5)
        assert (model.inverse(z, y, three) - top).abs().max() > 1e-3


def test_annealed_guidance_ramps_s_minus_one_by_i_plus_one_over_t(one_thread):
    assert guidance_scales(4, lambda t: 3.0, annealed=True) == [1.5, 2.0, 2.5, 3.0]
    assert guidance_scales(4, lambda t: 1.0, annealed=True) is None
    model = perturbed()
    z, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 4])
    with torch.no_grad():   # token i sits at t = 1 - (i + 1) / T: the ramp is the schedule s(t) = 1 + 2 (1 - t)
        annealed = model.inverse(z, y, lambda t: 3.0, sampling=FlowSampling(annealed_guidance=True))
        ramp = model.inverse(z, y, lambda t: 1.0 + 2.0 * (1.0 - t))
    torch.testing.assert_close(annealed, ramp, atol=1e-5, rtol=1e-5)


def test_attention_temperature_one_is_the_plain_inverse(one_thread):
    model = perturbed()
    z, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 4])
    with torch.no_grad():
        plain = model.inverse(z, y)
        assert torch.equal(model.inverse(z, y, sampling=FlowSampling(attention_temperature=1.0)), plain)
        assert (model.inverse(z, y, sampling=FlowSampling(attention_temperature=0.5)) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [dict(), STARFLOW_SWITCHES])
def test_jacobi_sampling_equals_the_token_by_token_inverse(kw, one_thread):
    """With as many passes as a chunk has tokens, Jacobi iteration is exact: after pass k the first k tokens are."""
    model = perturbed(input_size=(3, 4), **kw)
    z, y = torch.randn(2, 3, 3, 4), torch.tensor([1, 3])
    n, blocks = model.config.num_tokens, len(model.blocks)
    with torch.no_grad():
        for scale_at in (None, lambda t: 1.0 + 3.0 * (1.0 - t)):
            reference = model.inverse(z, y, scale_at)
            for size in (0, 5):      # the whole sequence at once; chunks of 5, 5, 2 (keys and values of earlier ones)
                stats: dict[str, int] = {}
                exact = FlowSampling(jacobi=True, jacobi_block_size=size, jacobi_tolerance=0.0)
                out = model.inverse(z, y, scale_at, sampling=exact, stats=stats)
                torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
                assert stats["jacobi_passes"] == n * blocks
        stats = {}
        loose = model.inverse(z, y, sampling=FlowSampling(jacobi=True, jacobi_tolerance=1e-4), stats=stats)
        assert stats["jacobi_passes"] <= n * blocks and (loose - model.inverse(z, y)).abs().max() < 0.1


def test_guidance_convention_is_one_plus_starflows_cfg(one_thread):
    """ml-starflow combines the branches as (1 + w) log p_c - w log p_u (`logits_guided`, written out here from its
    formula): fae's scale s is 1 + w, so its cfg 2.5 is fae's 3.5, and `starflow:2.5` says so directly."""
    a_c, a_u = torch.rand(5, 3) + 0.5, torch.rand(5, 3) + 0.5
    b_c, b_u = torch.randn(5, 3), torch.randn(5, 3)
    for w in (0.0, 0.5, 2.5):
        ratio = (a_c / a_u).clip(max=1.0).square()
        sigma = a_c / (1 + w - w * ratio).sqrt()
        mu = ((1 + w) * b_c - w * ratio * b_u) / (1 + w - w * ratio)
        a, b = guided_affine(a_c, b_c, a_u, b_u, 1.0 + w)
        torch.testing.assert_close(a, sigma)
        torch.testing.assert_close(b, mu)
    assert GuidanceSchedule.parse("starflow:2.5").intervals == GuidanceSchedule.parse("3.5").intervals
    assert not GuidanceSchedule.parse("starflow:0").active      # ml-starflow's cfg 0 = no guidance
    with pytest.raises(ValueError, match="starflow: takes ml-starflow's cfg"):
        GuidanceSchedule.parse("starflow:x")
    gen = FlowGenerator(perturbed(), {"latent_stats": {"mean": [0.0] * 3, "std": [1.0] * 3},
                                      "flow": {"noise_std": 0.0}}, "test")
    noise, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 4])
    with torch.no_grad():
        starflow = gen.sample(noise, y, SamplerConfig(guidance=GuidanceSchedule.parse("starflow:2.5")))
        fae_scale = gen.sample(noise, y, SamplerConfig(guidance=GuidanceSchedule.parse("3.5")))
    assert torch.equal(starflow, fae_scale)


def test_old_configs_and_records_load_with_the_earlier_behaviour(tmp_path, one_thread):
    """A bundle saved before the switches (config.json without them, a record without `sampling`) loads and samples
    as before: the defaults are the earlier behaviour, and the weights' keys did not change."""
    model = perturbed()
    folder = model.save_pretrained(tmp_path / "flow", extra={"latent_stats": {"mean": [0.0] * 3, "std": [1.0] * 3},
                                                              "flow": {"noise_std": 0.0}})
    record = json.loads((folder / "config.json").read_text())
    new_keys = {"seq_order", "top_block_channels", "class_conditioning", "rope_index"}
    record["config"] = {k: v for k, v in record["config"].items() if k not in new_keys}
    (folder / "config.json").write_text(json.dumps(record))
    loaded = StarFlow.from_pretrained(folder).eval()
    assert (loaded.config.seq_order, loaded.config.class_conditioning, loaded.config.rope_index,
            loaded.config.top_block_channels) == ("R2L", "add", "grid", 0)
    assert [b.reverse for b in loaded.blocks] == [False, True]
    gen = load_generator(folder)
    assert gen.flow_sampling == FlowSampling()
    z, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded.inverse(z, y, lambda t: 2.0), model.inverse(z, y, lambda t: 2.0))
    with pytest.raises(ConfigError, match="flow sampling.jacobbi: unknown key"):
        gen.sampling_for(SamplerConfig(flow={"jacobbi": True}))
    assert gen.sampling_for(SamplerConfig(flow={"jacobi": True})).jacobi

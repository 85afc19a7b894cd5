"""LightningDiT / SiT model (fae/models/dit.py): shapes, presets, paper parameter count, conditioning, overfitting;
the time embedding and 2-D RoPE against their formulas; the time shift the DiT stage trains at."""
from __future__ import annotations

import math

import pytest
import torch
from margins import within
from recorder import TRAINED_SHIFT, Recorder
from recorder import tiny_dit as _dit

from fae.config import ConfigError
from fae.generators import DiTGenerator
from fae.models.dit import DiT, DiTConfig, dit_config, timestep_embedding
from fae.nn import count_parameters
from fae.stages.dit import Config, DiTStage
from fae.stages.generator import check_model_matches_cache
from fae.transport import GuidedVelocity, SamplerConfig, TransportConfig, flow_matching_loss, sample, shift_time


def tiny(**kw) -> DiTConfig:
    base = dict(input_size=(4, 4), in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    base.update(kw)
    return DiTConfig(**base)


@pytest.mark.parametrize("patch", [1, 2])
@pytest.mark.parametrize("preset", ["SiT", "LightningDiT"])
def test_forward_shapes_and_patchify_roundtrip(patch, preset):
    cfg = dit_config(f"{preset}-tiny/{patch}", input_size=(4, 6), in_channels=3, num_classes=5)
    model = DiT(cfg)
    x = torch.randn(2, 3, 4, 6)
    tokens = model.patchify(x)
    assert tokens.shape == (2, (4 // patch) * (6 // patch), patch * patch * 3)
    assert torch.equal(model.unpatchify(tokens), x)
    out = model(x, torch.rand(2), torch.tensor([0, 4]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0          # adaLN-Zero: the untrained model outputs zero
    assert (model.rope is not None) == (preset == "LightningDiT")


def test_paper_lightningdit_xl1_parameter_count():
    """App. D: LDM on 16x16x32 latents, hidden 1152, 28 layers, 16 heads of 72: 675.26M parameters."""
    with torch.device("meta"):
        model = DiT(dit_config("LightningDiT-XL/1", in_channels=32, input_size=(16, 16), num_classes=1000))
    n = count_parameters(model)
    assert abs(n - 675.26e6) / 675.26e6 < 0.005
    assert round(n / 1e6, 2) == 675.26               # exact wiring: SwiGLU 3072, RMSNorm weights, sin-cos table
    assert n - count_parameters(model, trainable_only=True) == 256 * 1152  # the fixed table is not trained
    blk = model.blocks[0]
    assert blk.mlp.w3.in_features == int(2 / 3 * 4 * 1152) and blk.attn.head_dim == 72
    with torch.device("meta"):
        sit = DiT(dit_config("SiT-XL/2", in_channels=4, input_size=(32, 32), num_classes=1000))
    # DiT-XL/2 is 675,129,632 with learned sigma (8 output channels); ours predicts v only (4 channels)
    assert count_parameters(sit) == 675_129_632 - (1152 * 16 + 16)


def test_dit_config_names_and_validation():
    cfg = dit_config("LightningDiT-B/2", in_channels=32)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (12, 768, 12, 2)
    assert cfg.mlp == "swiglu" and cfg.norm == "rmsnorm" and cfg.rope
    sit = dit_config("SiT-S/1")
    assert sit.mlp == "gelu" and sit.norm == "layernorm" and not sit.rope
    with pytest.raises(ValueError, match="unknown DiT name"):
        dit_config("DiT-XXL/1")
    with pytest.raises(ValueError, match="divisible by patch_size"):
        tiny(input_size=(5, 4), patch_size=2).validate()
    with pytest.raises(ValueError, match="head dim divisible by 4"):
        tiny(hidden_size=36, num_heads=6).validate()
    model = DiT(tiny())
    with pytest.raises(ValueError, match="expected latents"):
        model(torch.randn(1, 3, 4, 4), 0.5)
    # labels are checked where they enter (fae.data.labels), not in the forward (a host sync per call)
    gen = DiTGenerator(model, {"latent_stats": {"mean": [0.0] * 4, "std": [1.0] * 4}}, "test")
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 5\] \(5 = the null class\); got \[-1, 6\]"):
        gen.sample(torch.randn(3, 4, 4, 4), torch.tensor([6, -1, 2]), SamplerConfig(steps=1))
    assert gen.sample(torch.randn(2, 4, 4, 4), torch.tensor([5, 0]), SamplerConfig(steps=1)).shape == (2, 4, 4, 4)


def test_training_labels_are_checked_against_the_model_once():
    """The generator stages check the cache's labels when they start, naming the bad ones."""

    class Cache:
        channels, grid, num_classes, path = 4, (4, 4), 5, "cache"

        def labels(self) -> torch.Tensor:
            return torch.tensor([0, 4, 7, 2, 7])   # a cache whose manifest under-counts its classes

    check_model_matches_cache(tiny(num_classes=8), Cache())
    with pytest.raises(ConfigError, match=r"labels in the latent cache cache must lie in \[0, 5\]; got \[7\]"):
        check_model_matches_cache(tiny(num_classes=6), Cache())


def _perturbed(cfg: DiTConfig) -> DiT:
    model = DiT(cfg)
    with torch.no_grad():  # leave the zero init so the conditioning paths matter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.margin
def test_conditioning_label_dropout_and_null_class():
    model = _perturbed(tiny(class_dropout=0.5))
    x, t = torch.randn(3, 4, 4, 4), torch.rand(3)
    y = torch.tensor([0, 1, 2])
    assert not torch.allclose(model(x, t, y), model(x, t, torch.tensor([3, 1, 2])))   # class matters
    assert not torch.allclose(model(x, t, y), model(x, t * 0.5, y))                    # time matters
    torch.testing.assert_close(model(x, t, None), model(x, t, torch.full((3,), 5)))    # None = null class
    model.train()
    g = torch.Generator().manual_seed(0)
    ys = torch.zeros(40000, dtype=torch.long)   # 0.0025 standard error: 0.03 is 12 of them
    emb = model.y_embedder(ys, g)
    dropped = (emb == model.y_embedder.table.weight[5]).all(1).float().mean()
    within("|label drop rate - 0.5|", abs(dropped.item() - 0.5), hi=0.03)
    model.eval()
    assert torch.equal(model.y_embedder(ys[:10]), model.y_embedder.table.weight[0].expand(10, -1))


def test_save_and_load_roundtrip(tmp_path):
    model = _perturbed(tiny(patch_size=2))
    model.save_pretrained(tmp_path / "dit")
    loaded = DiT.from_pretrained(tmp_path / "dit").eval()
    assert loaded.config == model.config
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 3])
    assert torch.equal(model(x, t, y), loaded(x, t, y))


@pytest.mark.margin
def test_tiny_dit_overfits_and_sampling_reproduces_latents():
    """Four latents, one per class: the class-conditional flow is a point mass, so sampling must return them."""
    torch.manual_seed(0)
    k = 4
    data = torch.randn(k, 4, 4, 4)
    model = DiT(DiTConfig(input_size=(4, 4), in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=k,
                          class_dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        y = torch.arange(k).repeat(8)
        loss, _ = flow_matching_loss(model, data[y], y, TransportConfig(), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    within("first loss", losses[0], lo=1.0)
    within("loss, mean of the last 20 steps", sum(losses[-20:]) / 20, hi=0.35)   # 0.10-0.16 over seeds and kernels
    model.eval()
    y = torch.arange(k).repeat(2)
    out = sample(GuidedVelocity(model), torch.randn(8, 4, 4, 4, generator=g), y, SamplerConfig(steps=50))
    rel = (out - data[y]).pow(2).mean() / data.pow(2).mean()
    within("relative MSE of samples to the training latents", rel, hi=0.05)


# ---------------------------------------------------------------------------------------------------- time embedding, RoPE
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


# ---------------------------------------------------------------------------------------------------- trained time shift
# the DiT stage's loss calls the model at times distributed as the configured shift of a uniform
@pytest.mark.margin
def test_dit_stage_trains_at_the_configured_shift():
    stage = DiTStage.__new__(DiTStage)   # the loss needs the config and the model, not the latent cache
    stage.cfg = Config(latents="unused", transport=TransportConfig(time_shift=TRAINED_SHIFT))
    stage.modules = {"model": Recorder(_dit())}
    torch.manual_seed(0)
    n = 16000   # the empirical CDF's standard error is at most 0.004: the bound 0.03 is 7.5 of them
    stage.loss("main", {"latent": torch.randn(n, 2, 2, 2), "label": torch.zeros(n, dtype=torch.long)}, 0)
    t = stage.modules["model"].calls[0]["t"]
    for u in (0.1, 0.5, 0.9):  # P(t <= shift(u)) = u for t = shift(uniform)
        within(f"|P(t <= shift({u})) - {u}|", abs(float((t <= shift_time(u, TRAINED_SHIFT)).float().mean()) - u), hi=0.03)

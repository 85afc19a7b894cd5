"""PixelDecoder: shapes, the paper's parameter count, unpatchify layout, save/load; Gaussian-embedding noise."""
from __future__ import annotations

import pytest
import torch
from margins import within

from fae.config import ConfigError, from_dict
from fae.models.pixel_decoder import (
    FeatureNoise,
    PixelDecoder,
    PixelDecoderConfig,
    feature_rms,
    pixel_decoder_config,
    scaled_noise_sigma,
)
from fae.nn import count_parameters


def tiny_config(**kw) -> PixelDecoderConfig:
    return pixel_decoder_config("tiny", in_dim=32, num_tokens=16, patch_size=8, **kw)


def test_paper_size_parameter_count():
    with torch.device("meta"):
        model = PixelDecoder(pixel_decoder_config("paper"))
    n = count_parameters(model)
    assert abs(n - 305.36e6) / 305.36e6 < 0.0005, n  # App. D within 0.05% (docs/fidelity.md)
    assert model.config.image_size == 256 and model.config.in_dim == 1536


@pytest.mark.parametrize("size", ["B", "S", "tiny"])
def test_registry_sizes_build(size):
    with torch.device("meta"):
        model = PixelDecoder(pixel_decoder_config(size, in_dim=768, num_tokens=256))
    assert model.config.width == {"B": 768, "S": 384, "tiny": 64}[size]
    with pytest.raises(ValueError, match="unknown pixel decoder size"):
        pixel_decoder_config("XXL")


@pytest.mark.parametrize("refine", [0, 16])
def test_shapes_and_backward(refine):
    model = PixelDecoder(tiny_config(refine_channels=refine))
    x = torch.randn(3, 16, 32)
    y = model(x)
    assert y.shape == (3, 3, 32, 32)
    y.mean().backward()
    assert model.last_layer.grad is not None
    out = model.decode(x)
    assert out.min() >= 0 and out.max() <= 1


def test_bad_input_shape_names_expected_shape():
    model = PixelDecoder(tiny_config())
    with pytest.raises(ValueError, match=r"\(B, 16, 32\)"):
        model(torch.randn(2, 15, 32))
    with pytest.raises(ConfigError, match="num_tokens"):
        from_dict(PixelDecoderConfig, {"num_tokens": 15})  # not a square grid
    with pytest.raises(ConfigError, match="num_heads"):
        from_dict(PixelDecoderConfig, {"width": 66, "num_heads": 4})


def test_unpatchify_places_each_token_in_its_grid_cell():
    model = PixelDecoder(tiny_config())
    g, p = 4, 8
    # token t (row-major) carries the constant value t in every channel of its patch
    patches = torch.arange(g * g, dtype=torch.float32).view(1, g * g, 1).expand(1, g * g, p * p * 3)
    img = model.unpatchify(patches.contiguous())
    for t in range(g * g):
        r, c = divmod(t, g)
        assert (img[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p] == t).all()
    # and pixel (i, j) of a patch is element (i * p + j) * 3 + channel of the token vector
    vec = torch.zeros(1, g * g, p * p * 3)
    vec[0, 5, (2 * p + 3) * 3 + 1] = 1.0
    img = model.unpatchify(vec)
    assert img[0, 1, 1 * p + 2, 1 * p + 3] == 1 and img.sum() == 1


def test_refinement_starts_as_identity():
    a = PixelDecoder(tiny_config(refine_channels=0))
    b = PixelDecoder(tiny_config(refine_channels=16))
    missing, unexpected = b.load_state_dict(a.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("refine.") for k in missing)
    x = torch.randn(2, 16, 32)
    assert torch.allclose(a(x), b(x), atol=1e-6)


def test_save_load_roundtrip(tmp_path):
    model = PixelDecoder(tiny_config()).eval()
    model.save_pretrained(tmp_path / "dec")
    again = PixelDecoder.from_pretrained(tmp_path / "dec").eval()
    x = torch.randn(2, 16, 32)
    assert torch.equal(model(x), again(x))


def test_noise_only_in_training_mode():
    noise = FeatureNoise(0.4)
    x = torch.randn(64, 16, 32)
    noise.eval()
    assert torch.equal(noise(x), x)
    noise.train()
    y = noise(x)
    assert not torch.equal(y, x)
    assert (y - x).std().item() == pytest.approx(0.4, rel=0.05)
    assert torch.equal(FeatureNoise(0.0).train()(x), x)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(noise(x, g1), noise(x, g2))  # seeded
    with pytest.raises(ValueError, match="sigma"):
        FeatureNoise(-1.0)


def test_sigma_scaling_rule():
    # unit-RMS features (a LayerNorm-normalised DINOv2 token) get exactly sigma
    x = torch.nn.functional.layer_norm(torch.randn(8, 16, 64) * 5 + 3, (64,))
    assert feature_rms(x) == pytest.approx(1.0, rel=1e-4)
    assert scaled_noise_sigma(0.4, feature_rms(x)) == pytest.approx(0.4, rel=1e-4)
    # the rule scales with the norm of the embeddings: 3x larger features, 3x the noise
    assert scaled_noise_sigma(0.4, feature_rms(3 * x)) == pytest.approx(1.2, rel=1e-4)
    # and a reference RMS restates sigma for another scale
    assert scaled_noise_sigma(0.4, 6.0, ref_rms=2.0) == pytest.approx(1.2)
    assert scaled_noise_sigma(0.4, 123.0, mode="absolute") == 0.4
    with pytest.raises(ValueError, match="RMS"):
        scaled_noise_sigma(0.4, None)


# ---------------------------------------------------------------------------------------------------------------
# Stages Ib / II end to end on Fashion-MNIST with a tiny frozen encoder
# ---------------------------------------------------------------------------------------------------------------
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from safetensors.torch import load_file  # noqa: E402
from seeding import subprocess_env  # noqa: E402
from tiny import tiny_fae_config  # noqa: E402

from fae.cli import main  # noqa: E402
from fae.encoders import EncoderConfig, FrozenEncoder  # noqa: E402
from fae.io import read_bundle_config  # noqa: E402
from fae.models.autoencoder import FeatureAutoEncoder  # noqa: E402
from fae.stages import load_stage_config, train_stage  # noqa: E402
from fae.tokenizers import FAE  # noqa: E402


def write_config(path: Path, tiny_encoder_dir: Path, steps: int = 4, extra: str = "", decoder: bool = True,
                 eval_limit: int = 16) -> Path:
    dec = ("decoder: {in_dim: 32, num_tokens: 16, patch_size: 4, width: 32, depth: 1, num_heads: 2, "
           "refine_channels: 8}\n" if decoder else "")
    path.write_text(f"""
stage: pixel-decoder
encoder: {{kind: dinov2, name_or_path: {tiny_encoder_dir}}}
{dec}data: {{kind: fashion_mnist, image_size: 16, limit: 32, hflip: true}}
features: cache
feature_cache_dir: {path.parent / 'cache'}
losses: {{gan_weight: 0.1, disc_start: 1, gan_start: 2, discriminator: {{channels: 8, n_layers: 2}}}}
optim: {{lr: 1.0e-3, warmup_steps: 1}}
disc_optim: {{lr: 1.0e-3}}
train: {{steps: {steps}, batch_size: 8, checkpoint_every: 2, log_every: 1, ema_decay: 0.5, seed: 3}}
eval: {{limit: {eval_limit}, batch_size: 8, grid_rows: 2}}
{extra}""")
    return path


def test_gaussian_stage_cli_writes_bundle_recon_and_grid(tmp_path, tiny_encoder_dir):
    cfg = write_config(tmp_path / "g.yaml", tiny_encoder_dir)
    assert main(["train", "pixel-decoder", "--config", str(cfg), "--out", str(tmp_path / "g"), "--no-progress"]) == 0
    record = read_bundle_config(tmp_path / "g" / "pixel_decoder")
    # the bundle carries the (small) encoder it was trained with, and names it by its weights' hash
    carried = (tmp_path / "g" / "pixel_decoder" / "encoder").resolve()
    assert record["stage"] == "gaussian" and record["encoder"]["name_or_path"] == str(carried)
    assert (carried / "model.safetensors").read_bytes() == (tiny_encoder_dir / "model.safetensors").read_bytes()
    assert len(record["encoder"]["weights_sha256"]) == 64
    assert record["noise_sigma"] > 0
    decoder = PixelDecoder.from_pretrained(tmp_path / "g" / "pixel_decoder")
    assert decoder(torch.randn(1, 16, 32)).shape == (1, 3, 16, 16)
    scores = json.loads((tmp_path / "g" / "recon.json").read_text())
    assert scores["images"] == 16 and set(scores["decoders"]) == {"gaussian(x)"}
    assert {"psnr", "ssim", "rfd_encoder"} <= set(scores["decoders"]["gaussian(x)"])   # encoder space: no rFID
    assert (tmp_path / "g" / "recon_grid.png").stat().st_size > 0
    rows = [json.loads(l) for l in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert "loss/disc" not in rows[0] and "loss/disc" in rows[1]  # discriminator from disc_start=1
    assert "gan_weight" not in rows[1] and rows[2]["gan_weight"] > 0  # generator term from gan_start=2


def test_noise_sigma_follows_the_feature_rms(tmp_path, tiny_encoder_dir):
    from fae.stages.pixel_decoder import PixelDecoderStage

    _, cfg = load_stage_config(write_config(tmp_path / "g.yaml", tiny_encoder_dir))
    stage = PixelDecoderStage(cfg)
    stage.train_dataset()
    feats = torch.stack([stage.train_dataset()[i]["features"] for i in range(32)])
    assert stage.noise.sigma == pytest.approx(0.4 * feature_rms(feats), rel=1e-5)
    _, cfg = load_stage_config(tmp_path / "g.yaml", ["noise.mode=absolute", "noise.sigma=0.25"])
    stage = PixelDecoderStage(cfg)
    stage.train_dataset()
    assert stage.noise.sigma == 0.25


def test_discriminator_state_resumes_exactly(tmp_path, tiny_encoder_dir):
    cfg_path = write_config(tmp_path / "g.yaml", tiny_encoder_dir, steps=4, eval_limit=0)
    name, cfg = load_stage_config(cfg_path)
    train_stage(name, cfg, tmp_path / "straight", progress=False)
    from fae.stages import stage_module
    from fae.training import Trainer

    Trainer(stage_module(name).build(cfg), cfg.train, tmp_path / "paused", run_config=cfg, progress=False).fit(stop_at=2)
    assert not (tmp_path / "paused" / "pixel_decoder").exists()
    train_stage(name, cfg, tmp_path / "paused", progress=False)  # a new process would do the same: resume at 2
    for module in ("disc", "decoder", "decoder.ema"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "step_00000004" / f"{module}.safetensors"))
        b = load_file(str(tmp_path / "paused" / "checkpoints" / "step_00000004" / f"{module}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), module
    sa = torch.load(tmp_path / "straight" / "checkpoints" / "step_00000004" / "training_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "paused" / "checkpoints" / "step_00000004" / "training_state.pt", weights_only=True)
    assert torch.equal(sa["stage"]["lecam"]["ema_real"], sb["stage"]["lecam"]["ema_real"])
    assert sa["stage"]["lecam"]["ema_real"] != 0
    for k, v in sa["optimizers"]["disc"]["state"][0].items():
        assert torch.equal(v, sb["optimizers"]["disc"]["state"][0][k])


def test_discriminator_scores_the_generator_pass_images(tmp_path, tiny_encoder_dir):
    """With a GAN, each micro-batch is decoded once per step: the discriminator pass scores the very images the
    generator pass made (noise included), not a second decode."""
    from fae.stages import stage_module
    from fae.training import Trainer

    _, cfg = load_stage_config(write_config(tmp_path / "g.yaml", tiny_encoder_dir, steps=2, eval_limit=0),
                               ["train.grad_accum=2"])
    stage = stage_module("pixel-decoder").build(cfg)
    decoded, scored = [], []
    stage.modules["decoder"].register_forward_hook(lambda m, i, out: decoded.append(out.detach().clone()))
    original = stage.pixel_loss.discriminator_loss
    stage.pixel_loss.discriminator_loss = lambda d, real, fake: scored.append(fake.clone()) or original(d, real, fake)
    Trainer(stage, cfg.train, tmp_path / "run", run_config=cfg, progress=False).fit()
    # 2 steps x 2 micro-batches decoded once each; the discriminator trains from disc_start=1 (the second step)
    assert len(decoded) == 4 and len(scored) == 2
    assert all(torch.equal(f, d) for f, d in zip(scored[-2:], decoded[-2:], strict=True))


def _fae_bundle(path: Path, tiny_encoder_dir: Path) -> Path:
    enc = FrozenEncoder.from_config(EncoderConfig(kind="dinov2", name_or_path=str(tiny_encoder_dir)))
    model = FeatureAutoEncoder(tiny_fae_config(encoder_head_dim=16))
    return model.save_pretrained(path, extra={"encoder": enc.reference()})


def test_finetune_stage_and_pipeline(tmp_path, tiny_encoder_dir):
    g_cfg = write_config(tmp_path / "g.yaml", tiny_encoder_dir, steps=2)
    assert main(["train", "pixel-decoder", "--config", str(g_cfg), "--out", str(tmp_path / "g"), "--no-progress"]) == 0
    _fae_bundle(tmp_path / "fae_run" / "fae", tiny_encoder_dir)
    ft_cfg = write_config(tmp_path / "ft.yaml", tiny_encoder_dir, steps=2, decoder=False)
    assert main(["train", "pixel-decoder", "--config", str(ft_cfg), "--out", str(tmp_path / "ft"), "--no-progress",
                 "--finetune-from", str(tmp_path / "g"), "--fae", str(tmp_path / "fae_run")]) == 0
    record = read_bundle_config(tmp_path / "ft" / "pixel_decoder")
    assert record["stage"] == "finetune" and record["fae"] == str(tmp_path / "fae_run")
    # the LeCam averages travel into stage II with the discriminator they belong to
    from fae.stages.pixel_decoder import PixelDecoderStage

    lecam = load_file(str(tmp_path / "g" / "lecam.safetensors"))
    assert lecam["ema_real"] != 0 and lecam["ema_fake"] != 0
    _, ft = load_stage_config(ft_cfg, [f"finetune_from={tmp_path / 'g'}", f"fae={tmp_path / 'fae_run'}"])
    carried = PixelDecoderStage(ft).pixel_loss.lecam
    assert torch.equal(carried.ema_real, lecam["ema_real"]) and torch.equal(carried.ema_fake, lecam["ema_fake"])
    scores = json.loads((tmp_path / "ft" / "recon.json").read_text())
    assert set(scores["decoders"]) == {"gaussian(x)", "gaussian(x_hat)", "finetuned(x_hat)"}
    # the fine-tuned decoder started from the Gaussian one and moved
    g = load_file(str(tmp_path / "g" / "pixel_decoder" / "model.safetensors"))
    f = load_file(str(tmp_path / "ft" / "pixel_decoder" / "model.safetensors"))
    assert g.keys() == f.keys() and any(not torch.equal(g[k], f[k]) for k in g)

    # image -> z -> image in two calls
    fae = FAE.from_pretrained(tmp_path / "ft" / "tokenizer")
    images = torch.rand(2, 3, 16, 16)
    z = fae.encode(images)
    assert z.shape == (2, 4, 4, 4)
    out = fae.decode_to_pixels(z)
    assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    assert torch.equal(fae.reconstruct(images), out)
    parts = FAE.from_parts(tmp_path / "fae_run" / "fae", tmp_path / "ft" / "pixel_decoder")
    assert torch.allclose(parts.decode_to_pixels(z), out)

    # `fae eval recon` finds the FAE and the data through the fine-tuned run, and agrees with the run's own eval
    assert main(["eval", "recon", "--gaussian", str(tmp_path / "g"), "--finetuned", str(tmp_path / "ft"),
                 "--limit", "16", "--batch-size", "8", "--grid-rows", "2", "--out", str(tmp_path / "recon")]) == 0
    again = json.loads((tmp_path / "recon" / "recon.json").read_text())
    for name, row in scores["decoders"].items():
        assert again["decoders"][name]["psnr"] == pytest.approx(row["psnr"], rel=1e-6)
    assert (tmp_path / "recon" / "recon_grid.png").is_file()


def test_finetune_config_errors(tmp_path, tiny_encoder_dir):
    from fae.config import ConfigError as CE

    cfg = write_config(tmp_path / "g.yaml", tiny_encoder_dir)
    with pytest.raises(CE, match="fae"):
        load_stage_config(cfg, [f"finetune_from={tmp_path}"])
    with pytest.raises(CE, match="decoder: required"):
        load_stage_config(write_config(tmp_path / "nodec.yaml", tiny_encoder_dir, decoder=False))
    with pytest.raises(CE, match="patch_size=4"):
        name, c = load_stage_config(cfg, ["decoder.patch_size=2"])
        from fae.stages.pixel_decoder import PixelDecoderStage

        PixelDecoderStage(c)
    with pytest.raises(FileNotFoundError, match="fae bundle"):
        name, c = load_stage_config(cfg, [f"fae={tmp_path / 'nowhere'}"])
        PixelDecoderStage(c)


@pytest.mark.margin
def test_seam_ratio_detects_a_patch_grid():
    from fae.metrics.reconstruction import SeamAccumulator

    x = torch.rand(4, 3, 16, 16)
    smooth, blocky = SeamAccumulator(4), SeamAccumulator(4)
    smooth.update(x, x + 0.05 * torch.randn_like(x))
    offsets = torch.rand(4, 3, 4, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)  # one offset per patch
    blocky.update(x, x + 0.05 * torch.randn_like(x) + 0.5 * offsets)
    within("seam ratio of a seamless image", smooth.ratio(), lo=0.8, hi=1.2)
    assert blocky.ratio() > 2


def test_torchrun_two_processes_with_gan(tmp_path, tiny_encoder_dir):
    """Both optimizer groups (decoder and discriminator) under DDP, from the CLI, with the GAN switched on."""
    import subprocess
    import sys

    cfg = write_config(tmp_path / "g.yaml", tiny_encoder_dir, steps=4)
    env = subprocess_env(OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "fae.cli", "train", "pixel-decoder", "--config", str(cfg), "--out", str(out),
                             "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and "loss/disc" in rows[-1]
    assert (out / "pixel_decoder" / "model.safetensors").is_file() and (out / "discriminator.safetensors").is_file()
    # the held-out evaluation was split over the two processes and merged: every image counted once, one grid
    from fae.stages import load_stage_config
    from fae.stages.pixel_decoder import build, evaluate_stage

    _, run_cfg = load_stage_config(out / "config.yaml", stage="pixel-decoder")
    shared = json.loads((out / "recon.json").read_text())
    alone = evaluate_stage(build(run_cfg), PixelDecoder.from_pretrained(out / "pixel_decoder"), tmp_path / "alone")
    assert shared["images"] == alone["images"] == run_cfg.eval.limit
    for name, row in alone["decoders"].items():
        for key in ("psnr", "ssim", "rfd_encoder"):
            assert abs(shared["decoders"][name][key] - row[key]) < 1e-4 * max(1.0, abs(row[key])), (name, key)

"""`fae train kl-vae`: a diffusers AutoencoderKL (SD-VAE's architecture) trained by the shared trainer, exported as a
plain diffusers folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from margins import within
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from fae.cli import main  # noqa: E402
from fae.config import ConfigError  # noqa: E402
from fae.metrics.recon import psnr  # noqa: E402
from fae.stages import load_stage_config, parameter_table, stage_module, stage_names, train_stage  # noqa: E402
from fae.stages.kl_vae import KLAutoencoder, KLLossConfig, build_autoencoder, kl_vae_loss  # noqa: E402
from fae.training import Trainer  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo" / "kl_vae.yaml"


def write_config(path: Path, steps: int = 4, extra: str = "", eval_limit: int = 0) -> Path:
    """Two levels of 8 and 16 channels (f2: 8x8x4 latents at 16 px) on 32 Fashion-MNIST images."""
    path.write_text(f"""
stage: kl-vae
model: {{block_out_channels: [8, 16], layers_per_block: 1, latent_channels: 4, norm_num_groups: 8}}
data: {{kind: fashion_mnist, image_size: 16, limit: 32, hflip: true}}
optim: {{lr: 3.0e-3, warmup_steps: 2}}
train: {{steps: {steps}, batch_size: 8, checkpoint_every: 2, log_every: 1, ema_decay: 0.5, seed: 3}}
eval: {{limit: {eval_limit}, batch_size: 8, grid_rows: 2}}
{extra}""")
    return path


def test_demo_config_builds_an_sd_vae_shaped_model_with_8x8x8_latents():
    name, cfg = load_stage_config(DEMO)
    assert name == "kl-vae" and "kl-vae" in stage_names()
    counts = {row["component"]: row["parameters"] for row in parameter_table(name, cfg)}
    assert counts == {"kl-vae encoder": 372_160, "kl-vae decoder": 589_579}
    torch.manual_seed(0)
    vae = build_autoencoder(cfg)
    assert vae.config.scaling_factor == 1.0   # latent caches normalise per channel: no global factor
    assert set(vae.config.down_block_types) == {"DownEncoderBlock2D"}
    assert set(vae.config.up_block_types) == {"UpDecoderBlock2D"}
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
    assert z.shape == (1, 8, 8, 8)            # the demo FAE's latent shape
    # the defaults are SD-VAE's sizes: 83,653,863 parameters, as stabilityai/sd-vae-ft-ema
    _, default = load_stage_config(None, ["data.image_size=256"], stage="kl-vae")
    assert sum(row["parameters"] for row in parameter_table("kl-vae", default)) == 83_653_863


def test_loss_is_ldm_weighting_per_pixel():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    torch.manual_seed(0)
    x, rec = torch.rand(2, 3, 4, 4) * 2 - 1, torch.rand(2, 3, 4, 4) * 2 - 1
    posterior = DiagonalGaussianDistribution(torch.randn(2, 4, 2, 2))   # mean and logvar of 2 latent channels
    kl_sum = 0.5 * (posterior.mean.pow(2) + posterior.var - 1 - posterior.logvar).sum((1, 2, 3)).mean()
    loss, logs = kl_vae_loss(rec, x, posterior, KLLossConfig(rec="l1", kl_weight=0.01))
    torch.testing.assert_close(loss, (rec - x).abs().mean() + 0.01 * kl_sum / 48)
    torch.testing.assert_close(logs["kl"], kl_sum / 48)
    loss, _ = kl_vae_loss(rec, x, posterior, KLLossConfig(rec="l2", kl_weight=0.0))
    torch.testing.assert_close(loss, (rec - x).pow(2).mean())


@pytest.mark.margin
def test_loss_goes_down(tmp_path, one_thread):
    name, cfg = load_stage_config(write_config(tmp_path / "k.yaml", steps=40), ["train.checkpoint_every=40"])
    train_stage(name, cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rec" in r]
    first, last = sum(r["rec"] for r in rows[:5]) / 5, sum(r["rec"] for r in rows[-5:]) / 5
    within("KL-VAE L1 loss, mean of the last 5 logged steps / the first 5", last / first, hi=0.6)
    within("KL-VAE training PSNR gain, first to last logged step (dB)", rows[-1]["psnr"] - rows[0]["psnr"], lo=3)


def test_interrupted_run_resumes_to_identical_weights(tmp_path, one_thread):
    name, cfg = load_stage_config(write_config(tmp_path / "k.yaml", steps=4))
    train_stage(name, cfg, tmp_path / "straight", progress=False)
    Trainer(stage_module(name).build(cfg), cfg.train, tmp_path / "paused", progress=False).fit(stop_at=2)
    assert not (tmp_path / "paused" / "kl-vae").exists()
    train_stage(name, cfg, tmp_path / "paused", progress=False)  # as a new process would: resume at step 2
    step = "step_00000004"
    for module in ("model", "model.ema"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / step / f"{module}.safetensors"))
        b = load_file(str(tmp_path / "paused" / "checkpoints" / step / f"{module}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), module
    sa = torch.load(tmp_path / "straight" / "checkpoints" / step / "training_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "paused" / "checkpoints" / step / "training_state.pt", weights_only=True)
    for k, v in sa["optimizers"]["main"]["state"][0].items():
        assert torch.equal(v, sb["optimizers"]["main"]["state"][0][k])


def test_export_is_a_diffusers_folder_that_reconstructs_as_trained(tmp_path, one_thread):
    from diffusers import AutoencoderKL

    from fae.data import DataConfig, build_dataset

    cfg_path = write_config(tmp_path / "k.yaml", steps=4, eval_limit=8)
    assert main(["train", "kl-vae", "--config", str(cfg_path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    loaded = AutoencoderKL.from_pretrained(tmp_path / "run" / "kl-vae").eval()
    assert loaded.config.scaling_factor == 1.0 and loaded.config.latent_channels == 4
    # the export is the EMA of the last step's checkpoint
    _, cfg = load_stage_config(cfg_path)
    trained = KLAutoencoder(build_autoencoder(cfg))
    trained.load_state_dict(load_file(str(tmp_path / "run" / "checkpoints" / "step_00000004" / "model.ema.safetensors")))
    images = torch.stack([build_dataset(DataConfig(image_size=16, limit=8), "test")[i]["image"] for i in range(8)])
    with torch.no_grad():
        z = loaded.encode(images * 2 - 1).latent_dist.mode()
        mine = trained.eval().vae.encode(images * 2 - 1).latent_dist.mode()
        assert torch.equal(z, mine)
        assert torch.equal(loaded.decode(z).sample, trained.vae.decode(mine).sample)
        expected = psnr(((loaded.decode(z).sample + 1) / 2).clamp(0, 1), images).mean().item()
    scores = json.loads((tmp_path / "run" / "recon.json").read_text())
    assert scores["images"] == 8
    assert scores["decoders"]["kl-vae"]["psnr"] == pytest.approx(expected, rel=1e-5)   # held-out = test split
    assert (tmp_path / "run" / "recon_grid.png").stat().st_size > 0


@pytest.mark.parametrize("override, key", [
    ("model.block_out_chanels=[8,16]", "model.block_out_chanels"),
    ("loss.kl_wieght=0.1", "loss.kl_wieght"),
    ("extra=1", "extra"),
    ("model.norm_num_groups=3", "model.norm_num_groups"),
    ("model.down_block_types=[DownEncoderBlock2D]", "model.down_block_types"),
    ("data.image_size=15", "data.image_size"),
])
def test_config_mistakes_are_named(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_stage_config(write_config(tmp_path / "k.yaml"), [override])

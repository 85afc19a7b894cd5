"""`fae train flow` (exact-likelihood training on a latent cache: bundle, held-out bits/dim, resume after kill -9;
the loss unit and the latent-norm regulariser) and `fae sample` on a flow bundle through the Generator interface
(the recorded sampling switches, `--flow` overrides, `--guidance starflow:<cfg>`)."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from margins import within
from safetensors.torch import load_file
from seeding import subprocess_env

from fae.cli import main
from fae.config import ConfigError, to_dict
from fae.data.latents import LatentCache
from fae.generators import FlowGenerator, load_generator
from fae.io import read_bundle_config
from fae.models.starflow import FlowSampling, StarFlow, bits_per_dim, latent_norm, starflow_config
from fae.stages.flow import Config, FlowStage
from fae.training import checkpoint_dirs

ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, cache: Path, steps: int = 6, checkpoint_every: int = 3) -> Path:
    path.write_text(f"""
stage: flow
latents: {cache}
model: {{input_size: [4, 4], in_channels: 4, hidden_size: 32, layers_per_block: [1, 1], head_dim: 16,
        num_classes: 10}}
noise_std: 0.2
holdout: 8
optim: {{lr: 1.0e-3, warmup_steps: 2}}
train: {{steps: {steps}, batch_size: 8, checkpoint_every: {checkpoint_every}, log_every: 1, ema_decay: 0.9, seed: 1}}
""")
    return path


def test_train_flow_bundle_heldout_bpd_and_sample(tiny_latent_world, tmp_path, one_thread):
    w = tiny_latent_world
    cfg = write_config(tmp_path / "flow.yaml", w["cache"])
    assert main(["train", "flow", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    record = read_bundle_config(tmp_path / "run" / "flow")
    assert record["class"] == "StarFlow" and record["flow"] == {"noise_std": 0.2, "sampling": to_dict(FlowSampling())}
    assert record["latent_stats"] == LatentCache(w["cache"]).stats() and record["class_names"][9] == "Ankle boot"
    ema = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000006" / "model.ema.safetensors"))
    exported = load_file(str(tmp_path / "run" / "flow" / "model.safetensors"))
    assert all(torch.equal(ema[k], exported[k]) for k in ema)          # the bundle holds the EMA weights
    scores = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert scores["rows"] == 8 and math.isfinite(scores["heldout_bpd"]) and math.isfinite(scores["train_bpd"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"bpd", "logdet_per_dim", "loss/main"} <= set(rows[0]) and rows[0]["bpd"] == rows[0]["loss/main"]

    gen = load_generator(tmp_path / "run")                             # a finished run folder finds its flow
    assert isinstance(gen, FlowGenerator) and gen.latent_shape == (4, 4, 4) and gen.supports_guidance
    out = tmp_path / "samples"
    assert main(["sample", "--generator", str(tmp_path / "run"), "--fae", str(w["pipeline"]), "--out", str(out),
                 "-n", "12", "--batch-size", "5", "--guidance", "0-0.5:3.0", "--no-progress"]) == 0
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (12, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert list(npz["labels"]) == [i % 10 for i in range(12)]
    assert (out / "grid.png").is_file() and len(list((out / "images").glob("*.png"))) == 12
    meta = json.loads((out / "samples.json").read_text())
    assert meta["denoised"] and meta["noise_std"] == 0.2
    assert main(["sample", "--generator", str(tmp_path / "run" / "flow"), "--fae", str(w["pipeline"]), "--out",
                 str(tmp_path / "raw"), "-n", "12", "--batch-size", "12", "--guidance", "0-0.5:3.0", "--no-progress",
                 "--no-denoise"]) == 0
    undenoised = np.load(tmp_path / "raw" / "samples.npz")["arr_0"]   # same noise and seeds, no score step
    assert not np.array_equal(undenoised, npz["arr_0"])
    # ml-starflow's cfg 2.0 is fae's 3.0; exact Jacobi iteration gives the token-by-token samples (to rounding)
    common = ["sample", "--generator", str(tmp_path / "run"), "--fae", str(w["pipeline"]), "-n", "6", "--no-progress",
              "--no-denoise", "--no-grid", "--no-pngs"]
    assert main([*common, "--out", str(tmp_path / "s3"), "--guidance", "3.0"]) == 0
    assert main([*common, "--out", str(tmp_path / "j"), "--guidance", "starflow:2.0", "--flow", "jacobi=true",
                 "--flow", "jacobi_tolerance=0"]) == 0
    meta = json.loads((tmp_path / "j" / "samples.json").read_text())
    assert meta["flow_sampling"]["jacobi"] and meta["flow_sampling"]["jacobi_tolerance"] == 0
    scale3, jacobi = (np.load(tmp_path / d / "samples.npz")["arr_0"].astype(int) for d in ("s3", "j"))
    assert np.abs(scale3 - jacobi).max() <= 1
    assert main([*common, "--out", str(tmp_path / "bad"), "--flow", "jacobbi=true"]) == 1   # an unknown key


def test_loss_units_and_latent_norm_regulariser(one_thread):
    """bits/dim by default, nats/dim with loss_unit nats (what grad_clip reads); the regulariser's weight is on the nats
    loss (ml-starflow's), so in bits it enters divided by ln 2."""
    model = StarFlow(starflow_config("tiny", input_size=(2, 2), in_channels=2, num_classes=3, class_dropout=0.0,
                                     layers_per_block=(1, 1, 1)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = {"latent": torch.randn(4, 2, 2, 2), "label": torch.tensor([0, 1, 2, 0])}

    def loss(**kw):
        stage = FlowStage.__new__(FlowStage)          # the loss reads only the config and the model
        stage.cfg, stage.modules = Config(latents="unused", noise_std=0.0, **kw), {"model": model}
        return stage.loss("main", batch, 0)

    bits, logs = loss()
    nats, _ = loss(loss_unit="nats")
    torch.testing.assert_close(nats, bits * math.log(2))
    torch.testing.assert_close(bits, logs["bpd"])
    z, logdet, inputs = model(batch["latent"], batch["label"], with_inputs=True)
    norm = latent_norm(inputs)
    reg_bits, reg_logs = loss(latent_norm_weight=0.1)
    reg_nats, _ = loss(latent_norm_weight=0.1, loss_unit="nats")
    torch.testing.assert_close(reg_logs["latent_norm"], norm)
    torch.testing.assert_close(reg_nats, nats + 0.1 * norm)
    torch.testing.assert_close(reg_bits, reg_nats / math.log(2))
    assert norm > 0.5   # the data's own mean square (about 1) and the first block's output


@pytest.mark.margin
def test_nll_falls_on_a_tiny_overfit(one_thread):
    """Four latents, one per class, little noise: the conditional flow learns them (bits/dim fall far) and its
    samples, denoised, land on them. A small learning rate keeps the descent smooth: at 6e-3 the last losses
    spiked by up to 1 bit/dim depending on the seed and on the CPU's rounding; at 1e-3 the tail over 5
    seeds and both kernels spans under 0.1 bit (docs/testing.md)."""
    k, noise = 4, 0.05
    data = torch.randn(k, 2, 2, 2)
    model = StarFlow(starflow_config("tiny", input_size=(2, 2), in_channels=2, num_classes=k, class_dropout=0.0,
                                     layers_per_block=(1, 1, 1, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(400):
        y = torch.arange(k).repeat(8)
        x = data[y] + noise * torch.randn(len(y), 2, 2, 2)
        loss = bits_per_dim(*model(x, y)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the noise alone bounds the NLL at log2(0.05 sqrt(2 pi e)) = -2.3 bits/dim
    within("bits/dim, mean of the first 10 steps", sum(losses[:10]) / 10, lo=0.5)
    within("bits/dim, mean of the last 20 steps", sum(losses[-20:]) / 20, hi=-1.5)
    model.eval()
    y = torch.arange(k).repeat(4)
    with torch.no_grad():
        x = model.inverse(torch.randn(len(y), 2, 2, 2), y)
    x = model.denoise(x, y, noise)
    within("relative MSE of denoised samples to the training latents",
           (x - data[y]).pow(2).mean() / data.pow(2).mean(), hi=0.02)


def test_resume_after_kill_matches_uninterrupted(tiny_latent_world, tmp_path, one_thread):
    """A `fae train flow` process killed with SIGKILL mid-run, run again, ends with the uninterrupted run's weights
    and held-out score (both other runs here in-process: same code, one thread, less start-up)."""
    cfg = write_config(tmp_path / "flow.yaml", tiny_latent_world["cache"], steps=40, checkpoint_every=2)
    env = subprocess_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fae.cli", "train", "flow", "--no-progress", "--config", str(cfg),
                             "--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint_dirs(tmp_path / "killed") and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reached = checkpoint_dirs(tmp_path / "killed")
    assert reached and int(reached[-1].name.split("_")[1]) < 40, "the run should be killed mid-way"
    assert main(["train", "flow", "--config", str(cfg), "--out", str(tmp_path / "killed"), "--no-progress"]) == 0
    assert main(["train", "flow", "--config", str(cfg), "--out", str(tmp_path / "straight"), "--no-progress"]) == 0
    for name in ("flow/model.safetensors", "checkpoints/step_00000040/model.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "killed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((tmp_path / "straight" / "eval.json").read_text()) == \
        json.loads((tmp_path / "killed" / "eval.json").read_text())


def test_noise_tuned_fae_decoder_learns_the_flows_noise_and_decodes_without_the_score_step(
        tiny_latent_world, tiny_encoder_dir, tmp_path, one_thread, monkeypatch):
    """STARFlow's sampling path on FAE: the stage-1 stage from a trained FAE (`init_from`) with `latent_noise_flow`
    decodes z + the flow's training noise (noise_std x the flow's latent std, per channel); only the feature decoder
    learns; the bundle decodes the flow's samples (same latent space) and `flow_denoise=False` skips the score step."""
    from tiny import tiny_fae_config

    from fae.encoders import EncoderConfig
    from fae.models.autoencoder import FeatureAutoEncoder
    from fae.models.pixel_decoder import PixelDecoder
    from fae.sampling import load_decoder
    from fae.stages.autoencoder import Config as FAEStageConfig
    from fae.stages.autoencoder import FAEStage
    from fae.transport import SamplerConfig

    w = tiny_latent_world
    flow_cfg = write_config(tmp_path / "flow.yaml", w["cache"], steps=2, checkpoint_every=2)
    assert main(["train", "flow", "--config", str(flow_cfg), "--out", str(tmp_path / "flow"), "--no-progress"]) == 0
    gen = load_generator(tmp_path / "flow")
    assert gen.noise_std == 0.2 and (gen.std - 1).abs().max() > 0.3   # a noise without std_c would be caught

    class Features:  # the batch brings the features; the stage asks its encoder nothing else here
        dim, grid = 32, (4, 4)

    cfg = FAEStageConfig(encoder=EncoderConfig(kind="dinov2", name_or_path="unused"), model=tiny_fae_config(),
                         init_from=str(w["fae"]), latent_noise_flow=str(tmp_path / "flow"))
    stage = FAEStage(cfg, encoder=Features())  # type: ignore[arg-type]
    net = stage.modules["model"]
    seen: list[torch.Tensor] = []
    plain_decode = net.decode
    monkeypatch.setattr(net, "decode", lambda z: (seen.append(z.detach()), plain_decode(z))[1])
    x = torch.randn(64, 16, 32)
    loss, logs = stage.loss("main", {"features": x}, 0)
    eps = (seen[0] - net.encode(x).mode()) / (gen.std.view(1, -1, 1, 1) * gen.noise_std)
    assert abs(eps.std().item() - 1) < 0.1 and eps.mean().abs() < 0.1        # 4096 draws of N(0, 1)
    assert (eps.std(dim=(0, 2, 3)) - 1).abs().max() < 0.15                    # per channel: the flow's std_c
    loss.backward()
    assert all(p.grad is None for p in net.encoder.parameters())             # the latent space does not move
    assert all(p.grad is not None for p in net.decoder.parameters())

    (tmp_path / "tuned.yaml").write_text(f"""
stage: fae
encoder: {{kind: dinov2, name_or_path: {tiny_encoder_dir}}}
model: {{feature_dim: 32, grid: [4, 4], latent_channels: 4, encoder_heads: 2, encoder_head_dim: 8,
        decoder_depth: 1, decoder_heads: 2}}
data: {{kind: fashion_mnist, image_size: 16, limit: 16, hflip: false}}
init_from: {w["fae"]}
latent_noise_flow: {tmp_path / "flow"}
optim: {{lr: 1.0e-2, warmup_steps: 0}}
train: {{steps: 2, batch_size: 8, checkpoint_every: 2, log_every: 1, ema_decay: 0.0, seed: 1}}
eval: {{limit: 8}}
""")
    assert main(["train", "fae", "--config", str(tmp_path / "tuned.yaml"), "--out", str(tmp_path / "tuned"),
                 "--no-progress"]) == 0
    start, tuned = FeatureAutoEncoder.from_pretrained(w["fae"]), FeatureAutoEncoder.from_pretrained(
        tmp_path / "tuned" / "fae")
    assert all(torch.equal(a, b) for a, b in zip(start.encoder.state_dict().values(),
                                                 tuned.encoder.state_dict().values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(start.decoder.parameters(), tuned.decoder.parameters(),
                                                     strict=True))
    record = read_bundle_config(tmp_path / "tuned" / "fae")
    assert record["latent_space_sha256"] == read_bundle_config(w["fae"])["weights_sha256"]
    assert record["latent_noise"]["noise_std"] == 0.2

    # sampling: the tuned decoder passes the generator's tokenizer check and is the one that decodes; no score step
    denoised = []
    plain_denoise = StarFlow.denoise
    monkeypatch.setattr(StarFlow, "denoise", lambda self, *a: (denoised.append(1), plain_denoise(self, *a))[1])
    decode = load_decoder(gen, fae=tmp_path / "tuned", pixel_decoder=w["pipeline"])
    noise, labels = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3])
    z = gen.sample(noise, labels, SamplerConfig(flow_denoise=False))
    assert denoised == []
    pixels = PixelDecoder.from_pretrained(w["pipeline"] / "pixel_decoder")
    with torch.no_grad():
        torch.testing.assert_close(decode(z), pixels.decode(tuned.decode(z)))
        assert not torch.allclose(decode(z), pixels.decode(start.decode(z)), atol=1e-4)
    gen.sample(noise, labels, SamplerConfig())
    assert denoised == [1]    # the default keeps the score step
    gen.noise_std = 0.1   # a flow at another noise level: its noise is not what the decoder learned
    with pytest.raises(ConfigError, match="noise-tuned for a flow with noise_std 0.2"):
        load_decoder(gen, fae=tmp_path / "tuned", pixel_decoder=w["pipeline"])

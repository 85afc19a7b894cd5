"""Text-to-image end to end with tiny parts: caption folder -> `fae encode --text-encoder minilm` -> `fae train
mmdit` -> `fae sample --prompt` (grid), guidance against the empty prompt, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fae.cli import main
from fae.config import ConfigError
from fae.data import DataConfig
from fae.data.latents import LatentCache, LatentDataset
from fae.encoders import TextEncoder, TextEncoderConfig
from fae.encoding import EncodeOptions, encode_latents
from fae.generators import MMDiTGenerator, load_generator
from fae.io import read_bundle_config
from fae.stages import load_stage_config
from fae.stages.mmdit import MMDiTStage
from fae.transport import GuidanceSchedule, SamplerConfig

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230), "yellow": (240, 230, 20)}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_latent_world):
    root = tmp_path_factory.mktemp("t2i")
    fae_bundle, pipeline = tiny_latent_world["fae"], tiny_latent_world["pipeline"]   # the shared tiny FAE (conftest)
    pairs = root / "pairs"
    pairs.mkdir()
    for name, colour in COLOURS.items():
        Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(pairs / f"{name}.png")
        (pairs / f"{name}.txt").write_text(f"a {name} square")
    # one MiniLM for the module (`fae sample --prompt` below loads its own through the CLI)
    text = TextEncoder.from_config(TextEncoderConfig(max_length=8))
    encode_latents(DataConfig(kind="caption_folder", root=str(pairs), image_size=16), root / "cache", fae=fae_bundle,
                   options=EncodeOptions(shard_size=3), progress=False, text_encoder=text)
    cfg = root / "mmdit.yaml"
    cfg.write_text(f"""
stage: mmdit
latents: {root / 'cache'}
model: {{input_size: [4, 4], in_channels: 4, hidden_size: 32, depth: 2, num_heads: 2, text_dim: 384, text_tokens: 8,
         caption_dropout: 0.2}}
optim: {{lr: 1.0e-3}}
train: {{steps: 4, batch_size: 4, checkpoint_every: 4, log_every: 2, ema_decay: 0.5, seed: 1}}
""")
    assert main(["train", "mmdit", "--config", str(cfg), "--out", str(root / "run"), "--no-progress"]) == 0
    gen = load_generator(root / "run")
    gen.text_encoder = text
    return dict(root=root, fae=fae_bundle, pipeline=pipeline, cfg=cfg, run=root / "run", gen=gen)


def test_cache_holds_text_embeddings_captions_and_the_empty_prompt(world):
    cache = LatentCache(world["root"] / "cache")
    assert cache.has_text and len(cache.counts) == 2             # two shards of 3 + 1
    assert cache.captions() == ["a blue square", "a green square", "a red square", "a yellow square"]
    item = LatentDataset(cache, hflip=False)[2]
    assert item["text_tokens"].shape == (8, 384) and item["text_mask"].sum() == 5   # [CLS] a red square [SEP]
    gen = world["gen"]
    assert isinstance(gen, MMDiTGenerator) and gen.condition_kind == "text" and gen.num_classes == 0
    red = gen.encode_prompts(["a red square"])
    assert torch.allclose(red.pooled[0], item["text_pooled"], atol=2e-2)   # the cached row is that caption's
    null = cache.text_null()
    assert torch.equal(gen.model.null_mask, null["text_mask"][0]) and null["text_mask"].sum() == 2   # "" stored
    record = read_bundle_config(world["run"] / "mmdit")
    assert record["text"]["encoder"]["kind"] == "minilm" and record["text"]["encoder"]["max_length"] == 8


def test_guidance_with_an_empty_prompt_changes_nothing(world):
    gen = world["gen"]
    with torch.no_grad():  # a trained-looking model: the untrained output is zero everywhere
        for p in gen.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    noise = torch.randn(2, 4, 4, 4)
    plain = SamplerConfig(steps=3)
    guided = SamplerConfig(steps=3, guidance=GuidanceSchedule.constant(4.0))
    empty = ["", ""]
    assert torch.allclose(gen.sample(noise, empty, guided), gen.sample(noise, empty, plain), atol=1e-5)
    prompts = ["a red square", "a blue square"]
    assert not torch.allclose(gen.sample(noise, prompts, guided), gen.sample(noise, prompts, plain), atol=1e-3)
    separate = SamplerConfig(steps=3, guidance=GuidanceSchedule.constant(4.0), cfg_batch="separate")
    assert torch.allclose(gen.sample(noise, prompts, guided), gen.sample(noise, prompts, separate), atol=1e-4)
    with pytest.raises(ValueError, match="list of 2 prompts"):
        gen.sample(noise, "a red square", plain)


def test_sample_prompt_writes_a_grid(world, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green square\n\na yellow square\n")
    out = tmp_path / "samples"
    assert main(["sample", "--generator", str(world["run"]), "--fae", str(world["pipeline"]), "--out", str(out),
                 "--prompt", "a red square", "--prompts", str(prompts), "-n", "6", "--steps", "2",
                 "--guidance", "paper-text", "--no-progress"]) == 0
    grid = Image.open(out / "grid.png")
    meta = json.loads((out / "samples.json").read_text())
    assert meta["prompts"] == ["a red square", "a green square", "a yellow square"]
    assert meta["class_names"] == meta["prompts"] and grid.height == 3 * (16 + 2) + 2   # one row per prompt
    assert np.load(out / "samples.npz")["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert main(["sample", "--generator", str(world["run"]), "--fae", str(world["pipeline"]), "--out", str(out),
                 "-n", "2", "--steps", "1", "--no-progress"]) == 1
    assert "text-conditional: give prompts" in capsys.readouterr().err


def test_stage_refuses_a_cache_without_text_or_of_another_width(world, tmp_path):
    _, cfg = load_stage_config(world["cfg"], ["model.text_dim=512"])
    with pytest.raises(ConfigError, match="set model.text_tokens=8 model.text_dim=384"):
        MMDiTStage(cfg)
    plain = encode_latents(DataConfig(split="test", image_size=16, limit=4), tmp_path / "plain",
                           fae=world["fae"], progress=False)
    _, cfg = load_stage_config(world["cfg"], [f"latents={plain}"])
    with pytest.raises(ConfigError, match="holds no text embeddings"):
        MMDiTStage(cfg)


def test_caption_agreement_of_the_nearest_real_image():
    from fae.metrics.judge import caption_agreement

    reference = torch.eye(4)                       # four real images, orthogonal features
    captions = ["cat", "dog", "dog", "moon"]
    generated = torch.tensor([[0.9, 0.1, 0, 0], [0, 0.2, 1.0, 0], [0.1, 0, 0, 1.0]])
    out = caption_agreement(generated, ["cat", "dog", "cat"], reference, captions, k=2)
    assert out["nearest_captions"] == ["cat", "dog", "moon"]
    assert out["top1"] == pytest.approx(2 / 3) and out["top2"] == 1.0   # the third: cat is second nearest
    assert out["chance_top1"] == pytest.approx((0.25 + 0.5 + 0.25) / 3)   # share of real images with the prompt
    assert out["per_prompt_top1"] == {"cat": 0.5, "dog": 1.0}
    with pytest.raises(ValueError, match="one each"):
        caption_agreement(generated, ["cat"], reference, captions)


def test_preview_samples_the_cached_captions(world):
    """train.preview_every: MMDiT's sheet has one row per cached caption (4 here), one column per latent channel."""
    _, cfg = load_stage_config(world["cfg"])
    stage = MMDiTStage(cfg)
    sheets = stage.preview({"model": world["gen"].model}, step=0)
    assert set(sheets) == {"samples"}
    sheet = sheets["samples"]
    assert sheet.shape[0] == 3 and sheet.min() >= 0 and sheet.max() <= 1
    assert sheet.shape[1] == 16 + 4 * (48 + 2) + 2                  # header + 4 rows of 48-px tiles + padding

"""The tests' tiny model configs, written once: a test states only what it changes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fae.models.autoencoder import FAEConfig


def tiny_fae_config(**overrides: Any) -> FAEConfig:
    """An FAE for the tiny test encoder (tests/conftest.py `tiny_encoder_dir`: 4x4 tokens of width 32), 4 latent
    channels, one decoder layer; `overrides` set any other field (e.g. encoder_head_dim=16, decoder_depth=2)."""
    fields: dict[str, Any] = dict(feature_dim=32, grid=(4, 4), latent_channels=4, encoder_heads=2, encoder_head_dim=8,
                                  decoder_depth=1, decoder_heads=2)
    return FAEConfig(**{**fields, **overrides})


def tiny_dit_yaml(cache: Path | str, steps: int) -> str:
    """A `fae train dit` config for the tiny latent cache (conftest `tiny_latent_world`: 4x4x4 latents, 10 classes):
    one block of width 32, batch 8, a checkpoint every 2 steps."""
    return f"""
stage: dit
latents: {cache}
model: {{input_size: [4, 4], in_channels: 4, hidden_size: 32, depth: 1, num_heads: 2, num_classes: 10}}
optim: {{lr: 1.0e-3}}
train: {{steps: {steps}, batch_size: 8, checkpoint_every: 2, log_every: 1, ema_decay: 0.9, seed: 1}}
"""

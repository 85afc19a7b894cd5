"""The tests' tiny model configs, written once: a test states only what it changes."""
from __future__ import annotations

from typing import Any

from fae.models.autoencoder import FAEConfig


def tiny_fae_config(**overrides: Any) -> FAEConfig:
    """An FAE for the tiny test encoder (tests/conftest.py `tiny_encoder_dir`: 4x4 tokens of width 32), 4 latent
    channels, one decoder layer; `overrides` set any other field (e.g. encoder_head_dim=16, decoder_depth=2)."""
    fields: dict[str, Any] = dict(feature_dim=32, grid=(4, 4), latent_channels=4, encoder_heads=2, encoder_head_dim=8,
                                  decoder_depth=1, decoder_heads=2)
    return FAEConfig(**{**fields, **overrides})

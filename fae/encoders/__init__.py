"""Frozen encoders: pretrained image encoders (DINOv2 ± registers, SigLIP2, MAE) in `image.py`; text encoders join
`text.py` holds the text encoders (T5, SigLIP2's text tower, the shipped MiniLM). See docs/encoders.md and
docs/text-to-image.md."""
from fae.encoders.image import (
    DEFAULT_MEAN_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KINDS,
    KNOWN_ENCODERS,
    REFERENCE_KEYS,
    EncoderConfig,
    FrozenEncoder,
    KnownEncoder,
    detect_kind,
    encoder_config_from_spec,
    known_encoder_config,
    reference_differences,
    save_tiny_encoder,
)
from fae.encoders.text import TEXT_KINDS, TextEncoder, TextEncoderConfig, save_tiny_text_encoder

__all__ = [
    "DEFAULT_MEAN_STD", "IMAGENET_MEAN", "IMAGENET_STD", "KINDS", "KNOWN_ENCODERS", "REFERENCE_KEYS", "EncoderConfig",
    "FrozenEncoder", "KnownEncoder", "detect_kind", "encoder_config_from_spec",
    "known_encoder_config", "reference_differences", "save_tiny_encoder",
    "TEXT_KINDS", "TextEncoder", "TextEncoderConfig", "save_tiny_text_encoder",
]

"""Frozen encoders: pretrained image encoders (DINOv2 ± registers, SigLIP2, MAE) in `image.py`; text encoders join
them here. See docs/encoders.md."""
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
    known_encoder_config,
    reference_differences,
    save_tiny_encoder,
)

__all__ = [
    "DEFAULT_MEAN_STD", "IMAGENET_MEAN", "IMAGENET_STD", "KINDS", "KNOWN_ENCODERS", "REFERENCE_KEYS", "EncoderConfig",
    "FrozenEncoder", "KnownEncoder", "detect_kind", "known_encoder_config", "reference_differences", "save_tiny_encoder",
]

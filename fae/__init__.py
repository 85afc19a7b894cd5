"""fae: Feature Auto-Encoders (arXiv 2512.07829) — frozen encoder -> one-attention-layer latent -> generators."""
__version__ = "0.1.0"

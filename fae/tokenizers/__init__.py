"""Latent spaces: images <-> latents. `FAE` (fae.tokenizers.fae) is the paper's: a frozen encoder, the one-attention-layer
FeatureAutoEncoder and the pixel decoder, saved as one bundle folder (`tokenizer/`; older runs wrote `tokenizer/`)."""
from fae.io import TOKENIZER_FOLDERS, find_autoencoder_bundle
from fae.tokenizers.fae import FAE

__all__ = ["FAE", "TOKENIZER_FOLDERS", "find_autoencoder_bundle"]

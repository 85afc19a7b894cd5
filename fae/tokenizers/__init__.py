"""Latent spaces: images <-> latents, each one unit behind the `Tokenizer` interface (fae.tokenizers.base) and named
by kind in a registry. `FAE` (fae.tokenizers.fae) is the paper's: a frozen encoder, the one-attention-layer
FeatureAutoEncoder and the pixel decoder, saved as one bundle folder (`tokenizer/`; runs before 0.2 wrote
`fae_pipeline/`). fae.tokenizers.baselines holds the paper's baselines through diffusers (SD-VAE, VA-VAE, RAE)."""
from fae.io import TOKENIZER_FOLDERS, find_autoencoder_bundle, state_dict_sha256
from fae.tokenizers.base import (
    Tokenizer,
    TokenizerKind,
    check_tokenizer,
    load_tokenizer,
    parse_tokenizer_spec,
    register_tokenizer,
    tokenizer_kinds,
    unregister_tokenizer,
)
from fae.tokenizers.fae import FAE

__all__ = ["FAE", "TOKENIZER_FOLDERS", "Tokenizer", "TokenizerKind", "check_tokenizer", "find_autoencoder_bundle",
           "load_tokenizer", "parse_tokenizer_spec", "register_tokenizer", "state_dict_sha256", "tokenizer_kinds",
           "unregister_tokenizer"]

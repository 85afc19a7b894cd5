"""The paper's baseline latent spaces through diffusers (SD-VAE, VA-VAE, RAE, DC-AE): being written."""

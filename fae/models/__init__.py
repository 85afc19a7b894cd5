"""The networks, and nothing of training: the feature auto-encoder (`autoencoder`), the pixel decoder
(`pixel_decoder`) and the diffusion transformer (`dit`), each with its config dataclass. They import only the
shared blocks (`fae.nn`) and the ground floor (`fae.io`)."""

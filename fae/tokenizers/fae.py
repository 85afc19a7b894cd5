"""`FAE`: the whole image <-> latent path in one object — frozen encoder, FeatureAutoEncoder, pixel decoder.

    fae = FAE.load("runs/pixel-decoder-ft")   # the fine-tune run, or its tokenizer/ bundle
    z = fae.encode(images)             # (B,3,H,W) in [0,1] -> latents (B,C,h,w)
    images = fae.decode_to_pixels(z)   # -> (B,3,H,W) in [0,1]

A bundle folder (a run's `tokenizer/`; runs before 0.2 wrote `fae_pipeline/`, which loads the same) holds
`config.json` (class "FAE" and the frozen encoder's reference: kind, hub id or folder, revision, input size, norm,
weights hash), `fae/` (the FeatureAutoEncoder bundle), `pixel_decoder/` (the PixelDecoder bundle) and, for a local
encoder up to `fae.encoders.image.BUNDLE_COPY_LIMIT`, `encoder/` (its copy, which `fae/` and `pixel_decoder/` name too):
the folder then loads from anywhere. A larger encoder is named by absolute path + hash (docs/encoders.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fae.config import ConfigError
from fae.encoders import FrozenEncoder
from fae.io import (
    CONFIG_NAME,
    TOKENIZER_FOLDERS,
    WEIGHTS_NAME,
    atomic_write_text,
    check_same_encoder,
    file_sha256,
    find_autoencoder_bundle,
    find_bundle,
    nested_reference,
    read_bundle_config,
    require_bundle,
    resolve_pretrained,
    state_dict_sha256,
)
from fae.models.autoencoder import FeatureAutoEncoder, check_encoder_shape
from fae.models.pixel_decoder import PixelDecoder
from fae.speed import compile_in_place, compile_wanted
from fae.tokenizers.base import Tokenizer, TokenizerKind, register_tokenizer


class FAE(nn.Module, Tokenizer):
    """Frozen encoder + FeatureAutoEncoder (+ pixel decoder). Everything runs in eval mode without gradients.
    As a `Tokenizer` (kind "fae") its identity is the SHA-256 of the FeatureAutoEncoder's weights file: the part that
    makes the latents (a fine-tuned pixel decoder decodes the same latents)."""

    kind = "fae"

    def __init__(self, encoder: FrozenEncoder, autoencoder: FeatureAutoEncoder,
                 pixel_decoder: PixelDecoder | None = None) -> None:
        super().__init__()
        check_encoder_shape(autoencoder.config, encoder)
        if pixel_decoder is not None and (pixel_decoder.config.in_dim != encoder.dim
                                          or pixel_decoder.config.num_tokens != encoder.num_tokens):
            raise ConfigError(f"the pixel decoder expects {pixel_decoder.config.num_tokens} x "
                              f"{pixel_decoder.config.in_dim} features, the encoder gives {encoder.num_tokens} x {encoder.dim}")
        self.encoder, self.autoencoder, self.pixel_decoder = encoder, autoencoder, pixel_decoder
        self.fae_weights_sha256: str | None = None    # set when loaded from a bundle
        self.source: Path | None = None               # the bundle it was loaded from
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> FAE:
        path = resolve_pretrained(path)
        record = read_bundle_config(path)
        if record.get("class") != cls.__name__:
            raise ConfigError(f"{path}: bundle holds a {record.get('class')}, not an FAE (frozen encoder + FAE + "
                              "pixel decoder)")
        decoder = path / "pixel_decoder" if (path / "pixel_decoder").is_dir() else None
        model = cls._assemble(record["encoder"], path / "fae", decoder, map_location)
        model.source = path.resolve()
        return model

    @classmethod
    def from_parts(cls, fae_bundle: str | Path, pixel_decoder_bundle: str | Path | None = None,
                   map_location: str | torch.device = "cpu") -> FAE:
        """Assemble from a stage-1 FAE bundle and a pixel-decoder bundle; both must name the same encoder."""
        record = read_bundle_config(fae_bundle)
        if "encoder" not in record:
            raise ConfigError(f"{fae_bundle}: the FAE bundle does not record its frozen encoder")
        if pixel_decoder_bundle is not None:
            check_same_encoder(read_bundle_config(pixel_decoder_bundle).get("encoder"), record["encoder"],
                               str(pixel_decoder_bundle), str(fae_bundle))
        model = cls._assemble(record["encoder"], Path(fae_bundle), pixel_decoder_bundle, map_location)
        model.source = Path(fae_bundle).resolve()   # its reference then needs --pixel-decoder again
        return model

    @classmethod
    def load(cls, fae: str | Path, pixel_decoder: str | Path | None = None, map_location: str | torch.device = "cpu"
             ) -> FAE:
        """What a user names on the command line: an FAE bundle with its pixel decoder (or a run folder holding
        tokenizer/), or a stage-1 FAE bundle (or its run folder) plus a pixel-decoder bundle (or its run folder)."""
        pipeline = find_bundle(Path(fae), TOKENIZER_FOLDERS, classes=[cls.__name__])
        if pipeline is not None and pixel_decoder is None:
            return cls.from_pretrained(pipeline, map_location)
        stage1 = require_bundle(fae, "fae", classes=[FeatureAutoEncoder.__name__])
        if pixel_decoder is None:
            raise ConfigError(f"{stage1} is a stage-1 FAE bundle without a pixel decoder: pass --pixel-decoder "
                              "<bundle> (train one with `fae train pixel-decoder`), or --fae the pixel-decoder fine-tune run "
                              "(its tokenizer/ bundle)")
        return cls.from_parts(stage1, require_bundle(pixel_decoder, "pixel_decoder", classes=[PixelDecoder.__name__]),
                              map_location)

    @classmethod
    def _assemble(cls, encoder_reference: dict, fae_dir: Path, pixel_decoder: str | Path | None,
                  map_location: str | torch.device) -> FAE:
        decoder = PixelDecoder.from_pretrained(pixel_decoder, map_location) if pixel_decoder is not None else None
        model = cls(FrozenEncoder.from_reference(encoder_reference),
                    FeatureAutoEncoder.from_pretrained(fae_dir, map_location), decoder).to(map_location)
        # its identity, for generator bundles: the hash its config.json records (from_pretrained has just checked it
        # against the file), or the file's own for bundles written before that field; a decoder noise-tuned for a flow
        # (fae.stages.autoencoder, latent_noise_flow) keeps the encoder, so it names the latent space it started from
        record = read_bundle_config(fae_dir)
        model.fae_weights_sha256 = (record.get("latent_space_sha256") or record.get("weights_sha256")
                                    or file_sha256(Path(fae_dir) / WEIGHTS_NAME))
        return model

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        ref = self.encoder.bundle_reference(directory)
        self.autoencoder.save_pretrained(directory / "fae", extra={"encoder": nested_reference(ref)})
        if self.pixel_decoder is not None:
            self.pixel_decoder.save_pretrained(directory / "pixel_decoder", extra={"encoder": nested_reference(ref)})
        atomic_write_text(directory / CONFIG_NAME, json.dumps({"class": type(self).__name__, "encoder": ref}, indent=2))
        return directory

    def compile_networks(self, mode: str = "on", device: torch.device | str | None = None) -> bool:
        """torch.compile, in place, the FAE encoder, feature decoder and pixel decoder when `mode` (auto | on | off,
        fae.speed) says so on `device` (default: where the FAE is); the frozen encoder stays as loaded. Returns
        whether it compiled."""
        device = device if device is not None else next(self.autoencoder.parameters()).device
        if not compile_wanted(mode, device):
            return False
        for module in (self.autoencoder.encoder, self.autoencoder.decoder, self.pixel_decoder):
            if module is not None:
                compile_in_place(module)
        return True

    def train(self, mode: bool = True) -> FAE:
        return super().train(False)  # inference object: never training mode

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Images (B,3,H,W) in [0,1] -> latents (B,C,h,w): the posterior mean, or a sample with `sample=True`."""
        posterior = self.autoencoder.encode(self.encoder(images))
        return posterior.sample(generator) if sample else posterior.mode()

    @torch.no_grad()
    def decode_features(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B,C,h,w) -> reconstructed encoder features x_hat (B,N,D)."""
        return self.autoencoder.decode(z)

    @torch.no_grad()
    def decode_to_pixels(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B,C,h,w) -> images (B,3,H,W) in [0,1], through the feature decoder and the pixel decoder."""
        if self.pixel_decoder is None:
            raise ConfigError("this FAE bundle has no pixel decoder; train one with `fae train pixel-decoder` and "
                              "assemble with FAE.from_parts(fae_bundle, pixel_decoder_bundle)")
        return self.pixel_decoder.decode(self.decode_features(z))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode_to_pixels(self.encode(images))

    # ---------------------------------------------------------------------------------------- the Tokenizer side
    def latent_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        """(C, h, w): fixed by the FAE's token grid (the frozen encoder resizes its input)."""
        cfg = self.autoencoder.config
        return (cfg.latent_channels, *cfg.grid)

    @property
    def device(self) -> torch.device:  # type: ignore[override]  # the Tokenizer attribute, read from the weights
        return next(self.autoencoder.parameters()).device

    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            posterior = self.autoencoder.encode(self.encoder(images))
        return posterior.mode(), posterior.std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_to_pixels(latents)

    @property
    def identity(self) -> str:
        if self.fae_weights_sha256 is None:  # built in memory, never saved: the weights themselves
            return state_dict_sha256(self.autoencoder)
        return self.fae_weights_sha256

    def reference(self) -> dict:
        return {"kind": self.kind, "path": str(self.source) if self.source else None}

    def describe(self) -> str:
        return f"FAE {self.source or '(in memory)'}"


def _recognises(path: Path) -> bool:
    try:
        find_autoencoder_bundle(path)
    except (ConfigError, FileNotFoundError):
        return False
    return True


def _load(path: str | None, device: str | torch.device = "cpu", **options: object) -> FAE:
    if not path:
        raise ConfigError("an FAE tokenizer needs the folder of its bundle: --tokenizer <pixel-decoder fine-tune run "
                          "or its tokenizer/ bundle>")
    if options:
        raise ConfigError(f"an FAE tokenizer takes no options, got {sorted(options)}")
    return FAE.load(path, map_location=device)


register_tokenizer(TokenizerKind("fae", _load, _recognises, "the paper's: frozen encoder + one-layer FAE + pixel "
                                 "decoder (a pixel-decoder fine-tune run or its tokenizer/ bundle)"))

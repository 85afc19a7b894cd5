"""`fae encode` as a library call: a data set through the frozen encoder and an FAE bundle into a latent cache
(fae.data.latents holds the cache format; this module brings the networks to it, so the data room knows none)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fae import distributed as D
from fae.data import build_dataset
from fae.data.features import FeatureCache, dataset_signature
from fae.data.latents import TEXT_NULL, CachedFeatureRows, EncodeOptions, encode_dataset, make_latent_fn
from fae.encoders import EncoderConfig, FrozenEncoder, TextEncoder, TextEncoderConfig
from fae.io import WEIGHTS_NAME, check_same_encoder, file_sha256, read_bundle_config, resolve_pretrained
from fae.models.autoencoder import FeatureAutoEncoder
from fae.precision import resolve_precision


def encode_latents(data: Any, out_dir: str | Path, fae: str | Path | None = None, encoder: Any | None = None,
                   split: str | None = None, options: EncodeOptions | None = None, device: str = "auto",
                   progress: bool = True, feature_cache: str | Path | None = None,
                   text_encoder: Any | None = None) -> Path:
    """`fae encode`: the data set of `data` (a DataConfig or a Dataset) through the frozen encoder and the FAE
    bundle `fae` into a latent cache at `out_dir`.

    The frozen encoder is the one the FAE bundle records, unless `encoder` (an EncoderConfig or a FrozenEncoder)
    is given. With `options.source="raw_features"` no FAE is used (but its bundle may still name the encoder).
    `feature_cache`: a feature cache of the same encoder and data set (fae.data.features, e.g. the one stage 1
    wrote); its features are used instead of running the encoder again.
    `text_encoder` (a TextEncoderConfig or a TextEncoder): `data` is a caption data set (fae.data.captions) and the
    captions' text embeddings are cached with the latents, for `fae train mmdit`.
    """
    opts = options or EncodeOptions()
    opts.validate()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if D.is_distributed() and dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    record: dict[str, Any] = {"fae": None}
    fae_model = None
    if fae is not None:
        bundle = resolve_pretrained(fae)
        bundle_record = read_bundle_config(bundle)
        record["fae"] = {"path": str(Path(bundle).resolve()), "weights_sha256": file_sha256(bundle / WEIGHTS_NAME)}
        if opts.source == "fae":
            fae_model = FeatureAutoEncoder.from_pretrained(bundle).to(dev).eval()
        if encoder is None:
            if "encoder" not in bundle_record:
                raise ValueError(f"{bundle}: the FAE bundle records no frozen encoder; pass one with --encoder")
            encoder = EncoderConfig(**bundle_record["encoder"])
    elif opts.source == "fae":
        raise ValueError("source=fae needs the FAE bundle (--fae); for raw encoder features use source=raw_features")
    if encoder is None:
        raise ValueError("no frozen encoder: pass --encoder (a config) or an FAE bundle that records one")
    if isinstance(encoder, EncoderConfig):
        encoder = FrozenEncoder.from_config(encoder)
    encoder = encoder.to(dev).eval()
    if fae is not None and "encoder" in bundle_record:
        check_same_encoder(bundle_record["encoder"], encoder.reference(), f"FAE bundle {fae}", "the encoder given")
    if fae_model is not None and (tuple(fae_model.config.grid) != tuple(encoder.grid)
                                  or fae_model.config.feature_dim != encoder.dim):
        raise ValueError(f"the FAE bundle expects {list(fae_model.config.grid)} x {fae_model.config.feature_dim} "
                         f"features, the encoder gives {list(encoder.grid)} x {encoder.dim}")
    record["encoder"] = encoder.reference()
    if isinstance(data, Dataset):
        dataset = data
    else:
        dataset = build_dataset(data, split)
    if feature_cache is not None:
        cache = FeatureCache(feature_cache)
        if cache.metadata.get("dataset") != json.dumps(dataset_signature(dataset), sort_keys=True):
            raise ValueError(f"feature cache {feature_cache} was built for another data set than the one to encode")
        check_same_encoder(cache.encoder, encoder.reference(), f"feature cache {feature_cache}", "the encoder to encode with")
        if opts.flip and not cache.has_flips:
            raise ValueError(f"feature cache {feature_cache} holds no flipped features; encode with --no-flip or "
                             "without the cache")
        dataset = CachedFeatureRows(dataset, cache, opts.flip)
    text_fn = None
    if text_encoder is not None:
        if isinstance(text_encoder, TextEncoderConfig):
            text_encoder = TextEncoder.from_config(text_encoder)
        text_encoder = text_encoder.to(dev)
        record["text"] = {"encoder": text_encoder.reference(), "null": TEXT_NULL}
        text_fn = text_encoder.encode
    precision = resolve_precision(opts.precision, dev)
    if fae_model is not None:  # the resolved name only: the evidence (timings) would change the cache's signature
        record["fae_precision"] = precision.name
    latent_fn = make_latent_fn(encoder, fae_model, opts.source, tuple(encoder.grid), opts.store_std,
                               autocast=precision.autocast)
    return encode_dataset(latent_fn, dataset, out_dir, opts, dev, record, progress, text_fn=text_fn)

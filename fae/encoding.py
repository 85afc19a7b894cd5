"""`fae encode` as a library call: a data set through the frozen encoder and an FAE into a latent cache. This room
holds the procedure (options, the latent function, the sharded and resumable loop, the networks it loads);
fae.data.latents holds only the cache format (shards, statistics, manifest) and its readers.

    encode_latents(DataConfig(kind="fashion_mnist"), "runs/latents", fae="runs/fae")   # a bundle or its run folder
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from fae import distributed as D
from fae.config import ConfigError
from fae.data import build_dataset
from fae.data.features import FeatureCache, batched_halves, dataset_signature
from fae.data.latents import (
    TEXT_NULL,
    CachedFeatureRows,
    CacheLayout,
    LatentFn,
    ShardWriter,
    Source,
    TextFn,
    shard_done,
    shard_name,
    write_cache_manifest,
)
from fae.data.loading import loader_options, num_items
from fae.data.readable import WithIndex, collate_present
from fae.encoders import EncoderConfig, FrozenEncoder, TextEncoder, TextEncoderConfig
from fae.io import (
    WEIGHTS_NAME,
    atomic_save_safetensors,
    check_same_encoder,
    file_sha256,
    find_autoencoder_bundle,
    read_bundle_config,
    remove_stale_temporaries,
)
from fae.models.autoencoder import FeatureAutoEncoder, check_encoder_shape
from fae.precision import DTYPES, PRECISIONS, Precision, resolve_precision
from fae.tokenizers import FAE, Tokenizer, load_tokenizer, parse_tokenizer_spec, tokenizer_kinds


@dataclass
class EncodeOptions:
    source: Source = "fae"
    flip: bool = True                 # also store the latents of the horizontally flipped images
    store_std: bool = False           # also store the posterior std (not for raw features)
    shard_size: int = 10000
    batch_size: int = 256
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    text_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # text states: L x Dt per item, the bulk
    num_workers: int = 0
    precision: Precision = "auto"     # the FAE encoder's compute (fae.precision); the frozen encoder has its own

    def layout(self) -> CacheLayout:
        return CacheLayout(self.source, self.flip, self.store_std, self.dtype, self.text_dtype)

    def validate(self) -> None:
        """Raises ConfigError naming the bad option."""
        if self.shard_size < 1 or self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("shard_size and batch_size must be positive, num_workers >= 0")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {list(PRECISIONS)}, not {self.precision!r}")
        if self.store_std and self.source == "raw_features":
            raise ConfigError("store_std needs a posterior (source=fae or a tokenizer); raw features have none")
        if self.dtype not in DTYPES or self.text_dtype not in DTYPES:
            raise ConfigError(f"dtype and text_dtype must be one of {list(DTYPES)}, got {self.dtype!r}, "
                              f"{self.text_dtype!r}")


def make_latent_fn(encoder: Callable[[torch.Tensor], torch.Tensor] | None, fae: Any | None, source: Source,
                   grid: tuple[int, ...], store_std: bool = False,
                   autocast: Callable[[], Any] = contextlib.nullcontext) -> LatentFn:
    """The latents of a batch holding "image" (B,3,H,W) in [0,1], or cached encoder features "features" /
    "features_flip" (B,N,D), which then skip the encoder. With `with_flip`, the plain and the h-flipped images go
    through the encoder and the FAE together on a GPU, one after the other on a CPU (`batched_halves`).
    `autocast()` is the precision the FAE encoder runs in (the frozen encoder keeps its own); outputs are float32."""

    def latents(features: torch.Tensor) -> dict[str, torch.Tensor]:
        features = features.float()
        if source == "raw_features":
            b, n, d = features.shape
            return {"latents": features.transpose(1, 2).reshape(b, d, *grid)}
        if fae is None:
            raise ConfigError("source=fae needs the FAE")
        with autocast():
            posterior = fae.encode(features)
        out = {"latents": posterior.mean.float()}
        if store_std:
            out["std"] = posterior.std.float()
        return out

    @torch.no_grad()
    def fn(batch: dict[str, torch.Tensor], with_flip: bool) -> dict[str, torch.Tensor]:
        cached = "features" in batch
        if cached:
            inputs = [batch["features"], *([batch["features_flip"]] if with_flip else [])]
        else:
            if encoder is None:
                raise ValueError("no encoder and no cached features in the batch")
            inputs = [batch["image"], *([batch["image"].flip(-1)] if with_flip else [])]
        outs = batched_halves(lambda x: latents(x if cached else encoder(x)), inputs)  # type: ignore[misc]  # encoder is set when not cached
        return {**outs[0], **({f"{k}_flip": v for k, v in outs[1].items()} if with_flip else {})}

    return fn


def make_tokenizer_latent_fn(tokenizer: Tokenizer, store_std: bool = False) -> LatentFn:
    """The latents of a batch's "image" (B,3,H,W) in [0,1] (and of its h-flip) under any tokenizer."""

    def latents(images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not store_std:
            return {"latents": tokenizer.encode(images).float()}
        mean, std = tokenizer.encode_distribution(images)
        if std is None:
            raise ConfigError(f"store_std: the {tokenizer.kind} tokenizer is deterministic (it has no posterior std)")
        return {"latents": mean.float(), "std": std.float()}

    @torch.no_grad()
    def fn(batch: dict[str, torch.Tensor], with_flip: bool) -> dict[str, torch.Tensor]:
        images = batch["image"]
        outs = batched_halves(latents, [images, *([images.flip(-1)] if with_flip else [])])
        return {**outs[0], **({f"{k}_flip": v for k, v in outs[1].items()} if with_flip else {})}

    return fn


@torch.no_grad()
def encode_dataset(latent_fn: LatentFn, dataset: Dataset,
                   out_dir: str | Path, options: EncodeOptions | None = None, device: torch.device | str = "cpu",
                   record: dict[str, Any] | None = None, progress: bool = True, text_fn: TextFn | None = None
                   ) -> Path:
    """Encode every item of `dataset` (integer keys: no augmentation) into shards under `out_dir`, then compute the
    statistics and write the manifest. With `text_fn`, items carry a "caption", whose text embeddings are stored
    beside the latents. Shards already written by an interrupted run with the same settings are
    kept. Under torchrun each process encodes shards rank, rank + W, ...; rank 0 writes statistics and manifest.

    `record` is stored in the manifest (e.g. the FAE bundle and encoder references).
    """
    from tqdm.auto import tqdm

    opts = options or EncodeOptions()
    opts.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = num_items(dataset)
    if n == 0:
        raise ConfigError("cannot encode an empty data set")
    num_shards = math.ceil(n / opts.shard_size)
    signature = json.dumps({"data": dataset_signature(dataset), "record": record or {},
                            "options": {k: v for k, v in opts.__dict__.items() if k != "num_workers"}}, sort_keys=True)
    rank, world = D.rank(), D.world_size()
    if rank == 0:
        remove_stale_temporaries(out)   # a killed run's half-written shard; its shard is encoded again below
    D.barrier()
    mine = [s for s in range(num_shards) if s % world == rank]
    ranges = {s: range(s * opts.shard_size, min(n, (s + 1) * opts.shard_size)) for s in mine}
    bar = tqdm(total=sum(len(r) for r in ranges.values()), desc=f"encode -> {out.name}",
               disable=not (progress and rank == 0), dynamic_ncols=True)
    todo = []
    for s, rows in ranges.items():
        if shard_done(out / shard_name(s), signature, len(rows)):
            bar.update(len(rows))
        else:
            todo.append(s)
    # one loader over every shard this process still has to write (its workers start once); batches never cross
    # a shard boundary, so a shard's batches are the same whichever process encodes it, and so are its bytes
    plan = [(s, list(ranges[s][i:i + opts.batch_size])) for s in todo for i in range(0, len(ranges[s]), opts.batch_size)]
    loader = DataLoader(WithIndex(dataset), batch_sampler=[items for _, items in plan], collate_fn=collate_present,
                        **loader_options(opts.num_workers if plan else 0, device))
    shard: ShardWriter | None = None
    for (s, items), batch in zip(plan, loader, strict=True):  # the loader yields one batch per plan entry
        if shard is None or shard.index != s:
            if shard is not None:
                shard.save(dataset, signature)
            shard = ShardWriter(out, s, ranges[s], opts.layout())
        bar.update(len(items))
        if batch is None:
            continue
        shard.add(batch, latent_fn, device, dataset, text_fn)
    if shard is not None:
        shard.save(dataset, signature)
    bar.close()
    D.barrier()
    if rank == 0:
        if text_fn is not None:  # the empty prompt: the null condition of caption dropout and guidance
            null = {k: v.cpu() if k == "text_mask" else v.float().cpu() for k, v in text_fn([""]).items()}
            atomic_save_safetensors(null, out / TEXT_NULL)
        write_cache_manifest(out, signature, num_shards, opts.layout(), record or {}, dataset_signature(dataset), dataset)
    D.barrier()
    return out


def encode_latents(data: Any, out_dir: str | Path, fae: str | Path | None = None, encoder: Any | None = None,
                   split: str | None = None, options: EncodeOptions | None = None, device: str = "auto",
                   progress: bool = True, feature_cache: str | Path | None = None,
                   text_encoder: Any | None = None, tokenizer: str | Path | dict[str, Any] | Tokenizer | None = None
                   ) -> Path:
    """`fae encode`: the data set of `data` (a DataConfig or a Dataset) through the frozen encoder and the FAE
    bundle `fae` into a latent cache at `out_dir`.

    The frozen encoder is the one the FAE bundle records, unless `encoder` (an EncoderConfig or a FrozenEncoder)
    is given. With `options.source="raw_features"` no FAE is used (but its bundle may still name the encoder).
    `fae` is a stage-1 FAE bundle, the run folder holding it, or an FAE bundle with a pixel decoder (or its run).
    Every mistake a caller can make (a missing or mismatched bundle, cache or option) raises ConfigError.
    `feature_cache`: a feature cache of the same encoder and data set (fae.data.features, e.g. the one stage 1
    wrote); its features are used instead of running the encoder again.
    `text_encoder` (a TextEncoderConfig or a TextEncoder): `data` is a caption data set (fae.data.captions) and the
    captions' text embeddings are cached with the latents, for `fae train mmdit`.
    `tokenizer`: any latent space instead (fae.tokenizers: what `--tokenizer` names, a reference, or a Tokenizer);
    one of kind "fae" goes the FAE way above (its stage-1 bundle, feature caches), any other is run on the images.
    """
    opts = options or EncodeOptions()
    opts.validate()
    dev = D.resolve_device(device)
    if D.is_distributed() and dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    dataset = data if isinstance(data, Dataset) else build_dataset(data, split)
    if tokenizer is not None:
        tokenizer, fae = _tokenizer_or_fae(tokenizer, fae, encoder, opts, dev)
    if isinstance(tokenizer, Tokenizer):
        if feature_cache is not None:
            raise ConfigError(f"a feature cache holds frozen-encoder features; the {tokenizer.kind} tokenizer reads "
                              "images: drop --feature-cache")
        opts = replace(opts, source="tokenizer")
        record: dict[str, Any] = {"fae": None, "encoder": None, "tokenizer": _tokenizer_record(tokenizer, dataset)}
        return encode_dataset(make_tokenizer_latent_fn(tokenizer, opts.store_std), dataset, out_dir, opts, dev,
                              record, progress, text_fn=_text_fn(text_encoder, dev, record))
    record, fae_model, frozen = _networks(fae, encoder, opts, dev)
    if feature_cache is not None:
        dataset = _cached_features(dataset, feature_cache, frozen, opts)
    text_fn = _text_fn(text_encoder, dev, record)
    precision = resolve_precision(opts.precision, dev)
    if fae_model is not None:  # the resolved name only: the evidence (timings) would change the cache's signature
        record["fae_precision"] = precision.name
    latent_fn = make_latent_fn(frozen, fae_model, opts.source, tuple(frozen.grid), opts.store_std,
                               autocast=precision.autocast)
    return encode_dataset(latent_fn, dataset, out_dir, opts, dev, record, progress, text_fn=text_fn)


def _text_fn(text_encoder: Any | None, dev: torch.device, record: dict[str, Any]) -> TextFn | None:
    """The caption embedder of a caption data set (recorded under "text"), or None."""
    if text_encoder is None:
        return None
    if isinstance(text_encoder, TextEncoderConfig):
        try:
            text_encoder.validate()
        except ValueError as exc:
            raise ConfigError(f"text encoder: {exc}") from None
        text_encoder = TextEncoder.from_config(text_encoder)
    text_encoder = text_encoder.to(dev)
    record["text"] = {"encoder": text_encoder.reference(), "null": TEXT_NULL}
    return text_encoder.encode


def _tokenizer_or_fae(tokenizer: Any, fae: str | Path | None, encoder: Any | None, opts: EncodeOptions,
                      dev: torch.device) -> tuple[Tokenizer | None, str | Path | None]:
    """The tokenizer to run on the images, or (None, the FAE bundle) when `tokenizer` names an FAE."""
    if fae is not None:
        raise ConfigError("give --tokenizer or --fae, not both (an FAE is one tokenizer: --tokenizer <its run>)")
    if opts.source == "raw_features":
        raise ConfigError("source=raw_features stores the frozen encoder's features: give --fae (or --encoder), "
                          "not --tokenizer")
    if isinstance(tokenizer, FAE):
        if tokenizer.source is None:
            raise ConfigError("an FAE built in memory has no bundle to encode with: save_pretrained it first")
        return None, tokenizer.source
    if not isinstance(tokenizer, Tokenizer):
        parsed = parse_tokenizer_spec(tokenizer)
        if isinstance(parsed, dict) and parsed["kind"] == "fae":
            return None, parsed.get("path")   # the FAE way: its stage-1 bundle (feature caches, --encoder)
        if isinstance(parsed, Path) and tokenizer_kinds()["fae"].recognises(parsed):
            return None, parsed
        tokenizer = load_tokenizer(parsed, device=dev)
    if encoder is not None:
        raise ConfigError(f"--encoder names an FAE's frozen encoder; the {tokenizer.kind} tokenizer has its own")
    return tokenizer.to(dev), None


def _tokenizer_record(tokenizer: Tokenizer, dataset: Dataset) -> dict[str, Any]:
    """What a cache (and every generator trained on it) records of a tokenizer; the image size of the data set
    fixes a VAE's latent grid, so sampling can check the shape."""
    first = dataset[0]
    image_size = int(first["image"].shape[-1]) if isinstance(first, dict) and "image" in first else None
    return {"kind": tokenizer.kind, "sha256": tokenizer.identity, "reference": tokenizer.reference(),
            "image_size": image_size}


def _networks(fae: str | Path | None, encoder: Any | None, opts: EncodeOptions, dev: torch.device
              ) -> tuple[dict[str, Any], FeatureAutoEncoder | None, FrozenEncoder]:
    """The cache record's FAE and encoder references, the FAE (None for raw features) and the frozen encoder: the one
    the FAE bundle records unless `encoder` is given (then both must agree)."""
    record: dict[str, Any] = {"fae": None}
    fae_model, bundle_record = None, {}
    if fae is not None:
        bundle = find_autoencoder_bundle(fae)
        bundle_record = read_bundle_config(bundle)
        record["fae"] = {"path": str(Path(bundle).resolve()), "weights_sha256": file_sha256(bundle / WEIGHTS_NAME)}
        if opts.source == "fae":
            fae_model = FeatureAutoEncoder.from_pretrained(bundle).to(dev).eval()
        if encoder is None:
            if "encoder" not in bundle_record:
                raise ConfigError(f"{bundle}: the FAE bundle records no frozen encoder; pass one with --encoder")
            encoder = FrozenEncoder.from_reference(bundle_record["encoder"])
    elif opts.source == "fae":
        raise ConfigError("source=fae needs the FAE bundle (--fae); for raw encoder features use source=raw_features")
    if encoder is None:
        raise ConfigError("no frozen encoder: pass --encoder (a config) or an FAE bundle that records one")
    if isinstance(encoder, EncoderConfig):
        encoder = FrozenEncoder.from_config(encoder)
    encoder = encoder.to(dev).eval()
    if "encoder" in bundle_record:
        check_same_encoder(bundle_record["encoder"], encoder.reference(), f"FAE bundle {fae}", "the encoder given")
    if fae_model is not None:
        check_encoder_shape(fae_model.config, encoder, "the FAE bundle")
    record["encoder"] = encoder.reference()
    return record, fae_model, encoder


def _cached_features(dataset: Dataset, feature_cache: str | Path, encoder: FrozenEncoder, opts: EncodeOptions
                     ) -> Dataset:
    """The data set's rows from a feature cache of the same encoder and data (the encoder is then not run)."""
    cache = FeatureCache(feature_cache)
    if cache.metadata.get("dataset") != json.dumps(dataset_signature(dataset), sort_keys=True):
        raise ConfigError(f"feature cache {feature_cache} was built for another data set than the one to encode")
    check_same_encoder(cache.encoder, encoder.reference(), f"feature cache {feature_cache}", "the encoder to encode with")
    if opts.flip and not cache.has_flips:
        raise ConfigError(f"feature cache {feature_cache} holds no flipped features; encode with --no-flip or "
                          "without the cache")
    return CachedFeatureRows(dataset, cache, opts.flip)

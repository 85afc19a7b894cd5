"""Stage 1 (paper stage Ia): train the single-attention encoder and the feature decoder on frozen features.

Loss: ||x_hat - x||^2 + beta * KL (eq. 4.1). Features come from the frozen encoder on the fly, or from a feature
cache computed once (small data sets). The exported bundle records which frozen encoder it belongs to.

`init_from` starts from a trained FAE's weights (a bundle or a run folder: fae.init_from.initialise_from). With
`latent_noise_flow` (a STARFlow run or bundle) the run is STARFlow's decoder fine-tune on FAE (docs/flow.md,
"Sampling without the score step"): the FAE encoder is frozen and the feature decoder learns to map z + noise back to
the features x, the noise being the flow's training noise (`noise_std` in the flow's channel-normalised space, so
std_c * noise_std per channel of z). The bundle then records the latent space it decodes (`latent_space_sha256`, the
starting FAE's identity: the encoder is unchanged) and the noise, so generators trained on the starting FAE's latents
decode with it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from fae import distributed as D
from fae.config import ConfigError
from fae.data import DataConfig, build_dataset
from fae.data.loading import num_items
from fae.encoders import EncoderConfig, FrozenEncoder
from fae.init_from import InitSource, bundle_source
from fae.io import atomic_write_text, cache_root, find_bundle, read_bundle_config
from fae.models.autoencoder import FAEConfig, FeatureAutoEncoder, check_encoder_shape, vae_loss
from fae.training import OptimConfig, TrainConfig, TrainStage


@dataclass
class VAELossConfig:
    kl_weight: float = 1e-4           # beta on per-element KL vs per-element MSE (docs/autoencoder.md)
    sample_posterior: bool = True     # reparameterised z in training; the posterior mean at evaluation

    def validate(self) -> None:
        if self.kl_weight < 0:
            raise ValueError(f"loss.kl_weight must be >= 0, got {self.kl_weight}")


@dataclass
class EvalConfig:
    split: str = "test"
    limit: int | None = 1000          # held-out images scored after training (eval.json)
    batch_size: int = 256


@dataclass
class Config:
    encoder: EncoderConfig
    model: FAEConfig = field(default_factory=FAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    features: Literal["on_the_fly", "cache"] = "on_the_fly"
    feature_cache_dir: str | None = None   # default: <fae.io.cache_root()>/features (~/.cache/fae/features)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, schedule="cosine", warmup_steps=1000))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init_from: str | None = None           # a stage-1 FAE run or bundle: start from its weights
    latent_noise_flow: str | None = None   # a flow run or bundle: fine-tune the feature decoder on its noisy latents


@dataclass
class LatentNoise:
    """The noise a flow was trained with, in the FAE's raw latent units: z + scale_c * N(0, 1) per channel."""
    noise_std: float            # the flow's noise_std (its channel-normalised space)
    scale: torch.Tensor         # (C,) noise_std * the flow's latent std per channel
    fae_sha256: str | None      # the FAE whose latents the flow learned
    source: str


def flow_latent_noise(flow: str | Path) -> LatentNoise:
    """Read a flow run or bundle's training noise and latent statistics (what its sampler sees before the score
    step: x_norm + noise_std * eps, i.e. z + std_c * noise_std * eps in raw latents)."""
    from fae.generators import load_generator
    from fae.generators.flow import FlowGenerator
    from fae.sampling import trained_fae_sha256

    gen = load_generator(flow)
    if not isinstance(gen, FlowGenerator):
        raise ConfigError(f"latent_noise_flow={flow}: not a flow run or bundle (`fae train flow`)")
    return LatentNoise(gen.noise_std, gen.noise_std * gen.std.float().cpu(), trained_fae_sha256(gen), str(flow))


def fae_identity(record: dict[str, Any]) -> str | None:
    """The latent space a stage-1 bundle encodes to: its own weights' hash, or the hash of the FAE it was
    noise-tuned from (same encoder weights)."""
    return record.get("latent_space_sha256") or record.get("weights_sha256")


class FAEStage(TrainStage):
    def __init__(self, cfg: Config, encoder: FrozenEncoder | None = None) -> None:
        self.cfg, self.optim = cfg, cfg.optim
        self.encoder = encoder or FrozenEncoder.from_config(cfg.encoder)
        check_encoder_shape(cfg.model, self.encoder, "model.grid x model.feature_dim")
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed only, not the caller's RNG
            torch.manual_seed(cfg.train.seed)
            self.modules = {"model": FeatureAutoEncoder(cfg.model)}
        self._dataset: Dataset | None = None
        self.init_identity: str | None = None
        if cfg.init_from is not None:
            self._init_from(cfg.init_from)
        self.latent_noise: LatentNoise | None = None
        if cfg.latent_noise_flow is not None:
            if cfg.init_from is None:
                raise ConfigError("latent_noise_flow is set but init_from is not: the noisy-latent fine-tune starts "
                                  "from the FAE whose latents the flow learned (init_from=<stage-1 run or bundle>)")
            self.latent_noise = flow_latent_noise(cfg.latent_noise_flow)
            if self.latent_noise.fae_sha256 not in (None, self.init_identity):
                raise ConfigError(f"latent_noise_flow={cfg.latent_noise_flow} learned the latents of another FAE "
                                  f"(SHA-256 {self.latent_noise.fae_sha256[:12]}), not of init_from={cfg.init_from}")
            if self.latent_noise.scale.numel() != cfg.model.latent_channels:
                raise ConfigError(f"latent_noise_flow: the flow has {self.latent_noise.scale.numel()} latent channels, "
                                  f"the FAE {cfg.model.latent_channels}")
            # the flow was trained on this encoder's latents: only the feature decoder learns
            self.modules["model"].encoder.requires_grad_(False)

    def _init_from(self, path: str) -> None:
        """The starting FAE's identity (the trainer loads its weights: fae.init_from.initialise_from); an unfinished
        run's checkpoint has none."""
        bundle = find_bundle(Path(path), ["fae"], classes=[FeatureAutoEncoder.__name__])
        self.init_identity = fae_identity(read_bundle_config(bundle)) if bundle is not None else None

    def init_bundle(self, path: Path) -> InitSource | None:
        return bundle_source(path, "fae", [FeatureAutoEncoder.__name__], "model")

    def to(self, device: torch.device) -> None:
        self.encoder.to(device)

    def preflight(self) -> None:
        check_held_out_split(self.cfg)

    def train_dataset(self) -> Dataset:
        if self._dataset is None:
            # building a feature cache draws random numbers (DataLoader seeds): keep the trainer's stream intact, so a
            # run that builds the cache and one that reads it train identically
            with torch.random.fork_rng(devices=[]):
                # the loss reads only the features, so a cached run opens no image (images=False)
                self._dataset = features_dataset(self.cfg, self.encoder, self.cfg.data.split, images=False,
                                                 progress=self.progress)
        return self._dataset

    def loss(self, group: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["features"] if "features" in batch else self.encoder(batch["image"])
        if self.latent_noise is not None:
            return self._noisy_latent_loss(x.float())
        x_hat, posterior = self.modules["model"](x.float(), sample=self.cfg.loss.sample_posterior)
        return vae_loss(x, x_hat, posterior, self.cfg.loss.kl_weight)

    def _noisy_latent_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """STARFlow's decoder fine-tune: decode the flow's noisy latents (posterior mean + its training noise, what
        its inverse returns before the score step) back to the clean features."""
        model = self.modules["model"]
        assert self.latent_noise is not None and isinstance(model, FeatureAutoEncoder)
        with torch.no_grad():
            z = model.encode(x).mode()
        noise = torch.randn_like(z) * self.latent_noise.scale.to(z).view(1, -1, 1, 1)
        x_hat = model.decode(z + noise).float()
        mse = torch.nn.functional.mse_loss(x_hat, x)
        cos = torch.nn.functional.cosine_similarity(x_hat, x, dim=-1).mean()
        return mse, {"mse": mse.detach(), "cos": cos.detach(), "noise_rms": noise.pow(2).mean().sqrt()}

    def export(self, out_dir: Path, modules: dict[str, nn.Module]) -> None:
        model = modules["model"]
        assert isinstance(model, FeatureAutoEncoder)
        extra: dict[str, Any] = {"encoder": self.encoder.bundle_reference(out_dir / "fae")}
        if self.latent_noise is not None:
            extra["latent_space_sha256"] = self.init_identity
            extra["latent_noise"] = {"flow": self.latent_noise.source, "noise_std": self.latent_noise.noise_std,
                                     "scale": self.latent_noise.scale.tolist()}
        model.save_pretrained(out_dir / "fae", extra=extra)

    def evaluate(self, out_dir: Path, modules: dict[str, nn.Module]) -> dict[str, Any] | None:
        if self.cfg.eval.limit == 0:
            return None
        scores = evaluate_features(modules["model"], self.encoder, self.cfg)  # type: ignore[arg-type]  # a FeatureAutoEncoder
        if D.is_main():
            atomic_write_text(out_dir / "eval.json", json.dumps(scores, indent=2))
        return scores


def features_dataset(cfg: Any, encoder: FrozenEncoder, split: str, limit: int | None = None,
                     hflip: bool | None = None, images: bool = True, progress: bool = True) -> Dataset:
    """Images, plus cached features when `cfg.features` is `cache` (stage 1 and the pixel-decoder stages share the
    cache files: one per encoder and data set in the cache folder, so the features are computed once).
    `images=False`: with a cache, items hold the features and labels only and no image file is opened."""
    data_cfg = replace(cfg.data, **({} if limit is None else {"limit": limit}), **({} if hflip is None else {"hflip": hflip}))
    dataset = build_dataset(data_cfg, split)
    if cfg.features == "cache":
        data_cfg.require_deterministic("features: cache")
        dataset = cached_features(encoder, dataset, cfg.feature_cache_dir, flips=data_cfg.hflip, images=images,
                                  progress=progress)
    return dataset


def check_held_out_split(cfg: Any) -> None:
    """The split a stage scores on after training exists (both the FAE and the pixel-decoder stages)."""
    if cfg.eval.limit == 0:
        return
    try:
        build_dataset(replace(cfg.data, limit=1), cfg.eval.split)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"eval.split={cfg.eval.split!r}: {exc}. The run scores this split after training; add it, "
                          "name another (eval.split=...), or skip the evaluation (eval.limit=0)") from None


def default_cache_dir() -> Path:
    return cache_root() / "features"


def cached_features(encoder: FrozenEncoder, dataset: Dataset, cache_dir: str | None, flips: bool,
                    images: bool = True, progress: bool = True) -> Dataset:
    """Wrap `dataset` so items carry the encoder's features from a cache built once (by rank 0 under DDP);
    `images=False` leaves the images out (fae.data.features.CachedFeatureDataset)."""
    from fae.data.features import CachedFeatureDataset, build_feature_cache

    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    if D.is_main():
        build_feature_cache(encoder, dataset, folder, flips=flips, progress=progress)
    D.barrier()
    cache = build_feature_cache(encoder, dataset, folder, flips=flips, progress=False)
    return CachedFeatureDataset(dataset, cache, images=images)


@torch.no_grad()
def evaluate_features(model: FeatureAutoEncoder, encoder: FrozenEncoder, cfg: Config) -> dict[str, Any]:
    """Feature cosine similarity and MSE between x_hat (from the posterior mean) and x on held-out images."""
    from fae.data.readable import readable_batches

    dataset = build_dataset(type(cfg.data)(**{**cfg.data.__dict__, "hflip": False, "limit": cfg.eval.limit}), cfg.eval.split)
    # under torchrun each process scores its share
    share = Subset(dataset, D.shard_of(num_items(dataset)))
    device = next(model.parameters()).device
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)   # cos, mse, count
    for batch in readable_batches(share, cfg.eval.batch_size):
        x = encoder(batch["image"].to(device)).float()
        x_hat = model.decode(model.encode(x).mode())
        cos = torch.nn.functional.cosine_similarity(x_hat, x, dim=-1).mean(1).sum().item()
        sums += torch.tensor([cos, (x_hat - x).pow(2).mean((1, 2)).sum().item(), x.shape[0]], dtype=torch.float64)
    cos_sum, mse_sum, count = sum(D.all_gather_objects(sums)).tolist()
    return {"split": cfg.eval.split, "images": int(count), "cos": cos_sum / count, "mse": mse_sum / count}


def build(cfg: Config) -> FAEStage:
    return FAEStage(cfg)


def components(cfg: Config) -> dict[str, nn.Module]:
    model = FeatureAutoEncoder(cfg.model)
    return {"fae encoder (single attention)": model.encoder, "feature decoder": model.decoder}

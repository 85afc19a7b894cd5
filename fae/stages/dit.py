"""Stage 3a: class-conditional LightningDiT / SiT on a latent cache (`fae encode` output), flow matching.

Paper recipe (App. D, LDM column): LightningDiT-XL/1 on 16x16x32 latents, AdamW (0.9, 0.999), lr 1e-4 constant,
no warmup, batch 512, 2M iterations, time shift 0.4. Unstated and chosen here (docs/diffusion.md): EMA 0.9999,
label dropout 0.1, uniform t, shift applied in training and sampling, posterior-mean latents with random flips,
channel-wise normalisation with the cache's exact statistics, gradient clipping at 1.0.

The exported generator bundle (`<out>/dit`) holds the EMA weights, and in config.json the latent statistics, the
latent cache's FAE bundle and encoder references, the transport settings and the class names, so `fae sample`
needs nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fae.config import ConfigError, to_dict
from fae.data.labels import check_class_ids
from fae.data.latents import LatentCache, LatentDataset
from fae.generators import GENERATOR_BUNDLES, GENERATOR_FOLDERS, DiTGenerator, Generator, load_generator
from fae.io import find_bundle
from fae.models.dit import DiT, DiTConfig
from fae.stages.preview import class_conditions, generator_sheets
from fae.training import OptimConfig, TrainConfig, TrainStage
from fae.transport import TransportConfig, flow_matching_loss


@dataclass
class Config:
    latents: str                                          # latent cache folder written by `fae encode`
    model: DiTConfig = field(default_factory=DiTConfig)
    transport: TransportConfig = field(default_factory=lambda: TransportConfig(time_shift=0.4))
    hflip: bool = True                                    # pick the flipped latent for half the samples
    sample_posterior: bool = False                        # z = mean + std * n (needs a cache with --store-std)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, schedule="constant", grad_clip=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=512, ema_decay=0.9999))


def check_model_matches_cache(model: Any, cache: LatentCache) -> None:
    """A DiT, MMDiT or STARFlow config against the latents it will train on."""
    if model.in_channels != cache.channels:
        raise ConfigError(f"model.in_channels={model.in_channels} but the latents in {cache.path} have "
                          f"{cache.channels} channels; set model.in_channels={cache.channels}")
    if tuple(model.input_size) != tuple(cache.grid):
        raise ConfigError(f"model.input_size={list(model.input_size)} but the latents in {cache.path} are "
                          f"{list(cache.grid)}; set model.input_size={list(cache.grid)}")
    if getattr(model, "num_classes", cache.num_classes) < cache.num_classes:  # (text models have no classes)
        raise ConfigError(f"model.num_classes={model.num_classes} but the latent cache has {cache.num_classes} "
                          f"classes; set model.num_classes={cache.num_classes}")
    if getattr(model, "num_classes", 0) > 0:  # the labels the model will read, checked once (not per forward)
        check_class_ids(cache.labels(), model.num_classes, f"labels in the latent cache {cache.path}",
                        error=ConfigError)


class DiTStage(TrainStage):
    supports_fsdp = True   # train.fsdp: FSDP2 over the transformer blocks

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.optim = cfg, cfg.optim
        self.cache = LatentCache(cfg.latents)
        check_model_matches_cache(cfg.model, self.cache)
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed only
            torch.manual_seed(cfg.train.seed)
            self.modules = {"model": DiT(cfg.model)}

    def train_dataset(self) -> Dataset:
        return LatentDataset(self.cache, hflip=self.cfg.hflip and self.cache.manifest["flip"],
                             sample_posterior=self.cfg.sample_posterior)

    def loss(self, group: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # t, noise and label dropout come from the global RNG, which the trainer seeds at every step
        return flow_matching_loss(self.modules["model"], batch["latent"], batch["label"], self.cfg.transport)

    def preview(self, modules: dict[str, nn.Module], step: int) -> dict[str, torch.Tensor] | None:
        model = modules["model"]
        device = next(model.parameters()).device
        labels, names = class_conditions(model.config.num_classes, self.cache.manifest.get("class_names"), device)
        generator = DiTGenerator(model, generator_record(self.cfg, self.cache), "preview", device)  # type: ignore[arg-type]
        return generator_sheets(generator, labels, names)

    def export(self, out_dir: Path, modules: dict[str, nn.Module]) -> None:
        model = modules["model"]
        assert isinstance(model, DiT)
        model.save_pretrained(out_dir / "dit", extra=generator_record(self.cfg, self.cache))


def generator_record(cfg: Config, cache: LatentCache) -> dict[str, Any]:
    """What a DiT bundle records besides its weights (read back by fae.generators)."""
    return {**cache_record(cache), "transport": to_dict(cfg.transport)}


def cache_record(cache: LatentCache) -> dict[str, Any]:
    """What every generator bundle records of the latents it was trained on: their statistics, where they came
    from (FAE weights hash, encoder) and the class names."""
    m = cache.manifest
    fae = m.get("fae")
    return {
        "latent_stats": cache.stats(),
        # the FAE by identity (its weights' SHA-256), not by path: the bundle stays valid wherever files move;
        # the cache path is provenance only, nothing loads through it
        "latents": {"cache": str(Path(cache.path).resolve()), "source": m["source"], "channels": m["channels"],
                    "grid": m["grid"], "fae": {"weights_sha256": fae["weights_sha256"]} if fae else None,
                    "encoder": m.get("encoder")},
        "class_names": m.get("class_names"),
    }


def build(cfg: Config) -> DiTStage:
    return DiTStage(cfg)


def components(cfg: Config) -> dict[str, nn.Module]:
    return {"diffusion transformer": DiT(cfg.model)}


def load_run_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """A DiT bundle or finished run folder (fae.sampling.load_generator), or an unfinished `fae train dit` run
    folder: then the newest checkpoint's EMA weights with the run's config.yaml."""
    from safetensors.torch import load_file

    from fae.stages import load_stage_config
    from fae.training import checkpoint_dirs

    run = Path(path)
    ckpts = checkpoint_dirs(run) if run.is_dir() else []
    if not ckpts or find_bundle(run, GENERATOR_FOLDERS, classes=list(GENERATOR_BUNDLES)) is not None:
        return load_generator(run, device)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is neither a DiT bundle nor a `fae train dit` run folder with checkpoints")
    _, cfg = load_stage_config(run / "config.yaml", stage="dit")
    model = DiT(cfg.model)
    weights = ckpts[-1] / "model.ema.safetensors"
    if not weights.is_file():
        weights = ckpts[-1] / "model.safetensors"
    model.load_state_dict(load_file(str(weights), device=str(device)))
    return DiTGenerator(model, generator_record(cfg, LatentCache(cfg.latents)), str(weights), device)

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
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fae.config import to_dict
from fae.data.latents import LatentDataset
from fae.evaluation import GeneratorEvalConfig
from fae.init_from import InitRule
from fae.models.dit import DiT, DiTConfig
from fae.stages.generator import GeneratorStage
from fae.training import OptimConfig, TrainConfig
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
    eval: GeneratorEvalConfig = field(default_factory=GeneratorEvalConfig)   # in-training scores (fae.evaluation)
    init_from: str | None = None                          # a run or bundle of this family: start from its weights


class DiTStage(GeneratorStage):
    family = "dit"

    def train_dataset(self) -> Dataset:
        return LatentDataset(self.cache, hflip=self.cfg.hflip and self.cache.manifest["flip"],
                             sample_posterior=self.cfg.sample_posterior)

    def loss(self, group: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # t, noise and label dropout come from the global RNG, which the trainer seeds at every step
        return flow_matching_loss(self.modules["model"], batch["latent"], batch["label"], self.cfg.transport)

    def record_settings(self) -> dict[str, Any]:
        return {"transport": to_dict(self.cfg.transport)}

    def init_rules(self) -> dict[str, list[InitRule]]:
        # the class table (its last row is the null class) is re-learned when the class count differs
        return {"model": [InitRule(("y_embedder.*",), "class count differs")]}


def build(cfg: Config) -> DiTStage:
    return DiTStage(cfg)


def components(cfg: Config) -> dict[str, nn.Module]:
    return {"diffusion transformer": DiT(cfg.model)}

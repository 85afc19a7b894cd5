"""Stage 3b: a class-conditional STARFlow normalizing flow on a latent cache (`fae encode` output), exact likelihood.

Paper (§5.3): STARFlow at its default 1.4B configuration on FAE latents, patch size 1, 400 epochs. Its training
follows STARFlow/TarFlow: Gaussian noise of std `noise_std` is added to the (channel-normalised) latents, and the
loss is the exact negative log-likelihood of the noisy latents, -log N(z; 0, I) - log|det dz/dx|, per dimension in
bits (`loss_unit: nats` gives STARFlow's unit, which only changes what `optim.grad_clip` means), plus
`latent_norm_weight` times ml-starflow's latent-norm regulariser (its weight is on the nats loss, so in bits it is
divided by ln 2: the same gradient direction as ml-starflow's). Sampling removes the noise again with a score step
(fae.generators.FlowGenerator), the inverse running as `sampling` says (recorded in the bundle).

`holdout` keeps the cache's last rows out of training; at export the stage measures their bits/dim (noise drawn
from a fixed seed, no flips) beside the same number of training rows, into `eval.json`. Bits/dim are in the
normalised latent space the flow models (docs/flow.md).

The exported bundle (`<out>/flow`) holds the EMA weights, and in config.json the latent statistics, the latent
cache's FAE and encoder references, the noise level and the class names, so `fae sample` needs nothing else.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from fae.config import ConfigError, to_dict
from fae.data.latents import LatentCache, normalize
from fae.evaluation import GeneratorEvalConfig
from fae.init_from import InitRule
from fae.io import atomic_write_text
from fae.models.starflow import FlowSampling, StarFlow, StarFlowConfig, bits_per_dim, latent_norm
from fae.stages.generator import GeneratorStage
from fae.training import OptimConfig, TrainConfig


@dataclass
class Config:
    latents: str                                          # latent cache folder written by `fae encode`
    model: StarFlowConfig = field(default_factory=StarFlowConfig)
    noise_std: float = 0.3                                # STARFlow's default on SD-VAE latents (docs/flow.md)
    hflip: bool = True                                    # pick the flipped latent for half the samples
    holdout: int = 0                                      # last rows of the cache: not trained on, bits/dim at export
    latent_norm_weight: float = 0.0                       # ml-starflow's latent_norm_regularization (nats; T2I: 1e-4)
    loss_unit: Literal["bits", "nats"] = "bits"           # of the loss the optimiser (and grad_clip) sees
    sampling: FlowSampling = field(default_factory=FlowSampling)   # how the bundle samples (fae.models.starflow)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4,
                                                                   schedule="cosine", min_lr=1e-6, grad_clip=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=512, ema_decay=0.9999))
    eval: GeneratorEvalConfig = field(default_factory=GeneratorEvalConfig)   # in-training scores (fae.evaluation)
    init_from: str | None = None                          # a run or bundle of this family: start from its weights


class FirstRows(Dataset):
    """The first `count` rows of a keyed data set (the trainer's sampler draws indices below len())."""

    def __init__(self, base: Dataset, count: int) -> None:
        self.base, self.count = base, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key: Any) -> Any:
        return self.base[key]


class FlowStage(GeneratorStage):
    family = "flow"

    def check(self) -> None:
        if self.cfg.noise_std < 0:
            raise ConfigError(f"noise_std={self.cfg.noise_std}: the latent noise level must be >= 0 (STARFlow: 0.3)")
        if self.cfg.latent_norm_weight < 0 or self.cfg.loss_unit not in ("bits", "nats"):
            raise ConfigError(f"latent_norm_weight={self.cfg.latent_norm_weight} must be >= 0 and loss_unit "
                              f"({self.cfg.loss_unit!r}) bits or nats")
        try:
            self.cfg.sampling.validate()
        except ValueError as exc:
            raise ConfigError(f"sampling: {exc}") from None
        if not 0 <= self.cfg.holdout < len(self.cache):
            raise ConfigError(f"holdout={self.cfg.holdout} must lie in [0, {len(self.cache)}) (the cache has "
                              f"{len(self.cache)} latents)")

    def train_dataset(self) -> Dataset:
        return FirstRows(super().train_dataset(), len(self.cache) - self.cfg.holdout)

    def loss(self, group: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # noise and label dropout come from the global RNG, which the trainer seeds at every step
        x = batch["latent"]
        noisy = x + self.cfg.noise_std * torch.randn_like(x)
        z, logdet, inputs = self.modules["model"](noisy, batch["label"], with_inputs=True)
        bpd = bits_per_dim(z, logdet).mean()
        loss = bpd * math.log(2) if self.cfg.loss_unit == "nats" else bpd
        # detached tensors, read when the trainer logs: no host sync inside the step
        logs = {"bpd": bpd.detach(), "logdet_per_dim": (logdet.mean() / x[0].numel()).detach(),
                "z_rms": z.detach().float().pow(2).mean().sqrt()}
        if self.cfg.latent_norm_weight > 0:
            norm = latent_norm(inputs)
            per_unit = 1.0 if self.cfg.loss_unit == "nats" else 1.0 / math.log(2)
            loss = loss + self.cfg.latent_norm_weight * per_unit * norm
            logs["latent_norm"] = norm.detach()
        return loss, logs

    def record_settings(self) -> dict[str, Any]:
        return {"flow": {"noise_std": self.cfg.noise_std, "sampling": to_dict(self.cfg.sampling)}}

    def init_rules(self) -> dict[str, list[InitRule]]:
        # the class tables (added, or prefixed per block; last row: the null class) when the class count differs
        return {"model": [InitRule(("y_embedder.*", "blocks.*.class_prefix.*"), "class count differs")]}

    def export(self, out_dir: Path, modules: dict[str, nn.Module]) -> None:
        super().export(out_dir, modules)
        model = modules["model"]
        assert isinstance(model, StarFlow)
        if self.cfg.holdout:
            n, total = self.cfg.holdout, len(self.cache)
            scores = {"heldout_bpd": heldout_bits_per_dim(model, self.cache, range(total - n, total),
                                                          self.cfg.noise_std),
                      "train_bpd": heldout_bits_per_dim(model, self.cache, range(n), self.cfg.noise_std),
                      "rows": n, "noise_std": self.cfg.noise_std, "space": "normalised latents"}
            atomic_write_text(out_dir / "eval.json", json.dumps(scores, indent=2))


@torch.no_grad()
def heldout_bits_per_dim(model: StarFlow, cache: LatentCache, rows: range, noise_std: float, seed: int = 0,
                         batch_size: int = 256) -> float:
    """Mean bits/dim of the cache rows (plain, not flipped, normalised) with noise of std `noise_std` drawn from
    `seed`: the same numbers whatever the batch size or device."""
    model.eval()
    device = next(model.parameters()).device
    mean, std = cache.mean64.float(), cache.std64.float()
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(rows.start, rows.stop, batch_size):
        idx = range(start, min(rows.stop, start + batch_size))
        x = normalize(torch.stack([cache.row(i, "latents").float() for i in idx]), mean, std)
        x = x + noise_std * torch.randn(x.shape, generator=g)
        y = torch.stack([cache.row(i, "labels").long() for i in idx])
        total += bits_per_dim(*model(x.to(device), y.to(device))).sum().item()
        count += len(idx)
    return total / count


def build(cfg: Config) -> FlowStage:
    return FlowStage(cfg)


def components(cfg: Config) -> dict[str, nn.Module]:
    return {"normalizing flow (STARFlow)": StarFlow(cfg.model)}

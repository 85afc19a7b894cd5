"""A KL autoencoder with SD-VAE's architecture (`fae train kl-vae`): the pixel-space baseline latent space.

The network is diffusers' `AutoencoderKL`, the class that holds SD-VAE (stabilityai/sd-vae-ft-ema): a convolutional
encoder of ResNet blocks with a downsampling step between levels, a mid block with one self-attention layer, a
diagonal Gaussian posterior of `latent_channels` channels and a mirrored decoder. The defaults are SD-VAE's sizes
(83,653,863 parameters, 4 latent channels at f8); `configs/demo/kl_vae.yaml` is a tiny one (8x8x8 latents at 32 px,
the demo FAE's shape, so one DiT config trains on both) for `fae demo --compare`.

Loss: reconstruction (L1, LDM's choice; or L2) + `kl_weight` * KL(q(z|x) || N(0, I)). Both terms are summed per image,
as LDM sums them, then divided by the image's pixel count so the loss reads per pixel; `kl_weight` is therefore LDM's
(1e-6 for SD-VAE) unchanged. Left out: SD-VAE's LPIPS term (it needs VGG weights, not available offline, and at 32 px
its deep layers see a few pixels) and its PatchGAN (LDM starts it after 50k steps; a demo run is a few hundred steps, and
the pixel-decoder stage measured a GAN inert at this size, docs/pixel-decoder.md). So the demo's baseline is SD-VAE's
architecture and objective family, not its perceptual sharpness.

Images are mapped to [-1, 1] (SD-VAE's range) and decoded back to [0, 1]. The finished model (EMA weights) is written
by `AutoencoderKL.save_pretrained` as a plain diffusers folder `<run>/kl-vae` with `scaling_factor` 1.0 (latent caches
normalise each channel with exact statistics, so no global factor is wanted), with held-out PSNR/SSIM in
`<run>/recon.json` and a grid `<run>/recon_grid.png` (columns: original | kl-vae).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, Subset

from fae import distributed as D
from fae.data import DataConfig, build_dataset
from fae.data.loading import num_items
from fae.data.readable import collate_present, readable_batches
from fae.init_from import InitSource
from fae.io import atomic_write_text, replace_dir
from fae.metrics.recon import PairedAccumulator, psnr
from fae.metrics.reconstruction import save_grid
from fae.stages.autoencoder import check_held_out_split
from fae.stages.preview import PREVIEW_SAMPLES, reconstruction_sheet
from fae.training import OptimConfig, TrainConfig, TrainStage

EXPORT_NAME = "kl-vae"
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"


@dataclass
class KLVAEModelConfig:
    """diffusers `AutoencoderKL` sizes; the defaults are SD-VAE's (stabilityai/sd-vae-ft-ema/config.json). The latent
    grid is image_size / 2^(len(block_out_channels) - 1)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    down_block_types: tuple[str, ...] | None = None   # None: DownEncoderBlock2D at every level (SD-VAE's)
    up_block_types: tuple[str, ...] | None = None     # None: UpDecoderBlock2D at every level (SD-VAE's)
    mid_block_add_attention: bool = True              # SD-VAE's mid block has one self-attention layer
    in_channels: int = 3
    out_channels: int = 3

    def validate(self) -> None:
        levels = len(self.block_out_channels)
        if levels < 1 or min(self.block_out_channels) < 1 or self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError("model: block_out_channels (one entry per level), layers_per_block and latent_channels "
                             "must be positive")
        if self.norm_num_groups < 1 or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"model.norm_num_groups={self.norm_num_groups} must divide every entry of "
                             f"model.block_out_channels={list(self.block_out_channels)} (GroupNorm)")
        for key, types in (("down_block_types", self.down_block_types), ("up_block_types", self.up_block_types)):
            if types is not None and len(types) != levels:
                raise ValueError(f"model.{key} needs one entry per level ({levels}, as block_out_channels), "
                                 f"got {len(types)}")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_kwargs(self, image_size: int) -> dict[str, Any]:
        levels = len(self.block_out_channels)
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "down_block_types": tuple(self.down_block_types or (DOWN_BLOCK,) * levels),
                "up_block_types": tuple(self.up_block_types or (UP_BLOCK,) * levels),
                "block_out_channels": tuple(self.block_out_channels), "layers_per_block": self.layers_per_block,
                "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
                "sample_size": image_size, "scaling_factor": 1.0,
                "mid_block_add_attention": self.mid_block_add_attention}


@dataclass
class KLLossConfig:
    rec: Literal["l1", "l2"] = "l1"   # LDM's autoencoders: L1 (+ LPIPS and a PatchGAN, left out: module docstring)
    kl_weight: float = 1.0e-6         # LDM / SD-VAE's weight on the per-image KL sum against the per-image L1 sum
    sample_posterior: bool = True     # decode a reparameterised z in training; the posterior mean at evaluation

    def validate(self) -> None:
        if self.kl_weight < 0:
            raise ValueError(f"loss.kl_weight must be >= 0, got {self.kl_weight}")


@dataclass
class EvalConfig:
    split: str = "test"
    limit: int | None = 1000          # held-out images scored after training (recon.json); 0 = skip
    batch_size: int = 250
    grid_rows: int = 8


@dataclass
class Config:
    model: KLVAEModelConfig = field(default_factory=KLVAEModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: KLLossConfig = field(default_factory=KLLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, schedule="cosine", warmup_steps=1000))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init_from: str | None = None   # a kl-vae run or its exported diffusers folder: start from its weights

    def validate(self) -> None:
        if self.data.image_size % self.model.downsampling:
            raise ValueError(f"data.image_size={self.data.image_size} is not divisible by the model's downsampling "
                             f"{self.model.downsampling} (2^(levels-1), levels = len(model.block_out_channels))")


def build_autoencoder(cfg: Config) -> Any:
    """A freshly initialised diffusers AutoencoderKL of `cfg.model`'s sizes (diffusers is imported here only; typed
    Any, as diffusers' classes are not seen as torch Modules by mypy)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fae train kl-vae needs diffusers: pip install diffusers") from exc
    return AutoencoderKL(**cfg.model.diffusers_kwargs(cfg.data.image_size))


class KLAutoencoder(nn.Module):
    """The trained module: an AutoencoderKL whose forward returns the reconstruction and the posterior (the KL needs
    it, and DDP needs one forward). Its weights are the AutoencoderKL's under `vae.`."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae: Any = vae

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, Any]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if sample else posterior.mode()
        return self.vae.decode(z).sample, posterior

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> [0, 1] reconstructions through the posterior mean."""
        rec, _ = self(images * 2 - 1, sample=False)
        return ((rec.float() + 1) / 2).clamp(0, 1)


def kl_vae_loss(rec: torch.Tensor, target: torch.Tensor, posterior: Any, cfg: KLLossConfig
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-image sums of the reconstruction error and of the KL (LDM's weighting), divided by the pixel count of an
    image: loss = mean |rec - x| + kl_weight * sum(KL) / (C*H*W). Logs are detached 0-d tensors."""
    err = (rec.float() - target.float()).abs() if cfg.rec == "l1" else (rec.float() - target.float()).pow(2)
    rec_term = err.mean()
    kl = posterior.kl().float().mean() / target[0].numel()   # diffusers' kl(): per-image sum over the latent
    loss = rec_term + cfg.kl_weight * kl
    logs = {"rec": rec_term, "kl": kl, "latent_std": posterior.std.float().mean()}
    return loss, {k: v.detach() for k, v in logs.items()}


class KLVAEStage(TrainStage):
    def __init__(self, cfg: Config) -> None:
        self.cfg, self.optim = cfg, cfg.optim
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed only
            torch.manual_seed(cfg.train.seed)
            self.modules = {"model": KLAutoencoder(build_autoencoder(cfg))}
        self._dataset: Dataset | None = None

    def preflight(self) -> None:
        check_held_out_split(self.cfg)

    def init_bundle(self, path: Path) -> InitSource | None:
        """The exported diffusers folder (`<run>/kl-vae`, or that folder itself); its weights are the module's
        under `vae.`."""
        for folder in (path, path / EXPORT_NAME):
            weights = folder / "diffusion_pytorch_model.safetensors"
            if (folder / "config.json").is_file() and weights.is_file() \
                    and json.loads((folder / "config.json").read_text()).get("_class_name") == "AutoencoderKL":
                state = {f"vae.{k}": v for k, v in load_file(str(weights)).items()}
                return InitSource(str(path), "bundle", {"model": weights}, {"model": state})
        return None

    def train_dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = build_dataset(self.cfg.data, self.cfg.data.split)
        return self._dataset

    def loss(self, group: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["image"].float() * 2 - 1   # SD-VAE's range; the posterior noise is seeded by the trainer per step
        rec, posterior = self.modules["model"](x, sample=self.cfg.loss.sample_posterior)
        loss, logs = kl_vae_loss(rec, x, posterior, self.cfg.loss)
        with torch.no_grad():
            logs["psnr"] = psnr(((rec.detach().float() + 1) / 2).clamp(0, 1), batch["image"].float()).mean()
        return loss, logs

    def preview(self, modules: dict[str, nn.Module], step: int) -> dict[str, torch.Tensor] | None:
        """The first training images (never flipped) beside their reconstruction through the posterior mean."""
        dataset = self.train_dataset()
        items = [it for it in (dataset[i] for i in range(min(PREVIEW_SAMPLES, num_items(dataset)))) if it is not None]
        if not items:
            return None
        model = modules["model"]
        images = collate_present(items)["image"].to(next(model.parameters()).device)  # type: ignore[index]  # items is not empty
        return reconstruction_sheet(images, model.reconstruct(images))  # type: ignore[operator]  # a KLAutoencoder

    def export(self, out_dir: Path, modules: dict[str, nn.Module]) -> None:
        model = modules["model"]
        assert isinstance(model, KLAutoencoder)
        export_autoencoder(model.vae, out_dir / EXPORT_NAME)

    def evaluate(self, out_dir: Path, modules: dict[str, nn.Module]) -> dict[str, Any] | None:
        if self.cfg.eval.limit == 0:
            return None
        return evaluate_reconstruction(modules["model"], self.cfg, out_dir)  # type: ignore[arg-type]  # a KLAutoencoder


def export_autoencoder(vae: Any, folder: Path) -> Path:
    """`vae.save_pretrained` into a temporary sibling folder, moved into place when complete (a kill leaves the old
    folder or none, never half of one)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    vae.save_pretrained(tmp, safe_serialization=True)
    replace_dir(tmp, folder)
    return folder


@torch.no_grad()
def evaluate_reconstruction(model: KLAutoencoder, cfg: Config, out_dir: Path) -> dict[str, Any]:
    """PSNR and SSIM (fae.metrics.recon) of the posterior-mean reconstructions of `eval.limit` held-out images; on
    rank 0 writes recon.json and recon_grid.png, in the layout of the pixel-decoder stages' (one decoder: kl-vae)."""
    dataset = build_dataset(replace(cfg.data, hflip=False, limit=cfg.eval.limit), cfg.eval.split)
    share = Subset(dataset, D.shard_of(num_items(dataset)))   # under torchrun each process scores its share
    device = next(model.parameters()).device
    model.eval()
    paired = PairedAccumulator()
    grid: dict[str, list[torch.Tensor]] = {"original": [], EXPORT_NAME: []}
    for batch in readable_batches(share, cfg.eval.batch_size):
        images = batch["image"].to(device).float()
        rec = model.reconstruct(images)
        paired.update(images.cpu(), rec.cpu())
        take = max(0, min(cfg.eval.grid_rows - len(grid["original"]), images.shape[0]))
        grid["original"] += list(images[:take].cpu())
        grid[EXPORT_NAME] += list(rec[:take].cpu())
    total = D.merged({EXPORT_NAME: paired})[EXPORT_NAME]
    scores: dict[str, Any] = {"split": cfg.eval.split, "images": total.n,
                              "decoders": {EXPORT_NAME: {"input": "image", **total.summarize()}}}
    if D.is_main():   # the grid shows rank 0's share: the first images
        scores["grid"] = str(save_grid(grid, out_dir / "recon_grid.png"))
        atomic_write_text(out_dir / "recon.json", json.dumps(scores, indent=2))
    return scores


def build(cfg: Config) -> KLVAEStage:
    return KLVAEStage(cfg)


def components(cfg: Config) -> dict[str, nn.Module]:
    vae = build_autoencoder(cfg)
    return {"kl-vae encoder": nn.ModuleList([vae.encoder, vae.quant_conv]),
            "kl-vae decoder": nn.ModuleList([vae.post_quant_conv, vae.decoder])}


__all__ = ["Config", "EvalConfig", "KLAutoencoder", "KLLossConfig", "KLVAEModelConfig", "KLVAEStage", "build",
           "build_autoencoder", "components", "export_autoencoder", "kl_vae_loss"]

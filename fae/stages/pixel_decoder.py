"""Pixel-decoder stages (paper §4.2): one stage module, two uses.

- Stage Ib, the Gaussian embedding decoder (`fae train pixel-decoder`): the decoder learns to draw the image from
  the frozen encoder's features plus fixed Gaussian noise, x~ = x + N(0, sigma^2). It needs no FAE checkpoint, so it
  trains in parallel with stage Ia.
- Stage II, fine-tuning (`fae train pixel-decoder --finetune-from <Gaussian run> --fae <stage-1 run>`): the same
  decoder, initialised from the Gaussian one, learns from x_hat = feature_decoder(z), z from the FAE encoder.
  `finetune_from` is stage II's name for the key every stage has, `init_from` (fae.init_from.initialise_from): the
  decoder (and the discriminator with its LeCam averages, where the source has one) start from the source's weights.
  Without `fae`, `init_from` fine-tunes a decoder of either phase on new data in the Gaussian phase.

Losses: reconstruction + perceptual + GAN (fae/losses.py). With a GAN there are two optimizer groups, "gen" (the
decoder) and "disc" (the PatchGAN discriminator, trained from `losses.disc_start`). The export writes the decoder
bundle, the discriminator, held-out PSNR/SSIM/rFID (recon.json) with a grid PNG and, after fine-tuning, the
complete `FAE` pipeline bundle (encoder reference + FAE + pixel decoder).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from fae.config import ConfigError, from_dict
from fae.data import DataConfig, class_strided_indices
from fae.data.loading import num_items
from fae.data.readable import collate_present
from fae.encoders import EncoderConfig, FrozenEncoder
from fae.init_from import InitSource, bundle_source
from fae.io import atomic_save_safetensors, check_same_encoder, read_bundle_config, require_bundle
from fae.losses import PatchDiscriminator, PixelLoss, PixelLossConfig
from fae.metrics.recon import psnr
from fae.models.autoencoder import FeatureAutoEncoder
from fae.models.pixel_decoder import FeatureNoise, PixelDecoder, PixelDecoderConfig, scaled_noise_sigma
from fae.stages.autoencoder import check_held_out_split, features_dataset
from fae.stages.preview import PREVIEW_SAMPLES, reconstruction_sheet
from fae.tokenizers import FAE
from fae.training import OptimConfig, TrainConfig, TrainStage


@dataclass
class NoiseConfig:
    """x~ = x + N(0, s^2) in the Gaussian stage, s = sigma * rms(x) / ref_rms ('rms') or sigma ('absolute').
    The paper's 0.4 is absolute for DINOv2 (configs/paper); for another encoder it scales with the norm of the
    features: 'rms' with `ref_encoder` = DINOv2-g measures both RMS values on the same images (docs/fidelity.md)."""

    sigma: float = 0.4
    mode: Literal["rms", "absolute"] = "rms"
    ref_rms: float = 1.0
    ref_encoder: EncoderConfig | None = None  # 'rms': measure ref_rms on this encoder's features instead
    rms_images: int = 256          # unflipped training images that give rms(x): a seeded, class-strided subset

    def validate(self) -> None:
        if self.sigma < 0 or self.ref_rms <= 0 or self.rms_images <= 0:
            raise ValueError("noise: sigma must be >= 0, ref_rms and rms_images > 0")
        if self.ref_encoder is not None and self.mode != "rms":
            raise ValueError("noise.ref_encoder scales sigma by a measured RMS ratio: it needs noise.mode: rms")


@dataclass
class EvalConfig:
    split: str = "test"
    limit: int | None = 1000       # held-out images scored after training (0 = skip)
    batch_size: int = 250
    grid_rows: int = 8
    fid_features: Literal["encoder", "inception", "none"] = "encoder"  # rFID feature space
    inception_weights: str | None = None


@dataclass
class Config:
    encoder: EncoderConfig
    decoder: PixelDecoderConfig | None = None   # required for the Gaussian stage; fine-tuning takes the bundle's
    data: DataConfig = field(default_factory=DataConfig)
    losses: PixelLossConfig = field(default_factory=PixelLossConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    finetune_from: str | None = None            # stage II: a Gaussian-decoder run folder or pixel_decoder bundle
    init_from: str | None = None                # any stage's key; here the same as finetune_from (which needs fae)
    fae: str | None = None                      # stage II: the stage-1 run folder or FAE bundle that gives x_hat
    finetune_latent: Literal["mode", "sample"] = "mode"  # z = posterior mean (default) or a posterior sample
    features: Literal["on_the_fly", "cache"] = "on_the_fly"
    feature_cache_dir: str | None = None        # default: ~/.cache/fae/features (shared with stage 1)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, schedule="cosine", warmup_steps=1000))
    disc_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, schedule="cosine", warmup_steps=0))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        if None not in (self.finetune_from, self.init_from) and self.finetune_from != self.init_from:
            raise ValueError(f"finetune_from={self.finetune_from} and init_from={self.init_from}: one key names the "
                             "starting decoder (finetune_from is stage II's name for init_from); give one")
        if self.finetune_from is not None and self.fae is None:
            raise ValueError("finetune_from is set but fae is not: stage II fine-tunes on x_hat from an FAE bundle "
                             "(--fae <stage-1 run>)")
        if self.start_from is None and self.decoder is None:
            raise ValueError("decoder: required for the Gaussian stage (a PixelDecoderConfig; see configs/); "
                             "to fine-tune, pass --finetune-from <Gaussian run> --fae <stage-1 run> instead")

    @property
    def finetuning(self) -> bool:
        return self.fae is not None

    @property
    def start_from(self) -> str | None:
        """The decoder run or bundle this run starts from: finetune_from or init_from."""
        return self.finetune_from or self.init_from


def encoder_feature_fn(encoder: FrozenEncoder):
    """Images -> encoder tokens WITH gradients to the images (FrozenEncoder.forward has none), for the perceptual
    loss. Same resize and normalisation as the encoder, without its [0, 1] check: decoder outputs may overshoot."""

    def features(images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-1] != encoder.input_size:
            x = F.interpolate(x, size=(encoder.input_size, encoder.input_size), mode="bicubic", antialias=True,
                              align_corners=False)
        return encoder.tokens(((x - encoder.mean) / encoder.std).to(encoder.model_dtype)).float()

    return features


class PixelDecoderStage(TrainStage):
    def __init__(self, cfg: Config, encoder: FrozenEncoder | None = None) -> None:
        self.cfg, self.optim = cfg, cfg.optim
        self.encoder = encoder or FrozenEncoder.from_config(cfg.encoder)
        self.fae: FeatureAutoEncoder | None = None
        self.init_from: Path | None = None
        decoder_cfg = cfg.decoder
        if cfg.finetuning:
            fae_dir = require_bundle(cfg.fae, "fae", classes=["FeatureAutoEncoder"])  # type: ignore[arg-type]  # validate() requires fae
            self._check_reference(fae_dir)
            self.fae = FeatureAutoEncoder.from_pretrained(fae_dir).eval().requires_grad_(False)
        if cfg.start_from is not None:   # its weights: loaded by the trainer (init_bundle)
            self.init_from = require_bundle(cfg.start_from, "pixel_decoder", classes=["PixelDecoder"])
            self._check_reference(self.init_from)
            bundled = from_dict(PixelDecoderConfig, read_bundle_config(self.init_from)["config"], "decoder")
            if decoder_cfg is not None and decoder_cfg != bundled:
                raise ConfigError(f"decoder: differs from the config of {self.init_from}; drop the decoder block "
                                  "when fine-tuning (it is taken from the Gaussian decoder)")
            decoder_cfg = bundled
        assert decoder_cfg is not None
        self._check_shapes(decoder_cfg)
        self.decoder_config = decoder_cfg
        self.pixel_loss = PixelLoss(cfg.losses, feature_fn=encoder_feature_fn(self.encoder))
        with torch.random.fork_rng(devices=[]):  # initial weights depend on train.seed only, not on the caller's RNG
            torch.manual_seed(cfg.train.seed)
            decoder = PixelDecoder(decoder_cfg)
            disc = self.pixel_loss.build_discriminator(decoder_cfg.out_channels)
        self.modules: dict[str, nn.Module] = {"decoder": decoder}
        if disc is not None:
            min_size = disc.min_size()
            if decoder_cfg.image_size < min_size:
                raise ConfigError(f"losses.discriminator.n_layers={cfg.losses.discriminator.n_layers} needs images of "
                                  f">= {min_size} px, the decoder makes {decoder_cfg.image_size} px; lower n_layers")
            self.modules["disc"] = disc
            lecam = self.init_from.parent / "lecam.safetensors" if self.init_from is not None else None
            if lecam is not None and lecam.is_file() and (lecam.parent / "discriminator.safetensors").is_file():
                # the LeCam averages belong to the discriminator the trainer loads from there (init_bundle)
                self.pixel_loss.lecam.load_state_dict(load_file(str(lecam)))
        # the trainer may wrap modules in DDP; keep the plain ones for the last layer and the frozen-D generator pass
        self._decoder_raw, self._disc_raw = decoder, disc
        self.noise = FeatureNoise(0.0)
        self.feature_rms: float | None = None
        self._generated: dict[int, torch.Tensor] = {}   # this step's decoder outputs, by id of their target images
        self._generated_step = -1
        self._dataset: Dataset | None = None

    # -- checks -------------------------------------------------------------------------------------------------
    def _check_reference(self, bundle: Path) -> None:
        check_same_encoder(read_bundle_config(bundle).get("encoder"), self.encoder.reference(), str(bundle),
                           f"encoder: {self.encoder.reference()}")

    def _check_shapes(self, dec: PixelDecoderConfig) -> None:
        if dec.in_dim != self.encoder.dim or dec.num_tokens != self.encoder.num_tokens:
            raise ConfigError(f"decoder: in_dim={dec.in_dim}, num_tokens={dec.num_tokens}, but the encoder gives "
                              f"{self.encoder.num_tokens} tokens of width {self.encoder.dim}")
        if dec.image_size != self.cfg.data.image_size:
            g = dec.grid
            hint = (f"; set decoder.patch_size={self.cfg.data.image_size // g}" if self.cfg.data.image_size % g == 0
                    else "")
            raise ConfigError(f"decoder: makes {dec.image_size} px images ({g}x{g} tokens x patch {dec.patch_size}), "
                              f"but data.image_size={self.cfg.data.image_size}{hint}")

    # -- TrainStage ---------------------------------------------------------------------------------------------
    def init_from_path(self) -> str | None:
        return self.cfg.start_from

    def init_bundle(self, path: Path) -> InitSource | None:
        """The decoder bundle, with the discriminator the run wrote beside it (its LeCam averages: __init__)."""
        source = bundle_source(path, "pixel_decoder", ["PixelDecoder"], "decoder")
        if source is None or "disc" not in self.modules:
            return source
        run = source.files["decoder"].parent.parent   # <run>/pixel_decoder/model.safetensors
        if (run / "discriminator.safetensors").is_file():
            source.files["disc"] = run / "discriminator.safetensors"
            source.weights["disc"] = load_file(str(source.files["disc"]))
        return source

    def optimizer_groups(self) -> dict[str, list[str]]:
        groups = {"gen": ["decoder"]}
        if "disc" in self.modules:
            groups["disc"] = ["disc"]
        return groups

    def optim_config(self, group: str) -> OptimConfig:
        return self.cfg.disc_optim if group == "disc" else self.cfg.optim

    def ema_modules(self) -> list[str]:
        return ["decoder"]

    def group_active(self, group: str, step: int) -> bool:
        return self.pixel_loss.disc_active(step) if group == "disc" else True

    def schedule_steps(self, group: str, total_steps: int) -> int:
        # the discriminator's cosine runs over its own steps, from disc_start to the end (TiTok's horizon)
        return max(1, total_steps - self.cfg.losses.disc_start) if group == "disc" else total_steps

    def to(self, device: torch.device) -> None:
        self.encoder.to(device)
        self.pixel_loss.to(device)
        if self.fae is not None:
            self.fae.to(device)

    def preflight(self) -> None:
        check_held_out_split(self.cfg)

    def train_dataset(self) -> Dataset:
        if self._dataset is None:
            # building a feature cache draws from the global RNG (DataLoader seeds); keep the trainer's stream intact
            # so that a run that builds the cache and one that reuses it train identically
            with torch.random.fork_rng(devices=[]):
                self._dataset = features_dataset(self.cfg, self.encoder, self.cfg.data.split,
                                                 progress=self.progress)
                if not self.cfg.finetuning:
                    self.noise = FeatureNoise(self.noise_sigma())
        return self._dataset

    @torch.no_grad()
    def noise_sigma(self) -> float:
        """The fixed noise level: the rule applied to the feature RMS of `noise.rms_images` training images, a
        seeded class-strided subset (the first items of a class-sorted set such as ImageNet are one class)."""
        n = self.cfg.noise
        if n.mode == "absolute":
            return scaled_noise_sigma(n.sigma, None, mode="absolute")
        dataset = self.train_dataset()
        indices = class_strided_indices(dataset, n.rms_images, self.cfg.train.seed)
        self.feature_rms = subset_feature_rms(dataset, indices, self.encoder)
        ref_rms = n.ref_rms
        if n.ref_encoder is not None:
            ref_rms = subset_feature_rms(dataset, indices, FrozenEncoder.from_config(n.ref_encoder).to(
                self.encoder.mean.device), cached=False)
        return scaled_noise_sigma(n.sigma, self.feature_rms, ref_rms, "rms")

    def clean_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """x: the frozen encoder's features of the batch's images (cached, or computed once per batch)."""
        if "features" not in batch:
            batch["features"] = self.encoder(batch["image"])
        return batch["features"].float()

    def decoder_input(self, batch: dict[str, Any]) -> torch.Tensor:
        """The features the decoder learns from: x + noise (Gaussian stage) or x_hat (fine-tuning)."""
        x = self.clean_features(batch)
        if self.fae is None:
            return self.noise(x)
        with torch.no_grad():
            posterior = self.fae.encode(x)
            z = posterior.sample() if self.cfg.finetune_latent == "sample" else posterior.mode()
            return self.fae.decode(z).float()

    def loss(self, group: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        target = batch["image"]
        if group == "disc":
            fake = self._generated.get(id(target)) if self._generated_step == step else None
            if fake is None:  # the generator pass did not run on this micro-batch (its group was inactive)
                with torch.no_grad():
                    fake = self._decoder_raw(self.decoder_input(batch))
            return self.pixel_loss.discriminator_loss(self.modules["disc"], target, fake)
        pred = self.modules["decoder"](self.decoder_input(batch))
        if "disc" in self.modules:
            # the discriminator pass of the same step (the trainer runs the groups in order over the same micro-batch
            # objects) scores these images instead of decoding again; keyed by the micro-batch's image tensor
            if self._generated_step != step:
                self._generated, self._generated_step = {}, step
            self._generated[id(target)] = pred.detach()
        # x is exactly the encoder's features of the target image (same preprocessing when no resize is needed;
        # with a resize they differ only by the clamp of bicubic overshoot), which saves one encoder forward
        loss, logs = self.pixel_loss.generator_loss(pred, target, step, self._disc_raw, self._decoder_raw.last_layer,
                                                    target_features=self.clean_features(batch))
        with torch.no_grad():
            logs["psnr"] = psnr(pred.detach().float().clamp(0, 1), target.float()).mean().item()
        return loss, logs

    def extra_state(self) -> dict[str, Any]:
        return {"lecam": {k: v.cpu() for k, v in self.pixel_loss.lecam.state_dict().items()},
                "noise_sigma": self.noise.sigma}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "lecam" in state:
            self.pixel_loss.lecam.load_state_dict(state["lecam"])

    def preview(self, modules: dict[str, nn.Module], step: int) -> dict[str, torch.Tensor] | None:
        """The first training images (never flipped) and their decoding from clean features x (Gaussian stage; the
        noise is a training device only) or from the FAE's x_hat (fine-tuning)."""
        dataset = self.train_dataset()
        items = [item for item in (dataset[i] for i in range(min(PREVIEW_SAMPLES, num_items(dataset)))) if item is not None]
        if not items:
            return None
        device = self.encoder.mean.device
        batch = {k: v.to(device) for k, v in collate_present(items).items() if isinstance(v, torch.Tensor)}  # type: ignore[union-attr]  # items is not empty
        x = self.clean_features(batch)
        if self.fae is not None:
            x = self.fae.decode(self.fae.encode(x).mode()).float()
        return reconstruction_sheet(batch["image"], modules["decoder"](x))

    def export(self, out_dir: Path, modules: dict[str, nn.Module]) -> None:
        decoder = modules["decoder"]
        assert isinstance(decoder, PixelDecoder)
        ref = self.encoder.bundle_reference(out_dir / "pixel_decoder")   # the bundle carries a small encoder along
        record = {"encoder": ref, "stage": "finetune" if self.cfg.finetuning else "gaussian",
                  "noise_sigma": self.noise.sigma, "feature_rms": self.feature_rms, "fae": self.cfg.fae,
                  "finetune_from": self.cfg.finetune_from, "init_from": self.cfg.init_from}
        decoder.save_pretrained(out_dir / "pixel_decoder", extra=record)
        if "disc" in modules:
            atomic_save_safetensors(modules["disc"].state_dict(), out_dir / "discriminator.safetensors")
            atomic_save_safetensors(self.pixel_loss.lecam.state_dict(), out_dir / "lecam.safetensors")
        if self.fae is not None:
            FAE(self.encoder, self.fae, decoder).save_pretrained(out_dir / "tokenizer")

    def evaluate(self, out_dir: Path, modules: dict[str, nn.Module]) -> dict[str, Any] | None:
        if self.cfg.eval.limit == 0:
            return None
        return evaluate_stage(self, modules["decoder"], out_dir)  # type: ignore[arg-type]  # a PixelDecoder


@torch.no_grad()
def subset_feature_rms(dataset: Dataset, indices: list[int], encoder: FrozenEncoder, cached: bool = True) -> float:
    """sqrt(mean(x^2)) of `encoder`'s features of the items `indices` (their cached features when `cached`);
    unreadable items (None) are left out."""
    total, count = 0.0, 0
    for start in range(0, len(indices), 64):
        items = [it for it in (dataset[i] for i in indices[start:start + 64]) if it is not None]
        if not items:
            continue
        if cached and "features" in items[0]:
            x = torch.stack([it["features"] for it in items])
        else:
            x = encoder(torch.stack([it["image"] for it in items]).to(encoder.mean.device))
        total += x.float().pow(2).mean().item() * len(items)
        count += len(items)
    if count == 0:
        raise ValueError("noise: none of the images picked to measure the feature RMS could be read")
    return (total / count) ** 0.5


def evaluate_stage(stage: Any, decoder: PixelDecoder, out_dir: Path) -> dict[str, Any]:
    """The end-of-run evaluation of a pixel-decoder stage on its held-out split, with fae.metrics.reconstruction."""
    from fae.metrics.reconstruction import FeatureInput, build_fid_network, evaluate_decoders, replace_features

    cfg = stage.cfg
    dataset = features_dataset(replace_features(cfg), stage.encoder, cfg.eval.split, limit=cfg.eval.limit, hflip=False)
    decoders: dict[str, tuple[PixelDecoder, FeatureInput]] = {}
    if stage.init_from is not None and cfg.finetuning:   # stage II: the Gaussian decoder it started from, compared
        gaussian = PixelDecoder.from_pretrained(stage.init_from)
        decoders["gaussian(x)"] = (gaussian, "x")
        decoders["gaussian(x_hat)"] = (gaussian, "x_hat")
    if cfg.finetuning:
        decoders["finetuned(x_hat)" if stage.init_from is not None else "decoder(x_hat)"] = (decoder, "x_hat")
    else:
        decoders["gaussian(x)"] = (decoder, "x")
    network = build_fid_network(cfg.eval.fid_features, stage.encoder, cfg.eval.inception_weights)
    scores = evaluate_decoders(stage.encoder, dataset, decoders, fae=stage.fae, network=network,
                                     batch_size=cfg.eval.batch_size, grid_rows=cfg.eval.grid_rows, out_dir=out_dir)
    return {"split": cfg.eval.split, **scores}


def build(cfg: Config) -> PixelDecoderStage:
    return PixelDecoderStage(cfg)


def components(cfg: Config) -> dict[str, nn.Module]:
    """Parameter table (`fae summary`), built without loading the encoder."""
    decoder_cfg = cfg.decoder
    if decoder_cfg is None:  # fine-tuning: the architecture is the Gaussian decoder's
        if cfg.start_from is None:
            raise ConfigError("this config takes its decoder from --finetune-from (finetune_from=...); give it")
        record = read_bundle_config(require_bundle(cfg.start_from, "pixel_decoder", classes=["PixelDecoder"]))
        decoder_cfg = from_dict(PixelDecoderConfig, record["config"], "decoder")
    parts: dict[str, nn.Module] = {"pixel decoder": PixelDecoder(decoder_cfg)}
    if cfg.losses.use_gan:
        parts["discriminator"] = PatchDiscriminator(cfg.losses.discriminator)
    return parts


__all__ = ["Config", "EvalConfig", "NoiseConfig", "PixelDecoderStage", "build", "components", "encoder_feature_fn",
           "features_dataset"]

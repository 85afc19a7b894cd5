"""Pixel-decoder losses (paper eq. 4.2): L = w_rec L_rec + w_perc L_perc + w_gan L_gan, with two recipes as presets:
TiTok's (the paper's pointer, "Yu et al. 2024a") and the LDM/taming autoencoders' (`PixelLossConfig.preset`).

- reconstruction: L1 or L2 on [0, 1] pixels;
- perceptual: `EncoderPerceptualLoss`, a feature-matching loss in the frozen encoder's own token space (offline, no
  extra weights), `LPIPS` built from user-supplied local VGG16/AlexNet and LPIPS-head weight files, or
  `ConvNeXtPerceptual` (TiTok's: MSE of ConvNeXt-S ImageNet logits, torchvision's weights from a local file);
- GAN: `PatchDiscriminator` (PatchGAN, N strided 4x4 convs), hinge loss, LeCam regularisation, and an adaptive
  generator weight (gradient-norm ratio at the decoder's last layer), with separate start steps for the
  discriminator updates and the generator's adversarial term.
`PixelLoss` combines them. Every distance is computed in float32, so the losses are safe under bf16 autocast.
docs/pixel-decoder.md lists the defaults and why.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DiscriminatorConfig:
    channels: int = 64           # width of the first conv; doubles per layer up to 8x
    n_layers: int = 3            # strided 4x4 convs: each halves the resolution
    norm: Literal["group", "batch", "none"] = "group"

    def validate(self) -> None:
        if self.channels <= 0 or self.n_layers <= 0:
            raise ValueError(f"discriminator channels and n_layers must be positive, got {self.channels}, "
                             f"{self.n_layers}")


# Recipes (docs/fidelity.md). TiTok: configs/training/TiTok/stage2/titok_l32.yaml and modeling/modules/losses.py of
# bytedance/1d-tokenizer. LDM: the KL autoencoders of latent-diffusion / taming-transformers (L1 + LPIPS, adaptive
# GAN weight 0.5 from step 50001, no LeCam).
LOSS_PRESETS: dict[str, dict[str, object]] = {
    "titok": dict(rec="l2", rec_weight=1.0, perceptual="convnext", perceptual_weight=0.1, gan_weight=0.01,
                  adaptive_gan_weight=False, disc_start=20_000, gan_start=20_000, lecam_weight=0.001,
                  lecam_decay=0.999, lecam_reduction="mean"),
    "ldm": dict(rec="l1", rec_weight=1.0, perceptual="lpips", perceptual_weight=1.0, gan_weight=0.5,
                adaptive_gan_weight=True, disc_start=50_001, gan_start=50_001, lecam_weight=0.0),
}


@dataclass
class PixelLossConfig:
    # a named recipe (LOSS_PRESETS) fills every key left at its default here; a key you set to another value wins
    preset: Literal["custom", "titok", "ldm"] = "custom"
    rec: Literal["l1", "l2"] = "l2"                 # TiTok stage 2: L2
    rec_weight: float = 1.0
    perceptual: Literal["encoder", "lpips", "convnext", "none"] = "encoder"
    perceptual_weight: float = 1.0
    lpips_net: Literal["vgg", "alex"] = "vgg"
    lpips_weights: list[str] = field(default_factory=list)  # [backbone, heads] or one combined file
    convnext_weights: str | None = None             # torchvision convnext_small-0c510722.pth (ImageNet-1k V1)
    gan_weight: float = 0.5                         # 0 = no GAN at all (no discriminator is built)
    adaptive_gan_weight: bool = True                # scale by ||grad L_rec+perc|| / ||grad L_gan|| at the last layer
    adaptive_max: float = 1e4                       # clamp of that ratio
    disc_start: int = 20_000                        # first step the discriminator is trained (TiTok: 20k)
    gan_start: int = 20_000                         # first step the generator sees the adversarial term
    lecam_weight: float = 0.001                     # TiTok: 0.001
    lecam_decay: float = 0.999
    lecam_reduction: Literal["element", "mean"] = "element"  # LeCam's per-logit penalty, or TiTok's on batch means
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def __post_init__(self) -> None:
        if self.preset == "custom":
            return
        if self.preset not in LOSS_PRESETS:
            raise ValueError(f"losses.preset must be one of custom, {', '.join(LOSS_PRESETS)}; not {self.preset!r}")
        defaults = PixelLossConfig()
        for key, value in LOSS_PRESETS[self.preset].items():
            if getattr(self, key) == getattr(defaults, key):
                setattr(self, key, value)

    def validate(self) -> None:
        for name in ("rec_weight", "perceptual_weight", "gan_weight", "lecam_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"losses.{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_start < 0 or self.gan_start < 0:
            raise ValueError("losses.disc_start and losses.gan_start must be >= 0")
        if self.gan_weight > 0 and self.gan_start < self.disc_start:
            raise ValueError(f"losses.gan_start={self.gan_start} is before disc_start={self.disc_start}: the generator "
                             "would be trained against an untrained discriminator")
        if not 0 <= self.lecam_decay < 1:
            raise ValueError(f"losses.lecam_decay must lie in [0, 1), got {self.lecam_decay}")
        if self.adaptive_max <= 0:
            raise ValueError("losses.adaptive_max must be positive")
        if self.lecam_reduction not in ("element", "mean"):
            raise ValueError(f"losses.lecam_reduction must be element or mean, not {self.lecam_reduction!r}")
        if len(self.lpips_weights) > 2:
            raise ValueError("losses.lpips_weights takes one combined file or two files (backbone, heads)")
        self.discriminator.validate()

    @property
    def use_gan(self) -> bool:
        return self.gan_weight > 0


# ---------------------------------------------------------------------------------------------------------------
# Reconstruction and perceptual losses
# ---------------------------------------------------------------------------------------------------------------
def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: Literal["l1", "l2"] = "l2") -> torch.Tensor:
    pred, target = pred.float(), target.float()
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"unknown reconstruction loss {kind!r} (expected l1 or l2)")


def _unit(x: torch.Tensor, dim: int, eps: float = 1e-10) -> torch.Tensor:
    x = x.float()
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + eps)


FeatureFn = Callable[[torch.Tensor], "torch.Tensor | Sequence[torch.Tensor]"]


class EncoderPerceptualLoss(nn.Module):
    """Feature matching in a frozen encoder's token space: each token is scaled to unit length (as LPIPS does per
    spatial position) and the squared distance is averaged over tokens and layers. `feature_fn` maps images in
    [0, 1] to (B, N, D) tokens, or a list of them, and must let gradients reach its input."""

    def __init__(self, feature_fn: FeatureFn) -> None:
        super().__init__()
        self.feature_fn = feature_fn

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        out = self.feature_fn(images)
        return [out] if isinstance(out, torch.Tensor) else list(out)

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                target_features: torch.Tensor | Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Per-sample distance (B,). `target_features` = `feature_fn(target)` when the caller already has them
        (e.g. cached encoder features), which saves one encoder forward."""
        if target_features is None:
            with torch.no_grad():
                ref = self._features(target)
        else:
            ref = [target_features] if isinstance(target_features, torch.Tensor) else list(target_features)
        got = self._features(pred)
        per_layer = [(_unit(a, -1) - _unit(b, -1)).pow(2).sum(-1).mean(-1) for a, b in zip(got, ref, strict=True)]
        return torch.stack(per_layer).mean(0)


# LPIPS: our own VGG16 / AlexNet trunks laid out like torchvision's `features` so that its state dicts load by key.
_VGG16_LAYOUT: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_VGG16_TAPS = (3, 8, 15, 22, 29)        # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_ALEX_TAPS = (1, 4, 7, 9, 11)           # relu1 .. relu5
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS's input scaling layer (constants of the published metric)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_FILES = {
    "vgg": ("torchvision VGG16 weights (e.g. vgg16-397923af.pth, keys features.<i>.weight/bias)",
            "LPIPS linear heads for VGG (e.g. lpips weights/v0.1/vgg.pth, keys lin<k>.model.1.weight)"),
    "alex": ("torchvision AlexNet weights (e.g. alexnet-owt-7be5be79.pth, keys features.<i>.weight/bias)",
             "LPIPS linear heads for AlexNet (e.g. lpips weights/v0.1/alex.pth, keys lin<k>.model.1.weight)"),
}


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for v in _VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU()]
            c = int(v)
    return nn.Sequential(*layers)


def _alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors")
    return state


class LPIPS(nn.Module):
    """LPIPS distance (Zhang et al. 2018) with weights from local files; nothing is downloaded.

    `weights` is one combined file or two files [backbone, heads] (.pth or .safetensors):
    backbone keys are torchvision's `features.<i>.weight/bias` (`classifier.*` is ignored), head keys are the LPIPS
    release's `lin<k>.model.1.weight` (k = 0..4; our own `lins.<k>.weight` is accepted too). Loading is strict:
    a missing or unexpected key is an error that names it.
    """

    shift: torch.Tensor  # buffers (register_buffer), declared for the type checker
    scale: torch.Tensor

    def __init__(self, net: Literal["vgg", "alex"] = "vgg", weights: Sequence[str | Path] | str | Path | None = None) -> None:
        super().__init__()
        if net not in LPIPS_FILES:
            raise ValueError(f"LPIPS net must be 'vgg' or 'alex', got {net!r}")
        self.net = net
        self.features = _vgg16_features() if net == "vgg" else _alexnet_features()
        self.taps = _VGG16_TAPS if net == "vgg" else _ALEX_TAPS
        channels: list[int] = [self.features[i - 1].out_channels for i in self.taps]  # type: ignore[misc]  # the tapped layers are Conv2d
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        if isinstance(weights, (str, Path)):
            weights = [weights]
        if not weights:
            backbone, heads = LPIPS_FILES[net]
            raise FileNotFoundError(
                f"LPIPS ({net}) needs local weight files and none was given: set losses.lpips_weights to "
                f"[<{backbone}>, <{heads}>] (or one file holding both), or use losses.perceptual=encoder, "
                "which needs no extra weights")
        self.load_weights(weights)
        self.requires_grad_(False).eval()

    def load_weights(self, files: Sequence[str | Path]) -> None:
        merged: dict[str, torch.Tensor] = {}
        for f in files:
            merged.update(_read_state(Path(f)))
        state: dict[str, torch.Tensor] = {}
        unexpected = []
        for key, value in merged.items():
            if key.startswith("classifier."):
                continue
            if key.startswith("features."):
                state[key] = value
            elif key.startswith("lin") and key.endswith(".model.1.weight"):
                state[f"lins.{key[3:].split('.')[0]}.weight"] = value
            elif key.startswith("lins."):
                state[key] = value
            else:
                unexpected.append(key)
        expected = set(self.state_dict())
        missing = sorted(expected - set(state))
        unexpected += sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"LPIPS ({self.net}) weights {[str(f) for f in files]} do not match: missing keys "
                             f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected keys {unexpected[:6]}. "
                             f"Expected {LPIPS_FILES[self.net][0]} and {LPIPS_FILES[self.net][1]}")
        self.load_state_dict(state, strict=True)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always eval: the metric is fixed

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample distance (B,) between images in [0, 1]."""
        x = torch.cat([pred, target]).to(self.shift.dtype) * 2 - 1
        h = (x - self.shift) / self.scale
        total = torch.zeros(pred.shape[0], device=pred.device)
        k = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                a, b = _unit(h, 1).chunk(2)
                diff = (a - b).pow(2)
                total = total + F.conv2d(diff, self.lins[k].weight.float()).mean((1, 2, 3))  # type: ignore[arg-type]  # lins holds Conv2d
                k += 1
                if k == len(self.taps):
                    break
        return total


def random_lpips_state(net: Literal["vgg", "alex"] = "vgg", seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random LPIPS state dict in the release's key layout (`features.<i>.*`, `lin<k>.model.1.weight`), with
    O(1) activations and non-negative heads like the published ones: parity tests load it into this LPIPS and into
    the reference package without downloading the 500 MB backbone."""
    if net not in LPIPS_FILES:
        raise ValueError(f"LPIPS net must be 'vgg' or 'alex', got {net!r}")
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        features = _vgg16_features() if net == "vgg" else _alexnet_features()
    state = {}
    for name, tensor in features.state_dict().items():
        fan_in = tensor[0].numel() if name.endswith("weight") else 1
        scale = (2.0 / fan_in) ** 0.5 if name.endswith("weight") else 0.1
        state[f"features.{name}"] = torch.randn(tensor.shape, generator=g) * scale
    taps = _VGG16_TAPS if net == "vgg" else _ALEX_TAPS
    for k, i in enumerate(taps):
        channels: int = features[i - 1].out_channels  # type: ignore[assignment]  # the tapped layers are Conv2d
        state[f"lin{k}.model.1.weight"] = torch.rand((1, channels, 1, 1), generator=g)
    return state


# ConvNeXt-S laid out like torchvision's `convnext_small`, so its ImageNet state dict loads by key.
class _LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class _Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), _Permute(0, 2, 3, 1),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), _Permute(0, 3, 1, 2))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.block(x)


CONVNEXT_S_FILE = "torchvision ConvNeXt-S ImageNet weights (convnext_small-0c510722.pth, keys features.* / classifier.*)"


CONVNEXT_S = ((96, 192, 384, 768), (3, 3, 27, 3))  # widths and depths of ConvNeXt-S (50.2M parameters)


class ConvNeXt(nn.Module):
    """ConvNeXt (Liu et al. 2022) to ImageNet logits, with torchvision's module names; ConvNeXt-S by default."""

    def __init__(self, dims: Sequence[int] = CONVNEXT_S[0], depths: Sequence[int] = CONVNEXT_S[1]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), _LayerNorm2d(dims[0], eps=1e-6))]
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            layers.append(nn.Sequential(*(_ConvNeXtBlock(dim) for _ in range(depth))))
            if i < len(dims) - 1:
                layers.append(nn.Sequential(_LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(_LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3), keepdim=True))


class ConvNeXtPerceptual(nn.Module):
    """TiTok's perceptual loss: per-sample MSE between the ConvNeXt-S ImageNet logits of two [0, 1] images, each
    resized to 224 px (bilinear, antialiased) and ImageNet-normalised. Weights from a local file only."""

    mean: torch.Tensor  # buffers (register_buffer), declared for the type checker
    std: torch.Tensor

    def __init__(self, weights: str | Path | None, net: ConvNeXt | None = None) -> None:
        super().__init__()
        self.net = net or ConvNeXt()  # `net`: another size (tests)
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1), persistent=False)
        if weights is None:
            raise FileNotFoundError(f"losses.perceptual=convnext needs {CONVNEXT_S_FILE}: set losses.convnext_weights "
                                    "to its path (or use losses.perceptual=encoder, which needs no extra weights)")
        state = _read_state(Path(weights))
        expected = set(self.net.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{weights} is not {CONVNEXT_S_FILE}: missing keys {missing[:4]}, unexpected keys "
                             f"{unexpected[:4]}")
        self.net.load_state_dict(state, strict=True)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ConvNeXtPerceptual:
        return super().train(False)  # always eval: the loss network is fixed

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=224, mode="bilinear", align_corners=False, antialias=True)
        return self.net((x - self.mean) / self.std).float()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = self.logits(target)
        return (self.logits(pred) - ref).pow(2).mean(1)


# ---------------------------------------------------------------------------------------------------------------
# GAN: PatchGAN discriminator, hinge loss, LeCam, adaptive weight
# ---------------------------------------------------------------------------------------------------------------
def _disc_norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): strided 4x4 convs, LeakyReLU(0.2), one logit per overlapping patch.

    GroupNorm by default instead of BatchNorm: the discriminator sees real and fake images in ONE batch (one DDP
    forward), and batch statistics would couple the two halves and differ between processes."""

    def __init__(self, cfg: DiscriminatorConfig | None = None, in_channels: int = 3) -> None:
        super().__init__()
        cfg = cfg or DiscriminatorConfig()
        cfg.validate()
        self.config = cfg
        ch, bias = cfg.channels, cfg.norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        c_in = ch
        for i in range(1, cfg.n_layers + 1):
            c_out = ch * min(2 ** i, 8)
            stride = 2 if i < cfg.n_layers else 1   # the last hidden conv keeps the resolution
            layers += [nn.Conv2d(c_in, c_out, 4, stride, 1, bias=bias), _disc_norm(cfg.norm, c_out), nn.LeakyReLU(0.2)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def min_size(self) -> int:
        """Smallest image side that still yields one logit: n strided convs, then two 4x4 convs that each trim 1."""
        return 3 * 2 ** self.config.n_layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> patch logits (B, 1, h, w)."""
        if min(images.shape[-2:]) < self.min_size():
            raise ValueError(f"images of {tuple(images.shape[-2:])} px are too small for a discriminator with "
                             f"n_layers={self.config.n_layers} (needs >= {self.min_size()} px); lower "
                             "losses.discriminator.n_layers")
        return self.net(images * 2 - 1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.float().mean()


class LeCam(nn.Module):
    """LeCam regulariser (Tseng et al. 2021): keeps D(real) below the EMA of D(fake) and D(fake) above the EMA of
    D(real). `reduction="element"` penalises every patch logit (LeCam's definition, mean over logits);
    "mean" penalises the batch means (TiTok's code). The two EMAs are buffers, saved and resumed with the training
    state and carried into stage II with the discriminator."""

    ema_real: torch.Tensor  # buffers (register_buffer), declared for the type checker
    ema_fake: torch.Tensor

    def __init__(self, decay: float = 0.999, reduction: Literal["element", "mean"] = "element") -> None:
        super().__init__()
        self.decay, self.reduction = decay, reduction
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def penalty(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        real, fake = logits_real.float(), logits_fake.float()
        if self.reduction == "mean":
            real, fake = real.mean(), fake.mean()
        return F.relu(real - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake).pow(2).mean()

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        means = torch.stack([logits_real.float().mean(), logits_fake.float().mean()])
        if dist.is_available() and dist.is_initialized():  # every process keeps the same EMA
            dist.all_reduce(means)
            means /= dist.get_world_size()
        self.ema_real.lerp_(means[0], 1 - self.decay)
        self.ema_fake.lerp_(means[1], 1 - self.decay)


def adaptive_gan_weight(nll_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """||d nll / d last_layer|| / (||d gan / d last_layer|| + eps), clamped to [0, max_weight] and detached
    (taming-transformers' balancing: the GAN gradient at the output layer is scaled to match the others)."""
    g_nll = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = g_nll.float().norm() / (g_gan.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily stop gradients into `module`'s parameters (gradients still flow to its input)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(f)


# ---------------------------------------------------------------------------------------------------------------
# The combined loss
# ---------------------------------------------------------------------------------------------------------------
class PixelLoss(nn.Module):
    """Generator and discriminator objectives of the pixel decoder. Holds the perceptual network and the LeCam
    EMAs; the discriminator itself is a trainable module of the stage and is passed in."""

    def __init__(self, cfg: PixelLossConfig, feature_fn: FeatureFn | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.perceptual: nn.Module | None = None
        if cfg.perceptual == "encoder" and cfg.perceptual_weight > 0:
            if feature_fn is None:
                raise ValueError("losses.perceptual=encoder needs the frozen encoder's feature function")
            self.perceptual = EncoderPerceptualLoss(feature_fn)
        elif cfg.perceptual == "lpips" and cfg.perceptual_weight > 0:
            self.perceptual = LPIPS(cfg.lpips_net, cfg.lpips_weights)
        elif cfg.perceptual == "convnext" and cfg.perceptual_weight > 0:
            self.perceptual = ConvNeXtPerceptual(cfg.convnext_weights)
        self.lecam = LeCam(cfg.lecam_decay, cfg.lecam_reduction)

    def build_discriminator(self, in_channels: int = 3) -> PatchDiscriminator | None:
        return PatchDiscriminator(self.cfg.discriminator, in_channels) if self.cfg.use_gan else None

    def gan_active(self, step: int) -> bool:
        return self.cfg.use_gan and step >= self.cfg.gan_start

    def disc_active(self, step: int) -> bool:
        return self.cfg.use_gan and step >= self.cfg.disc_start

    def generator_loss(self, pred: torch.Tensor, target: torch.Tensor, step: int,
                       discriminator: nn.Module | None = None, last_layer: torch.Tensor | None = None,
                       target_features: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """w_rec L_rec + w_perc L_perc (+ gan weight x hinge generator loss from `gan_start` on). `discriminator`
        should be the unwrapped module: it is frozen here, only the decoder gets gradients. `target_features`:
        the encoder's features of `target`, if known (encoder perceptual loss only)."""
        c = self.cfg
        rec = reconstruction_loss(pred, target, c.rec)
        nll = c.rec_weight * rec
        logs = {"rec": rec.item()}
        if self.perceptual is not None:
            if isinstance(self.perceptual, EncoderPerceptualLoss):
                perc = self.perceptual(pred, target, target_features).mean()
            else:
                perc = self.perceptual(pred, target).mean()
            nll = nll + c.perceptual_weight * perc
            logs["perceptual"] = perc.item()
        loss = nll
        if self.gan_active(step):
            if discriminator is None:
                raise ValueError("the GAN term is active but no discriminator was passed")
            with frozen(discriminator):
                g = hinge_g_loss(discriminator(pred))
            weight = torch.tensor(c.gan_weight, device=pred.device)
            if c.adaptive_gan_weight and torch.is_grad_enabled():
                if last_layer is None:
                    raise ValueError("adaptive_gan_weight needs the decoder's last layer")
                weight = weight * adaptive_gan_weight(nll, g, last_layer, c.adaptive_max)
            loss = loss + weight * g
            logs.update(gan_g=g.item(), gan_weight=weight.item())
        return loss, logs

    def discriminator_loss(self, discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                           ) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss + LeCam, with ONE forward of the (possibly DDP-wrapped) discriminator on cat(real, fake)."""
        logits = discriminator(torch.cat([real, fake.detach()]).to(real.dtype))
        lr, lf = logits.float().chunk(2)
        loss = hinge_d_loss(lr, lf)
        logs = {"disc": loss.item(), "logits_real": lr.mean().item(), "logits_fake": lf.mean().item()}
        if self.cfg.lecam_weight > 0:
            reg = self.lecam.penalty(lr, lf)
            loss = loss + self.cfg.lecam_weight * reg
            self.lecam.update(lr, lf)
            logs["lecam"] = reg.item()
        return loss, logs

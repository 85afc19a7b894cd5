"""PixelDecoder: a ViT that turns frozen-encoder feature tokens (B, N, D) into an image (B, 3, H, W).

Wiring (paper App. D: ViT-L, width 1024, 24 layers, 16 heads, MLP 4, 305.36M parameters): input linear D -> width,
a learned position table, pre-norm transformer blocks, a final norm, and a per-token linear head to a p x p x 3
patch that is unpatchified onto the image. A per-token head decodes each patch independently of its neighbours,
which can leave a visible seam between patches; an optional residual 3x3-conv refinement on the unpatchified image
(`refine_channels`, zero-initialised so it starts as the identity) lets neighbouring patches agree. It adds a few
thousand parameters only. docs/pixel-decoder.md gives the count and the choices.

Also here: `FeatureNoise`, the Gaussian-embedding-decoder noise x~ = x + N(0, sigma^2) (training mode only), and the
sigma rule for encoders other than DINOv2.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fae.io import PretrainedMixin
from fae.nn import TransformerBlock, grid_side, make_norm, run_block, sincos_pos_embed_2d, unpatchify


@dataclass
class PixelDecoderConfig:
    in_dim: int = 1536            # width D of the feature tokens (DINOv2-g: 1536)
    num_tokens: int = 256         # N, a square grid (16 x 16)
    patch_size: int = 16          # each token becomes a patch x patch pixel block: 16 x 16 tokens -> 256 px
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    out_channels: int = 3
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"   # a plain ViT-L by default
    mlp: Literal["gelu", "swiglu"] = "gelu"
    refine_channels: int = 64     # hidden channels of the seam-removing 3x3 conv refinement; 0 = none
    input_pos_embed: bool = False  # a learned (N, D) table added to the input features: App. D's 305.36M (fidelity.md)

    def validate(self) -> None:
        for name in ("in_dim", "num_tokens", "patch_size", "width", "depth", "num_heads", "out_channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"pixel decoder {name} must be positive, got {getattr(self, name)}")
        if self.refine_channels < 0:
            raise ValueError(f"refine_channels must be >= 0, got {self.refine_channels}")
        if self.width % self.num_heads:
            raise ValueError(f"pixel decoder width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.width % 4:
            raise ValueError(f"pixel decoder width={self.width} must be divisible by 4 (2-D sin-cos position init)")
        try:
            grid_side(self.num_tokens)
        except ValueError:
            raise ValueError(f"pixel decoder num_tokens={self.num_tokens} is not a square grid (e.g. 256 = 16 x 16)"
                             ) from None

    @property
    def grid(self) -> int:
        return grid_side(self.num_tokens)

    @property
    def image_size(self) -> int:
        return self.grid * self.patch_size


# Sizes: "L" is the paper's ViT-L (App. D); smaller ones for ablations and CPU runs.
PIXEL_DECODER_SIZES: dict[str, dict[str, Any]] = {
    "L": dict(width=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "B": dict(width=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "S": dict(width=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "tiny": dict(width=64, depth=2, num_heads=2, mlp_ratio=4.0),
}
PIXEL_DECODER_SIZES["paper"] = {**PIXEL_DECODER_SIZES["L"], "input_pos_embed": True}  # 305.33M (App. D: 305.36M)


def pixel_decoder_config(size: str = "paper", **overrides: Any) -> PixelDecoderConfig:
    """A registry size plus overrides, e.g. `pixel_decoder_config("S", in_dim=384, num_tokens=16, patch_size=7)`."""
    if size not in PIXEL_DECODER_SIZES:
        raise ValueError(f"unknown pixel decoder size {size!r}; choose one of {sorted(PIXEL_DECODER_SIZES)}")
    cfg = replace(PixelDecoderConfig(), **{**PIXEL_DECODER_SIZES[size], **overrides})
    cfg.validate()
    return cfg


class ConvRefine(nn.Module):
    """y + conv3x3(gelu(conv3x3(y))): a receptive field across patch borders. The last conv starts at zero, so an
    untrained refinement is exactly the identity and the decoder's count and behaviour start from the plain ViT."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)  # type: ignore[arg-type]  # Conv2d has a bias unless bias=False

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.conv2(F.gelu(self.conv1(y)))


class PixelDecoder(nn.Module, PretrainedMixin):
    """Feature tokens (B, N, D) -> image (B, C, H, W) in [0, 1] (unclamped while training; see `decode`)."""

    config_class = PixelDecoderConfig
    activation_checkpointing = False  # recompute each block in backward (fae.nn.run_block); not in state_dict

    def __init__(self, config: PixelDecoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c, w, p = config, config.width, config.patch_size
        # zero-initialised, so the decoder starts as the plain ViT; it is the (N, D) table that brings the count to
        # App. D's 305.36M (docs/fidelity.md)
        self.input_pos = nn.Parameter(torch.zeros(1, c.num_tokens, c.in_dim)) if c.input_pos_embed else None
        self.proj_in = nn.Linear(c.in_dim, w)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(w, (c.grid, c.grid)).unsqueeze(0))
        self.blocks = nn.ModuleList(
            TransformerBlock(w, c.num_heads, c.mlp_ratio, norm=c.norm, mlp=c.mlp) for _ in range(c.depth)
        )
        self.norm = make_norm(c.norm, w)
        self.head = nn.Linear(w, p * p * c.out_channels)
        self.refine = ConvRefine(c.out_channels, c.refine_channels) if c.refine_channels else None
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.proj_in.weight)
        nn.init.zeros_(self.proj_in.bias)
        # small head: the first images are close to mid-grey instead of saturated noise
        nn.init.normal_(self.head.weight, std=0.02 / self.config.width ** 0.5)
        nn.init.zeros_(self.head.bias)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight differentiates against (the last layer that makes pixels)."""
        return self.refine.conv2.weight if self.refine is not None else self.head.weight

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, g*p, g*p); each token's vector is a (p, p, C) block in row-major grid order."""
        g = self.config.grid
        return unpatchify(patches, self.config.patch_size, self.config.out_channels, (g, g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d = self.config.num_tokens, self.config.in_dim
        if x.ndim != 3 or x.shape[1:] != (n, d):
            raise ValueError(f"pixel decoder expects feature tokens of shape (B, {n}, {d}), got {tuple(x.shape)}")
        if self.input_pos is not None:
            x = x + self.input_pos.to(x.dtype)
        h = self.proj_in(x) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            h = run_block(block, h, checkpointed=self.activation_checkpointing)
        y = self.unpatchify(self.head(self.norm(h)))
        if self.refine is not None:
            y = self.refine(y)
        return 0.5 * y + 0.5  # the network works in [-1, 1]; images are [0, 1]

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: eval-mode forward clamped to [0, 1] (through __call__, so an in-place compile applies)."""
        return self(x).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Gaussian embedding decoder noise (paper §4.2): x~ = x + eps, eps ~ N(0, sigma^2 I), sigma fixed.
# ---------------------------------------------------------------------------------------------------------------
def feature_rms(x: torch.Tensor) -> float:
    """Per-dimension root-mean-square of feature tokens: sqrt(mean(x^2)) = ||x|| / sqrt(D) averaged over tokens."""
    return float(x.detach().float().pow(2).mean().sqrt())


def scaled_noise_sigma(sigma: float, rms: float | None, ref_rms: float = 1.0,
                       mode: Literal["rms", "absolute"] = "rms") -> float:
    """The sigma rule. 'absolute': sigma as given. 'rms': sigma * rms / ref_rms, i.e. `sigma` is stated for features
    whose per-dimension RMS is `ref_rms` (1.0 = LayerNorm-normalised tokens, as DINOv2's final norm gives without its
    affine gain) and scales with the norm of the actual embeddings. docs/pixel-decoder.md explains why."""
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    if mode == "absolute":
        return float(sigma)
    if mode != "rms":
        raise ValueError(f"noise mode must be 'rms' or 'absolute', got {mode!r}")
    if rms is None or not rms > 0 or not ref_rms > 0:
        raise ValueError(f"the 'rms' noise rule needs positive feature and reference RMS, got {rms} and {ref_rms}")
    return float(sigma) * rms / ref_rms


class FeatureNoise(nn.Module):
    """Adds N(0, sigma^2) to feature tokens in training mode only; the identity in eval mode or at sigma 0."""

    def __init__(self, sigma: float = 0.0) -> None:
        super().__init__()
        if sigma < 0:
            raise ValueError(f"noise sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.training or self.sigma == 0:
            return x
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + self.sigma * noise

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:.4g}"

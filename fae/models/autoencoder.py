"""FeatureAutoEncoder: the single-attention encoder, the diagonal-Gaussian latent, and the 6-layer feature decoder.

Paper wiring (App. A/D, reconstructed from the stated 38.17M parameters): ONE fused linear maps each feature token
to query, key, value and a skip branch (4 x heads*head_dim); multi-head attention over all tokens; activation of
(skip + attention); one linear to 2*latent channels = mean and log-variance. The feature decoder is a pre-norm
transformer at the encoder's width with RMSNorm, SwiGLU, 2-D RoPE and a learned absolute position table
(170.43M parameters at the paper size). docs/autoencoder.md explains each choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fae.config import ConfigError
from fae.io import PretrainedMixin
from fae.nn import RoPE2D, TransformerBlock, attention, make_norm, run_block


@dataclass
class FAEConfig:
    feature_dim: int = 1536            # width D of the frozen encoder's tokens
    grid: tuple[int, int] = (16, 16)   # token grid (h, w); latents are (C, h, w)
    latent_channels: int = 32
    # single-attention encoder
    encoder_heads: int = 24
    encoder_head_dim: int = 256
    encoder_activation: Literal["gelu", "silu", "none"] = "gelu"
    encoder_input_norm: Literal["none", "layernorm", "rmsnorm"] = "none"  # non-affine: no parameters
    # feature decoder
    decoder_depth: int = 6
    decoder_heads: int = 24
    decoder_mlp_ratio: float = 4.0
    decoder_pos_embed: Literal["learned", "none"] = "learned"  # absolute table on top of RoPE
    decoder_rope: bool = True
    decoder_out_bias: bool = False     # a bias after the final RMSNorm: LayerNorm-affine targets carry one (fidelity.md)
    logvar_clamp: tuple[float, float] = (-30.0, 20.0)

    def validate(self) -> None:
        if self.feature_dim <= 0 or self.latent_channels <= 0:
            raise ValueError("feature_dim and latent_channels must be positive")
        if len(self.grid) != 2 or min(self.grid) <= 0:
            raise ValueError(f"grid must be two positive ints, got {self.grid}")
        if self.feature_dim % self.decoder_heads:
            raise ValueError(f"decoder_heads={self.decoder_heads} must divide feature_dim={self.feature_dim}")
        if self.decoder_rope and (self.feature_dim // self.decoder_heads) % 4:
            raise ValueError("decoder head dim (feature_dim / decoder_heads) must be divisible by 4 for 2-D RoPE")

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def check_encoder_shape(config: FAEConfig, encoder: Any, what: str = "the FAE", hint: str = "") -> None:
    """ConfigError, naming both shapes, unless `encoder` (anything with `.grid` and `.dim`, e.g. a FrozenEncoder)
    gives the token grid x width that `config` expects; `what` names the FAE side, `hint` ends the message."""
    if tuple(config.grid) != tuple(encoder.grid) or config.feature_dim != encoder.dim:
        raise ConfigError(f"{what}: {list(config.grid)} x {config.feature_dim} features expected (token grid x width), "
                          f"the encoder gives {list(encoder.grid)} x {encoder.dim}{hint}")


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) over latents (B, C, h, w)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean, self.logvar = mean, logvar

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent elements, one value per sample."""
        m, lv = self.mean.float(), self.logvar.float()
        return 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv).flatten(1).sum(1)


class SingleAttentionEncoder(nn.Module):
    """One attention layer whose input projections are merged into one linear (paper Fig. 7)."""

    def __init__(self, cfg: FAEConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.encoder_heads, cfg.encoder_head_dim
        inner = cfg.encoder_heads * cfg.encoder_head_dim
        self.input_norm = make_norm(cfg.encoder_input_norm, cfg.feature_dim, affine=False)
        self.proj_in = nn.Linear(cfg.feature_dim, 4 * inner)       # q, k, v, skip
        self.act = {"gelu": nn.GELU(), "silu": nn.SiLU(), "none": nn.Identity()}[cfg.encoder_activation]
        self.proj_out = nn.Linear(inner, 2 * cfg.latent_channels)  # mean, log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v, skip = self.proj_in(self.input_norm(x)).chunk(4, dim=-1)
        q, k, v = (t.view(b, n, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        attn = attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.proj_out(self.act(skip + attn))


class FeatureDecoder(nn.Module):
    """Latent tokens (B, N, C) -> reconstructed features (B, N, D)."""

    activation_checkpointing = False  # recompute each block in backward (fae.nn.run_block); not in state_dict

    def __init__(self, cfg: FAEConfig) -> None:
        super().__init__()
        d = cfg.feature_dim
        self.proj_in = nn.Linear(cfg.latent_channels, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d)) if cfg.decoder_pos_embed == "learned" else None
        self.rope = RoPE2D(d // cfg.decoder_heads, cfg.grid) if cfg.decoder_rope else None
        self.blocks = nn.ModuleList(
            TransformerBlock(d, cfg.decoder_heads, cfg.decoder_mlp_ratio, norm="rmsnorm", mlp="swiglu")
            for _ in range(cfg.decoder_depth)
        )
        self.norm = make_norm("rmsnorm", d)
        # a weight-only RMSNorm output has a fixed RMS per token up to the weight, so it cannot add the constant
        # offset (the LayerNorm bias) that the frozen encoder's features carry; this bias can
        self.out_bias = nn.Parameter(torch.zeros(d)) if cfg.decoder_out_bias else None
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(z)
        if self.pos_embed is not None:
            h = h + self.pos_embed
        for block in self.blocks:
            h = run_block(block, h, self.rope, checkpointed=self.activation_checkpointing)
        h = self.norm(h)
        return h + self.out_bias if self.out_bias is not None else h


class FeatureAutoEncoder(nn.Module, PretrainedMixin):
    config_class = FAEConfig

    def __init__(self, config: FAEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = SingleAttentionEncoder(config)
        self.decoder = FeatureDecoder(config)
        self.apply(_init_linear)

    def _check_features(self, x: torch.Tensor) -> None:
        n, d = self.config.num_tokens, self.config.feature_dim
        if x.ndim != 3 or x.shape[1:] != (n, d):
            raise ValueError(f"expected features of shape (B, {n}, {d}), got {tuple(x.shape)}")

    def tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, *self.config.grid)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check_features(x)
        mean, logvar = self.tokens_to_grid(self.encoder(x)).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(*self.config.logvar_clamp))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        c, (h, w) = self.config.latent_channels, self.config.grid
        if z.ndim != 4 or z.shape[1:] != (c, h, w):
            raise ValueError(f"expected latents of shape (B, {c}, {h}, {w}), got {tuple(z.shape)}")
        return self.decoder(z.flatten(2).transpose(1, 2))

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z), posterior


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def vae_loss(x: torch.Tensor, x_hat: torch.Tensor, posterior: DiagonalGaussian, kl_weight: float,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Paper eq. 4.1: ||x_hat - x||^2 + beta * KL. Both terms are means per element (features / latent elements),
    so beta does not depend on the token count or width; docs/autoencoder.md gives the default and why. Logs are
    detached 0-d tensors (no host sync in the step; the trainer reads them when it logs)."""
    mse = F.mse_loss(x_hat.float(), x.float())
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    cos = F.cosine_similarity(x_hat.float(), x.float(), dim=-1).mean()
    loss = mse + kl_weight * kl
    logs = {"mse": mse, "kl": kl, "cos": cos, "latent_std": posterior.std.mean()}
    return loss, {k: v.detach() for k, v in logs.items()}

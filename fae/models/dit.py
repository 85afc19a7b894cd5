"""LightningDiT / SiT: a class-conditional diffusion transformer on latent grids (B, C, h, w).

One model, switches for the pieces the paper's Table 6 ablates: the MLP (GELU or SwiGLU), the norm (LayerNorm or
RMSNorm), 2-D RoPE, QK-norm. "SiT" and "LightningDiT" are two presets of this file (`dit_config`):

    SiT          = GELU MLP, LayerNorm (no affine), fixed sin-cos position table
    LightningDiT = SwiGLU (hidden 2/3 * 4d), RMSNorm (with weight), sin-cos table + 2-D RoPE

Conditioning is DiT's adaLN-Zero on c = embed(t) + embed(y); label dropout to a null class trains the
unconditional branch used by classifier-free guidance (fae/transport.py does the guidance). The model predicts the
velocity v = eps - x0 (no learned sigma). Time t in [0, 1], t = 0 data, t = 1 noise (design.md).

Parameter count: LightningDiT-XL/1 on 16x16x32 latents is 675,256,736 parameters, the paper's 675.26M. That total
counts the fixed sin-cos table (256 x 1152), which, as in DiT, is a non-trainable nn.Parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from fae.io import PretrainedMixin
from fae.nn import (
    Attention,
    AttentionBackend,
    LabelEmbedder,
    RoPE2D,
    gated_residual,
    make_mlp,
    make_norm,
    modulate,
    patchify,
    run_block,
    sincos_pos_embed_2d,
    unpatchify,
)
from fae.threads import batch_parallel, splittable


@dataclass
class DiTConfig:
    input_size: tuple[int, int] = (16, 16)   # latent grid (h, w)
    in_channels: int = 32
    patch_size: int = 1
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000                  # class ids 0..num_classes-1; id num_classes is the null class
    class_dropout: float = 0.1               # probability a training label becomes the null class (CFG)
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    rope: bool = True
    qk_norm: bool = False
    pos_embed: Literal["sincos", "none"] = "sincos"
    attention_backend: Literal["auto", "sdpa", "math"] = "auto"

    def validate(self) -> None:
        h, w = self.input_size
        if min(h, w, self.in_channels, self.hidden_size, self.depth, self.num_heads) <= 0:
            raise ValueError("input_size, in_channels, hidden_size, depth and num_heads must be positive")
        if self.patch_size not in (1, 2, 4):
            raise ValueError(f"patch_size must be 1, 2 or 4, got {self.patch_size}")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if self.rope and (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"rope needs a head dim divisible by 4; hidden_size/num_heads = "
                             f"{self.hidden_size // self.num_heads}")
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise ValueError(f"sincos pos_embed needs hidden_size divisible by 4, got {self.hidden_size}")
        if self.num_classes < 0 or not 0.0 <= self.class_dropout < 1.0:
            raise ValueError("num_classes must be >= 0 and class_dropout in [0, 1)")

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid after patchifying."""
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size

    @property
    def null_class(self) -> int:
        return self.num_classes


# Size registry: (depth, hidden_size, num_heads) as DiT/SiT/LightningDiT; "tiny" is for tests and CPU demos.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 2),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
DIT_STRUCTURES: dict[str, dict] = {
    "SiT": dict(mlp="gelu", norm="layernorm", rope=False),
    "LightningDiT": dict(mlp="swiglu", norm="rmsnorm", rope=True),
}


def dit_config(name: str, **overrides) -> DiTConfig:
    """Config from a name such as "LightningDiT-XL/1" or "SiT-B/2", plus field overrides."""
    try:
        structure, rest = name.split("-", 1)
        size, patch = rest.split("/")
        depth, width, heads = DIT_SIZES[size]
        arch = DIT_STRUCTURES[structure]
    except (ValueError, KeyError):
        raise ValueError(f"unknown DiT name {name!r}; expected <{'|'.join(DIT_STRUCTURES)}>-"
                         f"<{'|'.join(DIT_SIZES)}>/<patch>, e.g. LightningDiT-XL/1") from None
    cfg = DiTConfig(depth=depth, hidden_size=width, num_heads=heads, patch_size=int(patch), **arch)
    cfg = replace(cfg, **overrides)
    cfg.validate()
    return cfg


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1]. t is scaled by 1000 so the frequencies cover the same range as DiT's
    integer diffusion steps (with t in [0, 1] directly, most frequencies would barely move)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # type: ignore[arg-type]  # mlp[0] is a Linear


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are shifted, scaled and gated by the condition (adaLN-Zero)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        affine = cfg.norm == "rmsnorm"  # as the references: DiT/SiT LayerNorm has no affine, LightningDiT RMSNorm has
        self.norm1 = make_norm(cfg.norm, d, affine=affine)
        self.attn = Attention(d, cfg.num_heads, qk_norm=cfg.qk_norm, backend=_backend(cfg))
        self.norm2 = make_norm(cfg.norm, d, affine=affine)
        self.mlp = make_mlp(cfg.mlp, d, cfg.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RoPE2D | None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = gated_residual(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1), rope))
        return gated_residual(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm = make_norm(cfg.norm, d, affine=cfg.norm == "rmsnorm")
        self.linear = nn.Linear(d, cfg.patch_size ** 2 * cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module, PretrainedMixin):
    """forward(x (B,C,h,w), t (B,) in [0,1], y (B,) int64 or None = unconditional) -> velocity (B,C,h,w)."""

    config_class = DiTConfig
    activation_checkpointing = False  # recompute each block in backward (fae.nn.run_block); not in state_dict

    pos_embed: nn.Parameter | None  # declared for the type checker: None without the sincos table

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = cfg = config
        d, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Linear(p * p * cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout)
        if cfg.pos_embed == "sincos":  # fixed table; a frozen Parameter as in DiT, so the paper's count includes it
            self.pos_embed = nn.Parameter(sincos_pos_embed_2d(d, cfg.grid)[None], requires_grad=False)
        else:
            self.pos_embed = None
        self.rope = RoPE2D(d // cfg.num_heads, cfg.grid) if cfg.rope else None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)  # type: ignore[arg-type]  # Linears (Module attributes type loosely)
        # adaLN-Zero: every block starts as the identity and the output as zero
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)  # type: ignore[index, union-attr]  # blocks hold adaLN Linears
            nn.init.zeros_(block.adaLN_modulation[-1].bias)  # type: ignore[index, union-attr]  # (as above)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)  # type: ignore[arg-type]  # Linears (Module attributes type loosely)
            nn.init.zeros_(layer.bias)  # type: ignore[arg-type]  # (as above)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.config.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.config.patch_size, self.config.in_channels, self.config.grid)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, *cfg.input_size):
            raise ValueError(f"expected latents (B, {cfg.in_channels}, {cfg.input_size[0]}, {cfg.input_size[1]}), "
                             f"got {tuple(x.shape)}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        t = t.expand(b) if t.ndim == 0 else t
        if y is None:  # (labels are range-checked where they enter, fae.data.labels: no host sync here)
            y = torch.full((b,), cfg.null_class, dtype=torch.long, device=x.device)
        c = self.t_embedder(t) + self.y_embedder(y, generator)  # label dropout drawn here, once for the batch
        if splittable(x, self):  # on a CPU, the batch over the threads where that measured faster
            return batch_parallel(self, self._velocity, (x, c))
        return self._velocity(x, c)

    def _velocity(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The velocity of latents `x` under the condition `c` (time and label embedded): no random draws."""
        h = self.x_embedder(self.patchify(x))
        if self.pos_embed is not None:
            h = h + self.pos_embed.to(h.dtype)
        for block in self.blocks:
            h = run_block(block, h, c, self.rope, checkpointed=self.activation_checkpointing)
        return self.unpatchify(self.final_layer(h, c))


def _backend(cfg: DiTConfig) -> AttentionBackend | None:
    return None if cfg.attention_backend == "auto" else cfg.attention_backend

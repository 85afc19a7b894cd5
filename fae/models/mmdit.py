"""MMDiT: a text-conditional diffusion transformer on latent grids (B, C, h, w), in the style of SD3.

Text token states and latent tokens run in two streams with their own weights (adaLN, QKV, output projection, MLP)
and meet in one joint attention over the concatenation [text; image]. Each block is conditioned by adaLN-Zero on
c = embed(t) + embed(pooled text). The derived block design, and why, is in docs/text-to-image.md:

    per stream: LayerNorm (no affine) -> modulate -> QKV (+ QK RMSNorm) ─┐
                                               joint attention over [text; image], padded text keys masked
    per stream: <- gate * proj(attn) ; LayerNorm -> modulate -> GELU MLP (ratio 4) -> gate
    the last block's text stream only supplies keys/values (its outputs are never read, so it has no proj/MLP)

Image tokens get 2-D RoPE (or a fixed sin-cos table); text tokens carry the text encoder's own positions.
The null condition for caption dropout and guidance is the text encoder's embedding of the empty prompt, held in
buffers (`null_tokens`, `null_mask`, `null_pooled`) that the training stage fills from the latent cache, so the
unconditional branch is exactly what an empty prompt gives.

Parameter counts (meta device): the paper's size on 16x16x32 latents with T5-XL states (2048-d) is 600.61M
(paper 603.46M, -0.47%); the 384-px showcase on 24x24x64 is 2027.55M (paper 2017.84M, +0.48%).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from fae.io import PretrainedMixin
from fae.models.dit import FinalLayer, TimestepEmbedder
from fae.nn import (
    AttentionBackend,
    Mlp,
    RMSNorm,
    RoPE2D,
    attention,
    make_norm,
    modulate,
    patchify,
    run_block,
    sincos_pos_embed_2d,
    unpatchify,
)
from fae.threads import batch_parallel, splittable


@dataclass
class MMDiTConfig:
    input_size: tuple[int, int] = (16, 16)   # latent grid (h, w)
    in_channels: int = 32
    patch_size: int = 1
    hidden_size: int = 1024
    depth: int = 16
    num_heads: int = 16
    mlp_ratio: float = 4.0
    text_dim: int = 2048                     # width of the text encoder's token states and pooled vector (T5-XL)
    text_tokens: int = 128                   # text length the null condition is stored at (the encoder's max_length)
    caption_dropout: float = 0.1             # probability a training caption becomes the null (empty prompt)
    qk_norm: bool = True
    pos_embed: Literal["rope", "sincos"] = "rope"
    attention_backend: Literal["auto", "sdpa", "math"] = "auto"

    def validate(self) -> None:
        h, w = self.input_size
        if min(h, w, self.in_channels, self.hidden_size, self.depth, self.num_heads, self.text_dim,
               self.text_tokens) <= 0:
            raise ValueError("input_size, in_channels, hidden_size, depth, num_heads, text_dim and text_tokens must "
                             "be positive")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if self.pos_embed == "rope" and (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"rope needs a head dim divisible by 4; hidden_size/num_heads = "
                             f"{self.hidden_size // self.num_heads}")
        if self.pos_embed not in ("rope", "sincos"):
            raise ValueError(f"pos_embed must be rope or sincos, not {self.pos_embed!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {self.caption_dropout}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size

    norm = "layernorm"   # for the DiT FinalLayer this model shares: LayerNorm without affine, as SD3


# Sizes: (depth, hidden_size, num_heads) plus the latent each was published on. "paper" = App. D's MMDiT (CC12M,
# T5-XL), "paper-384" = its 2B showcase model on a SigLIP2-FAE's 24x24x64 latents; the rest are for CPUs and tests.
MMDIT_SIZES: dict[str, dict] = {
    "tiny": dict(depth=2, hidden_size=64, num_heads=2),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "paper": dict(depth=16, hidden_size=1024, num_heads=16, input_size=(16, 16), in_channels=32),
    "paper-384": dict(depth=24, hidden_size=1536, num_heads=24, input_size=(24, 24), in_channels=64),
}


def mmdit_config(size: str, **overrides) -> MMDiTConfig:
    """Config for a registered size ("paper", "paper-384", "tiny", "S", "B") plus field overrides."""
    if size not in MMDIT_SIZES:
        raise ValueError(f"unknown MMDiT size {size!r}; choose one of {', '.join(MMDIT_SIZES)}")
    cfg = replace(MMDiTConfig(**MMDIT_SIZES[size]), **overrides)
    cfg.validate()
    return cfg


@dataclass
class TextCondition:
    """Text conditions for a batch: token states (B, L, Dt), a mask (B, L) (True = a real token) and the pooled
    vector (B, Dt). What fae.encoders.text produces and the latent cache stores."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def cat(self, other: TextCondition) -> TextCondition:
        return TextCondition(torch.cat([self.tokens, other.tokens]), torch.cat([self.mask, other.mask]),
                             torch.cat([self.pooled, other.pooled]))

    def to(self, device: torch.device | str) -> TextCondition:
        return TextCondition(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def select(self, index: torch.Tensor | list[int] | slice) -> TextCondition:
        return TextCondition(self.tokens[index], self.mask[index], self.pooled[index])


class Stream(nn.Module):
    """One modality's weights in a joint block. `pre_only`: it only supplies keys and values (no output)."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim, self.pre_only = cfg.num_heads, d // cfg.num_heads, pre_only
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, (2 if pre_only else 6) * d))
        self.norm1 = make_norm("layernorm", d, affine=False)
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm = RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(d, d)
            self.norm2 = make_norm("layernorm", d, affine=False)
            self.mlp = Mlp(d, int(d * cfg.mlp_ratio))

    def qkv_heads(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q, k, v) as (B, H, N, Dh) and the modulation chunks the output step needs."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=-1)
        b, n, d = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), mods[0], mods[1])).view(b, n, 3, self.num_heads,
                                                                           self.head_dim).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v, *mods[2:]

    def output(self, x: torch.Tensor, attn: torch.Tensor, gate1: torch.Tensor, shift2: torch.Tensor,
               scale2: torch.Tensor, gate2: torch.Tensor) -> torch.Tensor:
        x = x + gate1.unsqueeze(1) * self.proj(attn)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class JointBlock(nn.Module):
    def __init__(self, cfg: MMDiTConfig, last: bool = False) -> None:
        super().__init__()
        self.text = Stream(cfg, pre_only=last)
        self.image = Stream(cfg)
        self.backend: AttentionBackend | None = None if cfg.attention_backend == "auto" else cfg.attention_backend

    def forward(self, txt: torch.Tensor, img: torch.Tensor, c: torch.Tensor, mask: torch.Tensor,
                rope: RoPE2D | None) -> tuple[torch.Tensor, torch.Tensor]:
        qt, kt, vt, *mod_t = self.text.qkv_heads(txt, c)
        qi, ki, vi, *mod_i = self.image.qkv_heads(img, c)
        if rope is not None:
            qi, ki = rope(qi), rope(ki)
        out = attention(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2), self.backend, mask)
        out = out.transpose(1, 2).flatten(2)
        lt = txt.shape[1]
        img = self.image.output(img, out[:, lt:], *mod_i)
        if not self.text.pre_only:
            txt = self.text.output(txt, out[:, :lt], *mod_t)
        return txt, img


class MMDiT(nn.Module, PretrainedMixin):
    """forward(x (B,C,h,w), t (B,) in [0,1], y: TextCondition or None = the null (empty prompt)) -> velocity."""

    config_class = MMDiTConfig
    activation_checkpointing = False  # recompute each joint block in backward (fae.nn.run_block); not in state_dict

    null_tokens: torch.Tensor  # buffers (register_buffer), declared for the type checker
    null_mask: torch.Tensor
    null_pooled: torch.Tensor
    pos_embed: nn.Parameter | None

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = cfg = config
        d, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Linear(p * p * cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        # T5 states are large and not centred: a two-layer projection (PixArt's caption projection) into the width
        self.context_embedder = _two_layer(cfg.text_dim, d)
        self.pooled_embedder = _two_layer(cfg.text_dim, d, act=nn.SiLU())  # SD3's pooled-text embedder
        if cfg.pos_embed == "sincos":  # fixed table, a frozen Parameter as in DiT
            self.pos_embed = nn.Parameter(sincos_pos_embed_2d(d, cfg.grid)[None], requires_grad=False)
            self.rope = None
        else:
            self.pos_embed = None
            self.rope = RoPE2D(d // cfg.num_heads, cfg.grid)
        self.blocks = nn.ModuleList(JointBlock(cfg, last=i == cfg.depth - 1) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)  # type: ignore[arg-type]  # it reads hidden_size, patch, channels, norm only
        self.register_buffer("null_tokens", torch.zeros(cfg.text_tokens, cfg.text_dim))
        self.register_buffer("null_mask", torch.zeros(cfg.text_tokens, dtype=torch.bool))
        self.register_buffer("null_pooled", torch.zeros(cfg.text_dim))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)  # type: ignore[arg-type]  # Linears (Module attributes type loosely)
        # adaLN-Zero: every block starts as the identity and the output as zero
        for block in self.blocks:
            for stream in (block.text, block.image):
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)  # type: ignore[index, union-attr]  # blocks hold adaLN Linears
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)  # type: ignore[index, union-attr]  # (as above)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)  # type: ignore[arg-type]  # Linears (Module attributes type loosely)
            nn.init.zeros_(layer.bias)  # type: ignore[arg-type]  # (as above)

    @torch.no_grad()
    def set_null(self, null: TextCondition) -> None:
        """Store the empty prompt's embedding (one row) as the null condition."""
        tokens, mask = null.tokens.reshape(-1, self.config.text_dim), null.mask.reshape(-1)
        if tokens.shape != self.null_tokens.shape:
            raise ValueError(f"null text states {tuple(tokens.shape)} do not match text_tokens x text_dim = "
                             f"{tuple(self.null_tokens.shape)}")
        self.null_tokens.copy_(tokens)
        self.null_mask.copy_(mask)
        self.null_pooled.copy_(null.pooled.reshape(-1))

    def null_condition(self, batch: int) -> TextCondition:
        return TextCondition(self.null_tokens.expand(batch, -1, -1), self.null_mask.expand(batch, -1),
                             self.null_pooled.expand(batch, -1))

    def drop_captions(self, y: TextCondition, generator: torch.Generator | None = None) -> TextCondition:
        """Training: each caption becomes the null with probability caption_dropout."""
        drop = torch.rand(len(y), generator=generator, device=y.tokens.device) < self.config.caption_dropout
        null = self.null_condition(len(y))
        return TextCondition(torch.where(drop[:, None, None], null.tokens, y.tokens),
                             torch.where(drop[:, None], null.mask, y.mask),
                             torch.where(drop[:, None], null.pooled, y.pooled))

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: TextCondition | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, *cfg.input_size):
            raise ValueError(f"expected latents (B, {cfg.in_channels}, {cfg.input_size[0]}, {cfg.input_size[1]}), "
                             f"got {tuple(x.shape)}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        t = t.expand(b) if t.ndim == 0 else t
        if y is None:
            y = self.null_condition(b)
        elif y.tokens.shape[0] != b or y.tokens.shape[-1] != cfg.text_dim:
            raise ValueError(f"text states {tuple(y.tokens.shape)} do not fit a batch of {b} at text_dim "
                             f"{cfg.text_dim}")
        if self.training and cfg.caption_dropout > 0:
            y = self.drop_captions(y, generator)  # drawn here, once for the batch
        args = (x, t, y.tokens, y.mask, y.pooled)
        if splittable(x, self):  # on a CPU, the batch over the threads where that measured faster
            return batch_parallel(self, self._velocity, args)
        return self._velocity(*args)

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                  pooled: torch.Tensor) -> torch.Tensor:
        """The velocity of latents `x` at times `t` (B,) under the text states, mask and pooled vector of
        TextCondition: no random draws."""
        cfg = self.config
        dtype = self.x_embedder.weight.dtype
        img = self.x_embedder(patchify(x, cfg.patch_size))
        if self.pos_embed is not None:
            img = img + self.pos_embed.to(img.dtype)
        txt = self.context_embedder(tokens.to(dtype))
        c = self.t_embedder(t) + self.pooled_embedder(pooled.to(dtype))
        # every image key is real; padded text keys are masked out
        keys = torch.cat([mask.bool(), torch.ones(x.shape[0], img.shape[1], dtype=torch.bool, device=x.device)],
                         dim=1)
        mask = keys[:, None, None, :]
        for block in self.blocks:
            txt, img = run_block(block, txt, img, c, mask, self.rope, checkpointed=self.activation_checkpointing)
        return unpatchify(self.final_layer(img, c), cfg.patch_size, cfg.in_channels, cfg.grid)


def _two_layer(d_in: int, d: int, act: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), act or nn.GELU(approximate="tanh"), nn.Linear(d, d))

"""STARFlow: a transformer autoregressive normalizing flow on latent grids (B, C, h, w).

The flow maps a latent x to Gaussian noise z through a stack of affine autoregressive blocks (TarFlow). Each block
reads the tokens in its own order (grid order, then reversed, alternating) and a causal transformer predicts, from
the tokens before position i only, a scale a_i > 0 and a shift b_i for token i:

    z_i = (x_i - b_i) / a_i,        log |det dz/dx| = -sum_i sum_c log a_i,c

The Jacobian is triangular, so the log-determinant is exact and the inverse x_i = a_i z_i + b_i runs token by token
(with a KV cache: each step adds one token's keys and values). STARFlow's deep-shallow layout: the block nearest the
noise, the last one in the data -> noise direction and the first one sampled, is deep; the others are shallow
(`layers_per_block`, data side first, e.g. 2-2-2-2-2-18).

Class conditioning: one class table with a null row (label dropout, once per sample, trains the unconditional
branch); its embedding is added to every token of the conditioned blocks (all, or the deep one with
`cond_top_only`, as STARFlow conditions text).

Guidance (STARFlow's flow guidance): at each token the conditional N(b_c, a_c^2) and unconditional N(b_u, a_u^2)
predictions combine as the Gaussian p_c^s p_u^(1-s) (s = the guidance scale; s = 1 is the conditional model):

    r = min(a_c^2 / a_u^2, 1),   a = a_c / sqrt(s - (s - 1) r),   b = (s b_c - (s - 1) r b_u) / (s - (s - 1) r)

The scale can vary over the sequence: token i of T (in generation order) sits at t = 1 - (i + 1) / T, the time
axis of fae.transport's guidance schedules (t = 1 noise end, t = 0 data end).

Parameter count: the paper's default STARFlow (ml-starflow's 1.4B layout: 6 blocks of width 2048, layers
2-2-2-2-2-18, heads of 64) on 16x16x32 latents is 1,413,298,752 parameters with 1000 classes (docs/flow.md).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fae.io import PretrainedMixin
from fae.nn import (
    AttentionBackend,
    LabelEmbedder,
    RoPE2D,
    attention,
    make_mlp,
    make_norm,
    patchify,
    run_block,
    unpatchify,
)

INV_SOFTPLUS_1 = math.log(math.e - 1)  # softplus(raw + this) = 1 at raw = 0: a zero output is the identity map
ScaleAt = Callable[[float], float]     # guidance scale at time t of the token being sampled


@dataclass
class StarFlowConfig:
    input_size: tuple[int, int] = (16, 16)         # latent grid (h, w)
    in_channels: int = 32
    patch_size: int = 1
    hidden_size: int = 2048
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2, 2, 18)  # data side first; the last (deep) block samples first
    head_dim: int = 64
    mlp_ratio: float = 4.0
    num_classes: int = 1000                        # ids 0..num_classes-1; id num_classes is the null class
    class_dropout: float = 0.1
    cond_top_only: bool = False                    # condition only the deep block (STARFlow's text conditioning)
    scale_fn: Literal["softplus", "exp"] = "softplus"   # a = softplus(raw + c) (STARFlow) or exp(raw) (TarFlow)
    soft_clip: float = 0.0                         # raw outputs -> k tanh(raw / k) when > 0 (STARFlow T2I: 4)
    rope: bool = True                              # 2-D RoPE at each token's grid position; else a learned table
    mlp: Literal["gelu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    attention_backend: Literal["auto", "sdpa", "math"] = "auto"

    def validate(self) -> None:
        h, w = self.input_size
        if min(h, w, self.in_channels, self.hidden_size, self.head_dim, self.patch_size) <= 0:
            raise ValueError("input_size, in_channels, hidden_size, head_dim and patch_size must be positive")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if not self.layers_per_block or min(self.layers_per_block) < 1:
            raise ValueError(f"layers_per_block needs at least one block of >= 1 layer, got {self.layers_per_block}")
        if self.hidden_size % self.head_dim:
            raise ValueError(f"head_dim={self.head_dim} must divide hidden_size={self.hidden_size}")
        if self.rope and self.head_dim % 4:
            raise ValueError(f"rope needs head_dim divisible by 4, got {self.head_dim}")
        if self.num_classes < 0 or not 0.0 <= self.class_dropout < 1.0:
            raise ValueError("num_classes must be >= 0 and class_dropout in [0, 1)")
        if self.soft_clip < 0:
            raise ValueError("soft_clip must be >= 0 (0 = off)")

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def token_dim(self) -> int:
        return self.patch_size ** 2 * self.in_channels

    @property
    def null_class(self) -> int:
        return self.num_classes


# Size registry: (hidden_size, layers_per_block, head_dim). "1.4B" is ml-starflow's TarFlow_XLv2_1 ("1.4B"), the
# default configuration the paper trains on FAE latents (§5.3); "tiny" is for tests.
STARFLOW_SIZES: dict[str, tuple[int, tuple[int, ...], int]] = {
    "tiny": (32, (1, 1), 16),
    "small": (384, (2, 2, 2, 2, 2, 8), 64),
    "1.4B": (2048, (2, 2, 2, 2, 2, 18), 64),
}


def starflow_config(size: str, **overrides) -> StarFlowConfig:
    """Config of a registered size ("tiny", "small", "1.4B") plus field overrides."""
    if size not in STARFLOW_SIZES:
        raise ValueError(f"unknown STARFlow size {size!r}; choose one of {', '.join(STARFLOW_SIZES)}")
    width, layers, head_dim = STARFLOW_SIZES[size]
    cfg = replace(StarFlowConfig(hidden_size=width, layers_per_block=layers, head_dim=head_dim), **overrides)
    cfg.validate()
    return cfg


def guided_affine(a_c: torch.Tensor, b_c: torch.Tensor, a_u: torch.Tensor, b_u: torch.Tensor, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the Gaussian p_c^s p_u^(1-s) (module docstring); s = 1 returns the conditional (a_c, b_c)."""
    r = (a_c / a_u).square().clamp(max=1.0)  # keeps the combined precision positive
    denom = scale - (scale - 1.0) * r
    return a_c / denom.sqrt(), (scale * b_c - (scale - 1.0) * r * b_u) / denom


class CausalLayer(nn.Module):
    """Pre-norm transformer layer with causal self-attention and an optional KV cache (a dict it appends to)."""

    def __init__(self, cfg: StarFlowConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = d // cfg.head_dim, cfg.head_dim
        self.backend: AttentionBackend | None = None if cfg.attention_backend == "auto" else cfg.attention_backend
        self.norm1 = make_norm(cfg.norm, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = make_norm(cfg.norm, d)
        self.mlp = make_mlp(cfg.mlp, d, cfg.mlp_ratio)

    def forward(self, h: torch.Tensor, rope: RoPE2D | None, positions: torch.Tensor,
                cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rope(q, positions), rope(k, positions)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        total = k.shape[2]  # query j (of the last n) sees keys 0 .. total - n + j
        mask = None if n == 1 else torch.ones(n, total, dtype=torch.bool, device=h.device).tril(total - n)
        out = attention(q, k, v, self.backend, mask)
        h = h + self.proj(out.transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(self.norm2(h))


class FlowBlock(nn.Module):
    """One affine autoregressive flow over the token sequence, in grid order or reversed."""

    activation_checkpointing = False  # recompute each layer in backward (fae.nn.run_block); not in state_dict

    order: torch.Tensor  # a buffer (register_buffer), declared for the type checker

    def __init__(self, cfg: StarFlowConfig, num_layers: int, reverse: bool, conditioned: bool) -> None:
        super().__init__()
        d, c, n = cfg.hidden_size, cfg.token_dim, cfg.num_tokens
        self.cfg, self.reverse, self.conditioned = cfg, reverse, conditioned
        self.start = nn.Parameter(torch.randn(1, 1, c) * 0.02)   # the input that predicts the first token
        self.proj_in = nn.Linear(c, d)
        self.pos_embed = None if cfg.rope else nn.Parameter(torch.randn(n, d) * 0.02)
        self.rope = RoPE2D(cfg.head_dim, cfg.grid) if cfg.rope else None
        self.layers = nn.ModuleList(CausalLayer(cfg) for _ in range(num_layers))
        self.norm = make_norm(cfg.norm, d)
        self.proj_out = nn.Linear(d, 2 * c)
        nn.init.zeros_(self.proj_out.weight)  # a zero output is a = 1, b = 0: every block starts as the identity
        nn.init.zeros_(self.proj_out.bias)
        # grid position of the token predicted at each sequence step (the query position of RoPE / the table)
        order = torch.arange(n).flip(0) if reverse else torch.arange(n)
        self.register_buffer("order", order, persistent=False)

    def _permute(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1) if self.reverse else x  # a flip is its own inverse

    def _trunk(self, inp: torch.Tensor, cond: torch.Tensor | None, positions: torch.Tensor,
               caches: list[dict[str, torch.Tensor]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, n, C) at sequence steps `positions` -> (log a or raw scale, b), each (B, n, C) float32."""
        h = self.proj_in(inp)
        if self.pos_embed is not None:
            h = h + self.pos_embed[self.order[positions]].to(h.dtype)
        if cond is not None and self.conditioned:
            h = h + cond[:, None].to(h.dtype)
        for i, layer in enumerate(self.layers):
            if caches is None:
                h = run_block(layer, h, self.rope, self.order[positions], checkpointed=self.activation_checkpointing)
            else:  # KV-cached sampling (no gradients)
                h = layer(h, self.rope, self.order[positions], caches[i])
        raw = self.proj_out(self.norm(h)).float()
        if self.cfg.soft_clip > 0:
            raw = self.cfg.soft_clip * torch.tanh(raw / self.cfg.soft_clip)
        raw_a, shift = raw.chunk(2, dim=-1)
        return raw_a, shift

    def _scale(self, raw_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, log a) from the raw output, stably."""
        if self.cfg.scale_fn == "exp":
            return raw_a.exp(), raw_a
        a = F.softplus(raw_a + INV_SOFTPLUS_1)
        return a, a.log()

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens x (B, N, C) in grid order -> z (B, N, C) in grid order, log|det dz/dx| (B,)."""
        u = self._permute(x)
        inp = torch.cat([self.start.expand(u.shape[0], -1, -1).to(u.dtype), u[:, :-1]], dim=1)
        raw_a, shift = self._trunk(inp, cond, torch.arange(u.shape[1], device=u.device))
        a, log_a = self._scale(raw_a)
        z = (u.float() - shift) / a
        return self._permute(z), -log_a.sum(dim=(1, 2))

    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None, null: torch.Tensor | None = None,
                scale_at: ScaleAt | None = None, kv_cache: bool = True) -> torch.Tensor:
        """Noise tokens z (B, N, C) -> x (B, N, C), token by token. With `null` (the null-class embedding rows) and a
        `scale_at` that guides somewhere, each step runs the conditional and unconditional branches together."""
        zu = self._permute(z).float()
        b, n, _ = zu.shape
        times = [1.0 - (i + 1) / n for i in range(n)]
        guided = (self.conditioned and null is not None and scale_at is not None
                  and any(scale_at(t) != 1.0 for t in times))
        cond = torch.cat([cond, null]) if guided else cond  # type: ignore[list-item]  # guided: both are set
        u = torch.zeros_like(zu)
        caches: list[dict[str, torch.Tensor]] | None = [{} for _ in self.layers] if kv_cache else None
        start = self.start.expand(b, -1, -1).to(zu.dtype)
        for i in range(n):
            if kv_cache:  # only the newest input token; earlier keys/values come from the cache
                inp, steps = (start if i == 0 else u[:, i - 1:i]), torch.arange(i, i + 1, device=z.device)
            else:         # the whole prefix again
                inp, steps = torch.cat([start, u[:, :i]], dim=1), torch.arange(i + 1, device=z.device)
            if guided:
                inp = torch.cat([inp, inp])
            raw_a, shift = self._trunk(inp, cond, steps, caches)
            a, _ = self._scale(raw_a[:, -1])
            shift = shift[:, -1]
            if guided:
                (a_c, a_u), (b_c, b_u) = a.chunk(2), shift.chunk(2)
                a, shift = guided_affine(a_c, b_c, a_u, b_u, scale_at(times[i]))  # type: ignore[misc]  # guided: scale_at set
            u[:, i] = zu[:, i] * a + shift
        return self._permute(u)


class StarFlow(nn.Module, PretrainedMixin):
    """forward(x (B,C,h,w), y (B,) or None = unconditional) -> (z (B,C,h,w), log|det dz/dx| (B,));
    inverse(z, y, scale_at) -> x; log_prob, bits_per_dim, denoise."""

    config_class = StarFlowConfig

    def __init__(self, config: StarFlowConfig) -> None:
        super().__init__()
        config.validate()
        self.config = cfg = config
        last = len(cfg.layers_per_block) - 1
        self.blocks = nn.ModuleList(
            FlowBlock(cfg, layers, reverse=i % 2 == 1, conditioned=cfg.num_classes > 0 and (i == last or not
                                                                                           cfg.cond_top_only))
            for i, layers in enumerate(cfg.layers_per_block))
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout) \
            if cfg.num_classes > 0 else None

    # ----------------------------------------------------------------------------------------------- tokens
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), tokens in row-major order."""
        return patchify(x, self.config.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.config.patch_size, self.config.in_channels, self.config.grid)

    def _check(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, *cfg.input_size):
            raise ValueError(f"expected latents (B, {cfg.in_channels}, {cfg.input_size[0]}, {cfg.input_size[1]}), "
                             f"got {tuple(x.shape)}")

    def _condition(self, y: torch.Tensor | None, batch: int, device: torch.device,
                   generator: torch.Generator | None = None) -> torch.Tensor | None:
        if self.y_embedder is None:
            return None
        cfg = self.config
        if y is None:  # (labels are range-checked where they enter, fae.data.labels: no host sync here)
            y = torch.full((batch,), cfg.null_class, dtype=torch.long, device=device)
        return self.y_embedder(y, generator)  # drops labels to the null class in training mode, once per sample

    # ----------------------------------------------------------------------------------------------- the flow
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x)
        cond = self._condition(y, x.shape[0], x.device, generator)
        h, logdet = self.patchify(x), x.new_zeros(x.shape[0], dtype=torch.float32)
        for block in self.blocks:
            h, ld = block(h, cond)
            logdet = logdet + ld
        return self.unpatchify(h), logdet

    def inverse(self, z: torch.Tensor, y: torch.Tensor | None = None, scale_at: ScaleAt | None = None,
                kv_cache: bool = True) -> torch.Tensor:
        """Noise (B,C,h,w) -> latents, deep block first. `scale_at(t)` is the guidance scale (None: unguided)."""
        self._check(z)
        cond = self._condition(y, z.shape[0], z.device)
        null = self._condition(None, z.shape[0], z.device) if y is not None and scale_at is not None else None
        h = self.patchify(z)
        for block in reversed(self.blocks):
            h = block.inverse(h, cond, null, scale_at, kv_cache)  # type: ignore[operator]  # blocks holds FlowBlocks
        return self.unpatchify(h)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x | y) in nats per sample (B,), under the standard normal prior on z."""
        return log_likelihood(*self(x, y))

    def bits_per_dim(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Negative log-likelihood in bits per dimension (B,)."""
        return bits_per_dim(*self(x, y))

    def denoise(self, x: torch.Tensor, y: torch.Tensor | None, noise_std: float) -> torch.Tensor:
        """One score step x + sigma^2 grad log p(x | y): the posterior mean E[clean | x] of latents trained with
        N(0, sigma^2) noise added (Tweedie), with the flow's own likelihood as the noisy density."""
        with torch.enable_grad():
            x = x.detach().float().requires_grad_(True)
            grad, = torch.autograd.grad(self.log_prob(x, y).sum(), x)
        return (x + noise_std ** 2 * grad).detach()


def log_likelihood(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """log p(x) = log N(z; 0, I) + log|det dz/dx| in nats per sample (B,), from the flow's outputs."""
    d = z[0].numel()
    return -0.5 * z.float().pow(2).flatten(1).sum(1) - 0.5 * d * math.log(2 * math.pi) + logdet


def bits_per_dim(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """-log p(x) / (D ln 2) per sample (B,)."""
    return -log_likelihood(z, logdet) / (z[0].numel() * math.log(2))

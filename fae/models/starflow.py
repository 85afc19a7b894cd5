"""STARFlow: a transformer autoregressive normalizing flow on latent grids (B, C, h, w).

The flow maps a latent x to Gaussian noise z through a stack of affine autoregressive blocks (TarFlow). Each block
reads the tokens in its own order (grid order or reversed, alternating; `seq_order` says which one the deep block
gets, ml-starflow's switch) and a causal transformer predicts, from the tokens before position i only, a scale
a_i > 0 and a shift b_i for token i:

    z_i = (x_i - b_i) / a_i,        log |det dz/dx| = -sum_i sum_c log a_i,c

The Jacobian is triangular, so the log-determinant is exact and the inverse x_i = a_i z_i + b_i runs token by token
(with a KV cache: each step adds one token's keys and values), or by Jacobi iteration (`FlowSampling.jacobi`: every
position of a chunk at once, repeated until the update is below a tolerance; after k passes the first k tokens are
exact, so a chunk of L tokens is exact after L). STARFlow's deep-shallow layout: the block nearest the noise, the
last one in the data -> noise direction and the first one sampled, is deep (its width `top_block_channels` may
differ); the others are shallow (`layers_per_block`, data side first, e.g. 2-2-2-2-2-18).

Class conditioning: a class table with a null row (label dropout, once per sample, trains the unconditional
branch), in the conditioned blocks (all, or the deep one with `cond_top_only`). `class_conditioning: add` (TarFlow)
adds one shared embedding to every token; `prefix` (STARFlow: a one-hot label that each conditioned block projects
to a token in front of the sequence) gives each conditioned block its own table whose row is that prefix token.
RoPE (`rope_index`) rotates each query and key by the grid position of the token its step predicts (`grid`: a
reversed block sees the true geometry), or by the sequence step (`step`, STARFlow: a reversed block sees the grid
turned by 180 degrees); a prefix token is not rotated.

Guidance (STARFlow's flow guidance): at each token the conditional N(b_c, a_c^2) and unconditional N(b_u, a_u^2)
predictions combine as the Gaussian p_c^s p_u^(1-s) (s = the guidance scale; s = 1 is the conditional model):

    r = min(a_c^2 / a_u^2, 1),   a = a_c / sqrt(s - (s - 1) r),   b = (s b_c - (s - 1) r b_u) / (s - (s - 1) r)

s is ml-starflow's 1 + cfg (its `logits_guided` uses 1 + w where fae uses s). The scale can vary over the sequence:
token i of T (in generation order) sits at t = 1 - (i + 1) / T, the time axis of fae.transport's guidance schedules
(t = 1 noise end, t = 0 data end); `FlowSampling.annealed_guidance` ramps s - 1 by (i + 1) / T on top, and
`guide_top` guides the deep block only.

Parameter count: the paper's default STARFlow (ml-starflow's 1.4B layout: 6 blocks of width 2048, layers
2-2-2-2-2-18, heads of 64) on 16x16x32 latents is 1,413,298,752 parameters with 1000 classes (docs/flow.md),
with one class table (added, or as the deep block's prefix with `cond_top_only`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, overload

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
Caches = list[dict[str, torch.Tensor]]  # one {"k", "v"} per layer of a block


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
    rope: bool = True                              # 2-D RoPE; else a learned table at each token's grid position
    mlp: Literal["gelu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    attention_backend: Literal["auto", "sdpa", "math"] = "auto"
    # ml-starflow's switches (docs/flow.md has each one's file:line there); the defaults are fae's earlier behaviour
    seq_order: Literal["R2L", "L2R"] = "R2L"       # R2L: block 0 reads grid order, the next reversed, ...; L2R: the
    #                                                opposite, so the deep block of an even stack samples in raster order
    top_block_channels: int = 0                    # width of the deep block (0: hidden_size), heads of head_dim
    class_conditioning: Literal["add", "prefix"] = "add"   # one embedding added to every token, or a prefix token
    rope_index: Literal["grid", "step"] = "grid"   # RoPE at the predicted token's grid position, or at the step

    def validate(self) -> None:
        h, w = self.input_size
        if min(h, w, self.in_channels, self.hidden_size, self.head_dim, self.patch_size) <= 0:
            raise ValueError("input_size, in_channels, hidden_size, head_dim and patch_size must be positive")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if not self.layers_per_block or min(self.layers_per_block) < 1:
            raise ValueError(f"layers_per_block needs at least one block of >= 1 layer, got {self.layers_per_block}")
        for name, width in (("hidden_size", self.hidden_size), ("top_block_channels", self.top_block_channels)):
            if width < 0 or width % self.head_dim:
                raise ValueError(f"head_dim={self.head_dim} must divide {name}={width}")
        if self.rope and self.head_dim % 4:
            raise ValueError(f"rope needs head_dim divisible by 4, got {self.head_dim}")
        if self.num_classes < 0 or not 0.0 <= self.class_dropout < 1.0:
            raise ValueError("num_classes must be >= 0 and class_dropout in [0, 1)")
        if self.soft_clip < 0:
            raise ValueError("soft_clip must be >= 0 (0 = off)")
        for name, value, allowed in (("seq_order", self.seq_order, ("R2L", "L2R")),
                                     ("class_conditioning", self.class_conditioning, ("add", "prefix")),
                                     ("rope_index", self.rope_index, ("grid", "step"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if (self.class_conditioning == "add" and self.num_classes and not self.cond_top_only
                and self.top_width != self.hidden_size):
            raise ValueError("class_conditioning 'add' shares one class table among the conditioned blocks, so "
                             "top_block_channels needs cond_top_only or class_conditioning 'prefix' (a table per block)")

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

    @property
    def top_width(self) -> int:
        return self.top_block_channels or self.hidden_size

    def reversed_block(self, index: int) -> bool:
        """Whether block `index` (data side first) reads the tokens reversed: ml-starflow's R2L starts block 0 in grid
        order and alternates; L2R starts it reversed (`transformer_flow.py` Model.__init__)."""
        return index % 2 == (1 if self.seq_order == "R2L" else 0)


@dataclass
class FlowSampling:
    """How the inverse runs: ml-starflow's sampling switches (`sample.py`). A flow bundle records them (the flow stage's
    `sampling:`); `fae sample --flow KEY=VALUE` overrides one for a call."""

    guide_top: bool = False             # guide the deep block only; the shallow ones sample conditionally
    annealed_guidance: bool = False     # s - 1 grows as (i + 1) / T over each block's T tokens
    attention_temperature: float = 1.0  # divides the attention logits while sampling (ml-starflow's attn_temp)
    jacobi: bool = False                # Jacobi iteration instead of the token-by-token inverse
    jacobi_block_size: int = 0          # tokens per Jacobi chunk, chunks in order (0: the whole sequence at once)
    jacobi_max_iter: int = 0            # passes per chunk (0: the chunk's length, after which it is exact)
    jacobi_tolerance: float = 1e-3      # a chunk stops when mean((new - old)^2) / mean(new^2) falls below this

    def validate(self) -> None:
        if self.attention_temperature <= 0:
            raise ValueError(f"attention_temperature must be > 0, got {self.attention_temperature}")
        if self.jacobi_block_size < 0 or self.jacobi_max_iter < 0 or self.jacobi_tolerance < 0:
            raise ValueError("jacobi_block_size, jacobi_max_iter and jacobi_tolerance must be >= 0 (0 = default)")


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


def guided_affine(a_c: torch.Tensor, b_c: torch.Tensor, a_u: torch.Tensor, b_u: torch.Tensor,
                  scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the Gaussian p_c^s p_u^(1-s) (module docstring); s = 1 returns the conditional (a_c, b_c). `scale` may
    be a tensor that broadcasts against a_c (one scale per token)."""
    r = (a_c / a_u).square().clamp(max=1.0)  # keeps the combined precision positive
    denom = scale - (scale - 1.0) * r
    return a_c / denom.sqrt(), (scale * b_c - (scale - 1.0) * r * b_u) / denom


def guidance_scales(n: int, scale_at: ScaleAt | None, annealed: bool = False) -> list[float] | None:
    """The scale of each of a block's n tokens in generation order (token i at t = 1 - (i + 1) / n), or None where
    none differs from 1 (no unconditional branch to run). `annealed` ramps s - 1 by (i + 1) / n: ml-starflow's
    r = (t + 1) / T (transformer_flow.py MetaBlock.reverse)."""
    if scale_at is None:
        return None
    times = [1.0 - (i + 1) / n for i in range(n)]
    scales = [scale_at(t) for t in times]
    if annealed:
        scales = [1.0 + (s - 1.0) * (i + 1) / n for i, s in enumerate(scales)]
    return scales if any(s != 1.0 for s in scales) else None


class CausalLayer(nn.Module):
    """Pre-norm transformer layer with causal self-attention and an optional KV cache (a dict it appends to)."""

    def __init__(self, cfg: StarFlowConfig, width: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = width // cfg.head_dim, cfg.head_dim
        self.backend: AttentionBackend | None = None if cfg.attention_backend == "auto" else cfg.attention_backend
        self.norm1 = make_norm(cfg.norm, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = make_norm(cfg.norm, width)
        self.mlp = make_mlp(cfg.mlp, width, cfg.mlp_ratio)

    def forward(self, h: torch.Tensor, rope: RoPE2D | None, positions: torch.Tensor,
                cache: dict[str, torch.Tensor] | None = None, temperature: float = 1.0) -> torch.Tensor:
        """`positions` are the RoPE indices of the last len(positions) tokens; tokens before them (a class prefix)
        are not rotated."""
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            lead = n - positions.shape[0]
            q, k = (torch.cat([t[:, :, :lead], rope(t[:, :, lead:], positions)], dim=2) if lead else rope(t, positions)
                    for t in (q, k))
        if cache is not None:
            if cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        if temperature != 1.0:
            q = q / temperature
        total = k.shape[2]  # query j (of the last n) sees keys 0 .. total - n + j
        mask = None if n == 1 else torch.ones(n, total, dtype=torch.bool, device=h.device).tril(total - n)
        out = attention(q, k, v, self.backend, mask)
        h = h + self.proj(out.transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(self.norm2(h))


class FlowBlock(nn.Module):
    """One affine autoregressive flow over the token sequence, in grid order or reversed."""

    activation_checkpointing = False  # recompute each layer in backward (fae.nn.run_block); not in state_dict

    order: torch.Tensor           # buffers (register_buffer), declared for the type checker
    rope_positions: torch.Tensor

    def __init__(self, cfg: StarFlowConfig, num_layers: int, reverse: bool, conditioned: bool,
                 width: int | None = None) -> None:
        super().__init__()
        d, c, n = width or cfg.hidden_size, cfg.token_dim, cfg.num_tokens
        self.cfg, self.reverse, self.conditioned = cfg, reverse, conditioned
        self.start = nn.Parameter(torch.randn(1, 1, c) * 0.02)   # the input that predicts the first token
        self.proj_in = nn.Linear(c, d)
        self.pos_embed = None if cfg.rope else nn.Parameter(torch.randn(n, d) * 0.02)
        self.rope = RoPE2D(cfg.head_dim, cfg.grid) if cfg.rope else None
        # STARFlow's class path: the label's one-hot through a linear map is a row of a table (a one-hot sums to 1, so
        # the map's bias adds nothing a table cannot hold); the row goes in front of the sequence
        self.class_prefix = nn.Embedding(cfg.num_classes + 1, d) \
            if conditioned and cfg.class_conditioning == "prefix" else None
        self.layers = nn.ModuleList(CausalLayer(cfg, d) for _ in range(num_layers))
        self.norm = make_norm(cfg.norm, d)
        self.proj_out = nn.Linear(d, 2 * c)
        nn.init.zeros_(self.proj_out.weight)  # a zero output is a = 1, b = 0: every block starts as the identity
        nn.init.zeros_(self.proj_out.bias)
        # grid position of the token predicted at each sequence step (the query position of the table / grid RoPE)
        order = torch.arange(n).flip(0) if reverse else torch.arange(n)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("rope_positions", order if cfg.rope_index == "grid" else torch.arange(n), persistent=False)

    def _permute(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1) if self.reverse else x  # a flip is its own inverse

    def _trunk(self, inp: torch.Tensor, cond: torch.Tensor | None, steps: torch.Tensor,
               caches: Caches | None = None, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, n, C) at sequence steps `steps` -> (log a or raw scale, b), each (B, n, C) float32. `cond` is the
        class embedding (B, d) with `add`, the class ids (B,) with `prefix`."""
        h = self.proj_in(inp)
        if self.pos_embed is not None:
            h = h + self.pos_embed[self.order[steps]].to(h.dtype)
        prefixed = False
        if cond is not None and self.conditioned:
            if self.class_prefix is None:
                h = h + cond[:, None].to(h.dtype)
            elif caches is None or not caches[0]:  # the prefix enters with the first tokens, then sits in the cache
                h, prefixed = torch.cat([self.class_prefix(cond)[:, None].to(h.dtype), h], dim=1), True
        positions = self.rope_positions[steps]
        for i, layer in enumerate(self.layers):
            if caches is None:
                h = run_block(layer, h, self.rope, positions, checkpointed=self.activation_checkpointing)
            else:  # KV-cached sampling (no gradients)
                h = layer(h, self.rope, positions, caches[i], temperature)
        if prefixed:
            h = h[:, 1:]
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

    def _affine(self, raw_a: torch.Tensor, shift: torch.Tensor, scale: float | torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of the tokens being sampled; with a guidance `scale`, from the conditional first half of the batch
        and the unconditional second half."""
        a, _ = self._scale(raw_a)
        if scale is None:
            return a, shift
        (a_c, a_u), (b_c, b_u) = a.chunk(2), shift.chunk(2)
        return guided_affine(a_c, b_c, a_u, b_u, scale)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens x (B, N, C) in grid order -> z (B, N, C) in grid order, log|det dz/dx| (B,)."""
        u = self._permute(x)
        inp = torch.cat([self.start.expand(u.shape[0], -1, -1).to(u.dtype), u[:, :-1]], dim=1)
        raw_a, shift = self._trunk(inp, cond, torch.arange(u.shape[1], device=u.device))
        a, log_a = self._scale(raw_a)
        z = (u.float() - shift) / a
        return self._permute(z), -log_a.sum(dim=(1, 2))

    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None, null: torch.Tensor | None = None,
                scale_at: ScaleAt | None = None, kv_cache: bool = True, sampling: FlowSampling | None = None,
                stats: dict[str, int] | None = None) -> torch.Tensor:
        """Noise tokens z (B, N, C) -> x (B, N, C): token by token, or by Jacobi iteration (`sampling.jacobi`). With
        `null` (the null condition) and a `scale_at` that guides somewhere, the conditional and unconditional
        branches run as one batch. `stats["jacobi_passes"]` counts the Jacobi passes."""
        sampling = sampling or FlowSampling()
        zu = self._permute(z).float()
        b, n, _ = zu.shape
        scales = guidance_scales(n, scale_at, sampling.annealed_guidance) \
            if self.conditioned and null is not None else None
        if scales is not None:
            cond = torch.cat([cond, null])  # type: ignore[list-item]  # guided: both are set
        if sampling.jacobi:
            return self._permute(self._jacobi(zu, cond, scales, sampling, stats))
        u = torch.zeros_like(zu)
        caches: Caches | None = [{} for _ in self.layers] if kv_cache else None
        start = self.start.expand(b, -1, -1).to(zu.dtype)
        for i in range(n):
            if kv_cache:  # only the newest input token; earlier keys/values come from the cache
                inp, steps = (start if i == 0 else u[:, i - 1:i]), torch.arange(i, i + 1, device=z.device)
            else:         # the whole prefix again
                inp, steps = torch.cat([start, u[:, :i]], dim=1), torch.arange(i + 1, device=z.device)
            if scales is not None:
                inp = torch.cat([inp, inp])
            raw_a, shift = self._trunk(inp, cond, steps, caches, sampling.attention_temperature)
            a, shift = self._affine(raw_a[:, -1], shift[:, -1], None if scales is None else scales[i])
            u[:, i] = zu[:, i] * a + shift
        return self._permute(u)

    def _jacobi(self, zu: torch.Tensor, cond: torch.Tensor | None, scales: list[float] | None,
                sampling: FlowSampling, stats: dict[str, int] | None) -> torch.Tensor:
        """Jacobi iteration of x_i = a_i(x_<i) z_i + b_i(x_<i) over chunks of tokens in order: each pass recomputes every
        token of the chunk from the previous pass's tokens, in one forward over the chunk (the earlier chunks' keys
        and values come from the cache). The start is x = z, as ml-starflow's."""
        b, n, _ = zu.shape
        u = zu.clone()
        caches: Caches = [{} for _ in self.layers]
        start = self.start.expand(b, -1, -1).to(zu.dtype)
        scale_t = None if scales is None else torch.tensor(scales, device=zu.device)[:, None]
        size, passes = sampling.jacobi_block_size or n, 0
        for s in range(0, n, size):
            e = min(n, s + size)
            steps = torch.arange(s, e, device=zu.device)
            limit = sampling.jacobi_max_iter or e - s
            for it in range(limit):
                kept = [dict(c) for c in caches]   # the cache before this chunk (concatenation leaves it intact)
                inp = torch.cat([start if s == 0 else u[:, s - 1:s], u[:, s:e - 1]], dim=1)
                if scale_t is not None:
                    inp = torch.cat([inp, inp])
                raw_a, shift = self._trunk(inp, cond, steps, caches, sampling.attention_temperature)
                a, shift = self._affine(raw_a, shift, None if scale_t is None else scale_t[s:e])
                new = zu[:, s:e] * a + shift
                change = (new - u[:, s:e]).square().mean() / new.square().mean().clamp_min(1e-30)
                u[:, s:e] = new
                passes += 1
                if it == limit - 1 or change.item() < sampling.jacobi_tolerance:
                    break  # this pass's keys and values stay in the cache for the next chunk
                for cache, before in zip(caches, kept, strict=True):
                    cache.clear()
                    cache.update(before)
        if stats is not None:
            stats["jacobi_passes"] = stats.get("jacobi_passes", 0) + passes
        return u


class StarFlow(nn.Module, PretrainedMixin):
    """forward(x (B,C,h,w), y (B,) or None = unconditional) -> (z (B,C,h,w), log|det dz/dx| (B,));
    inverse(z, y, scale_at, sampling=FlowSampling(...)) -> x; log_prob, bits_per_dim, denoise."""

    config_class = StarFlowConfig

    def __init__(self, config: StarFlowConfig) -> None:
        super().__init__()
        config.validate()
        self.config = cfg = config
        last = len(cfg.layers_per_block) - 1
        self.blocks = nn.ModuleList(
            FlowBlock(cfg, layers, reverse=cfg.reversed_block(i),
                      conditioned=cfg.num_classes > 0 and (i == last or not cfg.cond_top_only),
                      width=cfg.top_width if i == last else cfg.hidden_size)
            for i, layers in enumerate(cfg.layers_per_block))
        table_width = cfg.top_width if cfg.cond_top_only else cfg.hidden_size
        self.y_embedder = LabelEmbedder(cfg.num_classes, table_width, cfg.class_dropout) \
            if cfg.num_classes > 0 and cfg.class_conditioning == "add" else None

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
        """What the conditioned blocks read: the class embedding (add) or the class ids (prefix), labels dropped to
        the null class in training mode, once per sample for all blocks."""
        cfg = self.config
        if cfg.num_classes == 0:
            return None
        if y is None:  # (labels are range-checked where they enter, fae.data.labels: no host sync here)
            y = torch.full((batch,), cfg.null_class, dtype=torch.long, device=device)
        if self.y_embedder is not None:
            return self.y_embedder(y, generator)
        if self.training and cfg.class_dropout > 0:
            drop = torch.rand(y.shape, generator=generator, device=y.device) < cfg.class_dropout
            y = torch.where(drop, torch.full_like(y, cfg.null_class), y)
        return y

    # ----------------------------------------------------------------------------------------------- the flow
    @overload
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None,
                with_inputs: Literal[False] = False) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def forward(self, x: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator | None,
                with_inputs: Literal[True]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]: ...

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None,
                with_inputs: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(z, log|det dz/dx|); `with_inputs` adds the token sequences (B, N, C) entering each block: the data, then
        every block's output but the last (ml-starflow's `outputs[:-1]`, what its latent-norm regulariser reads).
        A keyword of forward, not another method, so a DDP-wrapped model passes it through."""
        self._check(x)
        cond = self._condition(y, x.shape[0], x.device, generator)
        h, logdet = self.patchify(x), x.new_zeros(x.shape[0], dtype=torch.float32)
        inputs = []
        for block in self.blocks:
            inputs.append(h)
            h, ld = block(h, cond)
            logdet = logdet + ld
        z = self.unpatchify(h)
        return (z, logdet, inputs) if with_inputs else (z, logdet)

    def inverse(self, z: torch.Tensor, y: torch.Tensor | None = None, scale_at: ScaleAt | None = None,
                kv_cache: bool = True, sampling: FlowSampling | None = None,
                stats: dict[str, int] | None = None) -> torch.Tensor:
        """Noise (B,C,h,w) -> latents, deep block first. `scale_at(t)` is the guidance scale (None: unguided; with
        `sampling.guide_top` only the deep block is guided)."""
        self._check(z)
        sampling = sampling or FlowSampling()
        sampling.validate()
        cond = self._condition(y, z.shape[0], z.device)
        null = self._condition(None, z.shape[0], z.device) if y is not None and scale_at is not None else None
        h = self.patchify(z)
        for block in reversed(self.blocks):
            guide = scale_at if block is self.blocks[-1] or not sampling.guide_top else None
            h = block.inverse(h, cond, null, guide, kv_cache, sampling, stats)  # type: ignore[operator]  # FlowBlocks
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


def latent_norm(inputs: list[torch.Tensor]) -> torch.Tensor:
    """ml-starflow's latent-norm regulariser: the sum over the block inputs (StarFlow's `with_inputs` output) of their
    mean square (train.py: `sum(z.pow(2).mean() for z in outputs[:-1])`). The data term has no gradient; it is kept
    so the value equals ml-starflow's."""
    return torch.stack([h.float().pow(2).mean() for h in inputs]).sum()

"""Shared building blocks: norms, MLPs, 2-D RoPE, attention with a kernel switch, transformer blocks.

Every transformer in fae (feature decoder, pixel decoder, DiT, flows) is assembled from these pieces,
so a convention (RoPE layout, SwiGLU width, attention scaling) is written once.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fae.precision import bf16_native

AttentionBackend = Literal["auto", "sdpa", "math"]
_DEFAULT_BACKEND: AttentionBackend = "auto"


def set_attention_backend(backend: AttentionBackend) -> None:
    """Choose the attention kernel globally. 'auto' = SDPA, except matmul-softmax for bf16/fp16 on CPU: with torch
    2.13 the fused CPU kernel is as fast or faster in fp32 at every size measured, forward and backward, but 2-7x
    slower in bf16 (docs/benchmarks.md, issue 15). 'math' = always matmul-softmax (FLOP counting, debugging)."""
    global _DEFAULT_BACKEND
    if backend not in ("auto", "sdpa", "math"):
        raise ValueError(f"attention backend must be auto, sdpa or math, not {backend!r}")
    _DEFAULT_BACKEND = backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: AttentionBackend | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, N, Dh) tensors. `mask` is boolean (True = attend) or additive."""
    backend = backend or _DEFAULT_BACKEND
    if backend == "auto":
        backend = "math" if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) else "sdpa"
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1).to(v.dtype) @ v


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight.T (weight (N, K), may be a transposed view) + bias, by oneDNN; x must be contiguous."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """F.linear on 2-D fp32 CPU tensors with every product (forward, grad input, grad weight) done by oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t())  # grad @ W
        if ctx.needs_input_grad[1]:  # grad.T @ x; transpose whichever of grad and x is smaller
            if grad.shape[1] >= x.shape[1]:
                grad_w = _onednn_linear(x.t().contiguous(), grad.t()).t().contiguous()
            else:
                grad_w = _onednn_linear(grad.t().contiguous(), x.t())
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN for plain fp32 CPU linears. ATen's fp32 matmul on CPU is MKL's sgemm, which on AMD CPUs runs its AVX2
    kernels: oneDNN measured 2.2x faster per matmul on this AVX-512 CPU and 1.1x under AVX2 (docs/benchmarks.md,
    issue 15). bf16 (autocast) already goes to oneDNN; subclasses (DTensor, fake tensors) and torch.compile (which
    picks its own kernels) keep F.linear."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and type(x) is torch.Tensor
            and type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and _ONEDNN_AVAILABLE)


_ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _fused_gelu_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype in which oneDNN can run linear + tanh-GELU as one primitive for this call, or None. Inference only
    (the fused op has no backward); fp32, or bf16 under CPU autocast, where a separate bf16 GELU pass costs more
    than the matmul before it."""
    if torch.is_grad_enabled() or not _ONEDNN_AVAILABLE or torch.compiler.is_compiling():
        return None
    if x.device.type != "cpu" or type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, nn.Parameter):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        # oneDNN has no bf16 inner product without AVX-512 BF16 / AMX ("could not create a primitive descriptor")
        native = dtype == torch.bfloat16 and bf16_native("cpu")[0]
        return dtype if native and x.dtype in (torch.float32, torch.bfloat16) else None
    return torch.float32 if x.dtype == torch.float32 == weight.dtype else None


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose fp32 CPU products run on oneDNN; see `_use_onednn`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _use_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        out = _OneDnnLinear.apply(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 for bf16 stability, return in the input dtype
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        y = y.to(x.dtype)
        return y * self.weight.to(x.dtype) if self.weight is not None else y


def make_norm(kind: str, dim: int, affine: bool = True, eps: float = 1e-6) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, affine=affine)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r} (expected rmsnorm, layernorm or none)")


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """LightningDiT's convention: a SwiGLU with 2/3 of the GELU-MLP width has the same parameter count."""
    return int(2 / 3 * mlp_ratio * dim)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = Linear(dim, 2 * hidden, bias=bias)
        self.w3 = Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=bias)
        self.fc2 = Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _fused_gelu_dtype(x, self.fc1.weight)
        if dtype is None:
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        bias = None if self.fc1.bias is None else self.fc1.bias.to(dtype)
        hidden = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).to(dtype).contiguous(),
                                                    self.fc1.weight.to(dtype), bias, "gelu", [], "tanh")
        return self.fc2(hidden.view(*x.shape[:-1], self.fc1.out_features))


def make_mlp(kind: str, dim: int, mlp_ratio: float, bias: bool = True) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(dim, swiglu_hidden(dim, mlp_ratio), bias=bias)
    if kind == "gelu":
        return Mlp(dim, int(dim * mlp_ratio), bias=bias)
    raise ValueError(f"unknown mlp {kind!r} (expected swiglu or gelu)")


class RoPE2D(nn.Module):
    """2-D rotary embedding for a (h, w) token grid in row-major order.

    Half of each head's channels rotate with the row index, half with the column index
    (the axial layout used by LightningDiT/RAE). Tables are buffers, rebuilt for any grid.
    """

    cos: torch.Tensor  # buffers (register_buffer), declared for the type checker
    sin: torch.Tensor

    def __init__(self, head_dim: int, grid: tuple[int, int], theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        cos, sin = self._tables(grid)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = grid
        quarter = self.head_dim // 4
        freqs = 1.0 / (self.theta ** (torch.arange(quarter, dtype=torch.float32) / quarter))
        rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w)
        cols = torch.arange(w, dtype=torch.float32).repeat(h)
        angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)  # (N, head_dim/2)
        return angles.cos(), angles.sin()

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate (B, H, N, Dh); channel pairs are (i, i + Dh/2). `positions` (N,) are the grid indices (row-major)
        of the N tokens, for a permuted or partial sequence (flows, KV-cached decoding); default 0..N-1."""
        n = x.shape[-2]
        cos, sin = (self.cos, self.sin) if positions is None else (self.cos[positions], self.sin[positions])
        if cos.shape[0] != n:
            raise ValueError(f"RoPE built for {cos.shape[0]} tokens, got {n}")
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention: fused QKV (with bias), optional QK-norm and RoPE, output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 backend: AttentionBackend | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RoPE2D | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = attention(q, k, v, self.backend, mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (no conditioning): x + attn(norm(x)), x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm: str = "rmsnorm",
                 mlp: str = "swiglu", qk_norm: bool = False, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, backend=backend)
        self.norm2 = make_norm(norm, dim)
        self.mlp = make_mlp(mlp, dim, mlp_ratio)

    def forward(self, x: torch.Tensor, rope: RoPE2D | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the null class, used for dropped labels and the unconditional branch."""

    def __init__(self, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape, generator=generator, device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


def run_block(block: nn.Module, *args: object, checkpointed: bool = False) -> torch.Tensor:
    """`block(*args)`; with `checkpointed` (and gradients on), its activations are not kept for backward but
    recomputed there: memory for compute, the same gradients. Models read the switch from their
    `activation_checkpointing` attribute, a plain attribute (not a buffer): state_dict keys do not change."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def set_activation_checkpointing(module: nn.Module, enabled: bool) -> list[str]:
    """Switch activation checkpointing on every submodule that supports it (has an `activation_checkpointing`
    attribute); returns their names ("" = `module` itself), so a caller can tell when nothing supports it."""
    names = []
    for name, sub in module.named_modules():
        if hasattr(sub, "activation_checkpointing"):
            sub.activation_checkpointing = enabled
            names.append(name)
    return names


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift; shift/scale are (B, D) and broadcast over tokens. One fused pass
    over x (addcmul) instead of a multiply and an add."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero residual x + gate * update; gate is (B, D) and broadcasts over tokens. One fused pass (addcmul)."""
    return torch.addcmul(x, gate.unsqueeze(1), update)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine table (N, dim) as in MAE/DiT: half the channels for rows, half for columns."""
    if dim % 4:
        raise ValueError(f"sin-cos table needs a width divisible by 4, got {dim}")
    h, w = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)[:, None] * omega
    cols = torch.arange(w, dtype=torch.float64).repeat(h)[:, None] * omega
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1).float()


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C): p x p patches as tokens in row-major grid order, each a (p, p, C) block
    flattened row-major (the layout of DiT, STARFlow, the pixel decoder's head and SigLIP2's NaFlex input)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, gh*p, gw*p) for a token grid (gh, gw); the inverse of `patchify`."""
    gh, gw = grid
    x = x.reshape(x.shape[0], gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(x.shape[0], channels, gh * p, gw * p)


def grid_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a square grid")
    return side


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

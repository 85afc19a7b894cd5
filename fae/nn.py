"""Shared building blocks: norms, MLPs, 2-D RoPE, attention with a kernel switch, transformer blocks.

Every transformer in fae (feature decoder, pixel decoder, DiT, flows) is assembled from these pieces,
so a convention (RoPE layout, SwiGLU width, attention scaling) is written once.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fae import kernels
from fae.precision import bf16_native

AttentionBackend = Literal["auto", "sdpa", "math"]
_DEFAULT_BACKEND: AttentionBackend = "auto"


def set_attention_backend(backend: AttentionBackend) -> None:
    """Choose the attention kernel globally. 'auto' = on a CPU, whichever of SDPA's fused kernel and matmul-softmax
    this machine measured faster for the call's size, dtype and mode (inference, or forward + backward; fae.kernels),
    SDPA elsewhere. 'math' = always matmul-softmax (FLOP counting, debugging)."""
    global _DEFAULT_BACKEND
    if backend not in ("auto", "sdpa", "math"):
        raise ValueError(f"attention backend must be auto, sdpa or math, not {backend!r}")
    _DEFAULT_BACKEND = backend


def _plain(*tensors: torch.Tensor) -> bool:
    """Eager tensors on which a custom autograd Function is safe and worth it (no DTensor, no compiling)."""
    return all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors) and not torch.compiler.is_compiling()


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1).to(v.dtype) @ v


_ATTENTION = {"sdpa": lambda q, k, v, mask=None: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
              "math": _math_attention}
# attention products (batch*heads x queries x keys x head dim) below this are not timed; at most this is timed
SMALL_ATTENTION, PROBE_ATTENTION = 1 << 20, 1 << 29


def _attention_probe(dtype: torch.dtype, backward: bool, rows: int, n: int, nk: int,
                     dh: int) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    b = max(1, min(rows, PROBE_ATTENTION // (n * nk * dh)))
    # 4-D (1, heads, tokens, head dim), as models call it: SDPA's fused CPU kernel takes only 4-D inputs
    q, k, v = (torch.randn(1, b, n if i == 0 else nk, dh, generator=g).to(dtype).requires_grad_(backward)
               for i in range(3))

    def call(kernel: Callable[..., torch.Tensor]) -> None:
        with torch.autocast("cpu", enabled=False), torch.set_grad_enabled(backward):
            out = kernel(q, k, v)
            if backward:
                torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return {name: functools.partial(call, kernel) for name, kernel in _ATTENTION.items()}


def attention_backend(q: torch.Tensor, k: torch.Tensor) -> str:
    """sdpa or math for this CPU call (fae.kernels). Too small to time: matmul-softmax in bf16/fp16 (the fused CPU
    kernel measured 2-7x slower there, issue 15), SDPA in fp32."""
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    dtype = q.dtype
    if torch.is_autocast_enabled("cpu") and dtype == torch.float32:
        dtype = torch.get_autocast_dtype("cpu")  # the matmuls run in it (SDPA is not autocast: fp32 stays fp32)
    n, dh, nk = q.shape[-2], q.shape[-1], k.shape[-2]
    rows = kernels.size_bucket(q.numel() // (n * dh))
    key = f"{str(dtype).removeprefix('torch.')} {'train' if backward else 'infer'} {rows}x{n}x{nk}x{dh}"
    small = "math" if dtype in (torch.bfloat16, torch.float16) else "sdpa"
    return kernels.choose("attention", key, lambda: _attention_probe(dtype, backward, rows, n, nk, dh),
                          untimed=small if rows * n * nk * dh < SMALL_ATTENTION else None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: AttentionBackend | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, N, Dh) tensors. `mask` is boolean (True = attend) or additive."""
    kernel: str = backend or _DEFAULT_BACKEND
    if kernel == "auto":
        kernel = attention_backend(q, k) if q.device.type == "cpu" and type(q) is torch.Tensor else "sdpa"
    return _ATTENTION[kernel](q, k, v, mask)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight.T (weight (N, K), may be a transposed view) + bias, by oneDNN; x must be contiguous."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_grad_weight(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad.T @ x (N, K) by oneDNN, transposing whichever of grad (M, N) and x (M, K) is smaller."""
    if grad.shape[1] >= x.shape[1]:
        return _onednn_linear(x.t().contiguous(), grad.t()).t().contiguous()
    return _onednn_linear(grad.t().contiguous(), x.t())


# the three products of a linear, each done by the backend its size class measured faster (fae.kernels)
_PRODUCTS: dict[str, dict[str, Callable[..., torch.Tensor]]] = {
    "forward": {"onednn": _onednn_linear,
                "aten": lambda x, w, b: torch.addmm(b, x, w.t()) if b is not None else x @ w.t()},
    "grad_input": {"onednn": lambda g, w: _onednn_linear(g, w.t()), "aten": lambda g, w: g @ w},
    "grad_weight": {"onednn": _onednn_grad_weight, "aten": lambda g, x: g.t() @ x},
}


class _ChosenLinear(torch.autograd.Function):
    """F.linear on 2-D fp32 CPU tensors, each product (forward, grad input, grad weight) by its chosen backend."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                plan: tuple[str, str, str]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.plan = plan
        return _PRODUCTS["forward"][plan[0]](x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        _, input_backend, weight_backend = ctx.plan
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _PRODUCTS["grad_input"][input_backend](grad, weight)
        if ctx.needs_input_grad[1]:
            grad_w = _PRODUCTS["grad_weight"][weight_backend](grad, x)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b, None


# products below this many multiply-adds are not timed (a few microseconds: dispatch, not the kernel, decides)
SMALL_PRODUCT = 1 << 22
# the size a product is timed at, at most (about 5 ms of one thread): rows are cut to fit
PROBE_PRODUCT = 1 << 28


def _linear_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A plain fp32 CPU linear, where the backend is ours to choose. bf16 (autocast) already goes to oneDNN;
    subclasses (DTensor, fake tensors) and torch.compile (which picks its own kernels) keep F.linear."""
    return (x.dtype == torch.float32 == weight.dtype and x.device.type == "cpu" and _plain(x, weight)
            and not torch.is_autocast_enabled("cpu") and _ONEDNN_AVAILABLE)


def _probe_rows(rows: int, k: int, n: int) -> int:
    """The rows a (rows x k) @ (k x n) product is timed at: its own, cut to PROBE_PRODUCT multiply-adds."""
    return max(16, min(rows, PROBE_PRODUCT // (k * n)))


def _probe_calls(product: str, rows: int, k: int, n: int, bias: bool) -> dict[str, Callable[[], object]]:
    """Both backends' calls of one product on random operands of the size class (rows cut to PROBE_PRODUCT)."""
    g = torch.Generator().manual_seed(0)
    m = _probe_rows(rows, k, n)
    x, w, grad = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(m, n, generator=g)
    args = {"forward": (x, w, torch.randn(n, generator=g) if bias else None), "grad_input": (grad, w),
            "grad_weight": (grad, x)}[product]
    return {name: functools.partial(fn, *args) for name, fn in _PRODUCTS[product].items()}


def linear_backend(product: str, rows: int, k: int, n: int, bias: bool = True) -> str:
    """onednn or aten for one product of an (rows x k) @ (k x n) linear on this machine (fae.kernels)."""
    bucket = kernels.size_bucket(rows)
    key = f"{product} {bucket}x{k}x{n}"
    return kernels.choose("linear", key, lambda: _probe_calls(product, bucket, k, n, bias),
                          untimed="aten" if bucket * k * n < SMALL_PRODUCT else None)


def _linear_plan(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[str, str, str] | None:
    """The backends of (forward, grad input, grad weight) for this call, or None where stock F.linear does it all
    (not an fp32 CPU linear, or ATen measured faster for every product the call needs)."""
    if not _linear_eligible(x, weight):
        return None
    n, k = weight.shape
    rows = x.numel() // k
    backward = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    forward = linear_backend("forward", rows, k, n, bias is not None)
    plan = (forward, linear_backend("grad_input", rows, k, n), linear_backend("grad_weight", rows, k, n)) \
        if backward else (forward, "aten", "aten")
    return None if plan == ("aten", "aten", "aten") else plan


_ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _forward_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    """x (M, K) @ weight.T + bias without autograd, by the backend measured faster for `rows` (an fp32 CPU call)."""
    n, k = weight.shape
    return _PRODUCTS["forward"][linear_backend("forward", rows, k, n, bias is not None)](x, weight, bias)


def _fused_gelu_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype in which oneDNN can run linear + tanh-GELU as one primitive for this call, or None. Inference only
    (the fused op has no backward); fp32, or bf16 under CPU autocast where bf16 is native."""
    if torch.is_grad_enabled() or not _ONEDNN_AVAILABLE or x.device.type != "cpu" or not _plain(x, weight):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        # oneDNN has no bf16 inner product without AVX-512 BF16 / AMX ("could not create a primitive descriptor")
        native = dtype == torch.bfloat16 and bf16_native("cpu")[0]
        return dtype if native and x.dtype in (torch.float32, torch.bfloat16) else None
    return torch.float32 if x.dtype == torch.float32 == weight.dtype else None


def _gelu_probe(dtype: torch.dtype, rows: int, k: int, n: int) -> dict[str, Callable[[], object]]:
    """The fused primitive against what fae runs without it: the linear by its own verdict, then the GELU in place
    by its own (the alternative timed is the one that would run, not stock PyTorch's)."""
    g = torch.Generator().manual_seed(0)
    m = _probe_rows(rows, k, n)
    x, w, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((m, k), (n, k), (n,)))

    def separate() -> None:
        with torch.no_grad():
            gelu_tanh_(_forward_product(x, w, b, rows) if dtype == torch.float32 else F.linear(x, w, b))
    return {"onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh"), "separate": separate}


def fused_gelu_wins(dtype: torch.dtype, rows: int, k: int, n: int) -> bool:
    """Whether oneDNN's one-primitive linear + GELU beats fae's linear then its GELU here (fae.kernels)."""
    bucket = kernels.size_bucket(rows)
    key = f"{str(dtype).removeprefix('torch.')} {bucket}x{k}x{n}"
    return kernels.choose("linear_gelu", key, lambda: _gelu_probe(dtype, bucket, k, n),
                          untimed="separate" if bucket * k * n < SMALL_PRODUCT else None) == "onednn"


# tanh-GELU as h * sigmoid(2u), u = sqrt(2/pi) (h + 0.044715 h^3): the same function (0.5 (1 + tanh u) = sigmoid 2u)
_GELU_C1 = 2 * math.sqrt(2 / math.pi)
_GELU_C3 = _GELU_C1 * 0.044715


def _gelu_gate(h: torch.Tensor) -> torch.Tensor:
    """sigmoid(2u), a new tensor, in three passes: tanh-GELU(h) = h * _gelu_gate(h)."""
    return torch.addcmul(h.new_tensor(_GELU_C1), h, h, value=_GELU_C3).mul_(h).sigmoid_()


class _ComposedTanhGelu(torch.autograd.Function):
    """fp32 tanh-GELU in four elementwise passes (addcmul, mul, sigmoid, mul) where ATen's kernel evaluates tanh
    with a slow vectorised tanh (AVX2: 11.9 ms against 8.6 for the four passes on 6.3M values, issue 26). Saves the
    input as ATen's does; the backward is ATen's."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return _gelu_gate(h).mul_(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad, h, approximate="tanh")


# elementwise passes below this many values are not timed
SMALL_ELEMENTWISE = 1 << 18


def _gelu_calls(numel: int, backward: bool) -> dict[str, Callable[[], object]]:
    h = torch.randn(min(numel, 1 << 22), generator=torch.Generator().manual_seed(0)).requires_grad_(backward)

    def call(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        with torch.set_grad_enabled(backward):
            out = fn(h)
            if backward:
                torch.autograd.grad(out, h, torch.ones_like(out))
    return {"aten": functools.partial(call, lambda t: F.gelu(t, approximate="tanh")),
            "composed": functools.partial(call, _ComposedTanhGelu.apply)}


def _gelu_kernel(h: torch.Tensor, backward: bool) -> str:
    """aten or composed for this fp32 CPU tensor (fae.kernels kind `gelu`)."""
    bucket = kernels.size_bucket(h.numel())
    key = f"float32 {'train' if backward else 'infer'} {bucket}"
    return kernels.choose("gelu", key, lambda: _gelu_calls(bucket, backward),
                          untimed="aten" if bucket < SMALL_ELEMENTWISE else None)


def _composable(h: torch.Tensor) -> bool:
    return h.dtype == torch.float32 and h.device.type == "cpu" and _plain(h) and not torch.is_autocast_enabled("cpu")


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    """tanh-approximated GELU; on fp32 CPU tensors ATen's kernel or the four-pass composition, whichever this
    machine measured faster (fae.kernels kind `gelu`; bf16 keeps ATen's: four bf16 roundings would cost accuracy)."""
    if not _composable(h) or _gelu_kernel(h, torch.is_grad_enabled() and h.requires_grad) != "composed":
        return F.gelu(h, approximate="tanh")
    return _ComposedTanhGelu.apply(h)


# values of the in-place GELU's temporary at a time: one hidden-sized temporary (25-50 MB at DiT-S) is a fresh block
# on every call, page-faulted and cache-cold; a 4 MB one stays in the heap and the cache (AVX2 on an AMD EPYC: nfe
# 1444 -> 1264 ms, page faults per call 153k -> 6k; docs/benchmarks.md)
GELU_CHUNK = 1 << 20


def gelu_tanh_(h: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh` in place, for inference (no autograd): no output buffer, and the composed form's temporary is
    one chunk of about `GELU_CHUNK` values at a time."""
    if not _composable(h) or _gelu_kernel(h, False) != "composed":
        return torch.ops.aten.gelu_(h, approximate="tanh")
    if not h.is_contiguous():
        return h.mul_(_gelu_gate(h))
    for chunk in h.view(-1).split(GELU_CHUNK):
        chunk.mul_(_gelu_gate(chunk))
    return h


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose fp32 CPU products each run on the backend this
    machine measured faster for their size (oneDNN or ATen/MKL; `linear_backend`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = _linear_plan(x, self.weight, self.bias)
        if plan is None:
            return F.linear(x, self.weight, self.bias)
        out = _ChosenLinear.apply(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.bias, plan)
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
        if torch.is_grad_enabled() or x.device.type != "cpu" or not _plain(x, self.fc1.weight):
            return self.fc2(gelu_tanh(self.fc1(x)))
        return self._inference(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.fc2.out_features)

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        """fc2(GELU(fc1(x))) over 2-D CPU rows without autograd: oneDNN's fused linear + GELU where it measured
        faster, else fc1 then the GELU in place (no second hidden-sized buffer)."""
        dtype = _fused_gelu_dtype(x, self.fc1.weight)
        if dtype is None or not fused_gelu_wins(dtype, x.shape[0], *self.fc1.weight.shape[::-1]):
            return self.fc2(gelu_tanh_(self.fc1(x)))
        bias = None if self.fc1.bias is None else self.fc1.bias.to(dtype)
        hidden = torch.ops.mkldnn._linear_pointwise(x.to(dtype).contiguous(), self.fc1.weight.to(dtype), bias,
                                                    "gelu", [], "tanh")
        return self.fc2(hidden)


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


class _Modulate(torch.autograd.Function):
    """x * (1 + scale) + shift over (B, N, D) with (B, D) shift and scale. One pass forward (addcmul); backward
    computes what it needs and no more: autograd's addcmul backward also multiplies x by the scalar `value` (1), a
    full extra pass over x per call (issue 26)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        factor = 1 + scale.unsqueeze(1)
        ctx.save_for_backward(x, factor)
        ctx.dtypes = x.dtype, shift.dtype, scale.dtype  # mixed under autocast: each gradient in its input's dtype
        return torch.addcmul(shift.unsqueeze(1), x, factor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, factor = ctx.saved_tensors
        x_dtype, shift_dtype, scale_dtype = ctx.dtypes
        grad_x = (grad * factor).to(x_dtype) if ctx.needs_input_grad[0] else None
        grad_shift = grad.sum(1).to(shift_dtype) if ctx.needs_input_grad[1] else None
        grad_scale = (grad * x).sum(1).to(scale_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_shift, grad_scale


class _GatedResidual(torch.autograd.Function):
    """x + gate * update, gate (B, D) broadcast over tokens; backward without addcmul's extra pass (see _Modulate)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, update)
        ctx.dtypes = x.dtype, gate.dtype, update.dtype
        return torch.addcmul(x, gate.unsqueeze(1), update)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, update = ctx.saved_tensors
        x_dtype, gate_dtype, update_dtype = ctx.dtypes
        grad_x = grad.to(x_dtype) if ctx.needs_input_grad[0] else None
        grad_gate = (grad * update).sum(1).to(gate_dtype) if ctx.needs_input_grad[1] else None
        grad_update = (grad * gate.unsqueeze(1)).to(update_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_gate, grad_update


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift; shift/scale are (B, D) and broadcast over tokens. One fused pass
    over x (addcmul) instead of a multiply and an add."""
    if torch.is_grad_enabled() and _plain(x, shift, scale):
        return _Modulate.apply(x, shift, scale)
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero residual x + gate * update; gate is (B, D) and broadcasts over tokens. One fused pass (addcmul)."""
    if torch.is_grad_enabled() and _plain(x, gate, update):
        return _GatedResidual.apply(x, gate, update)
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

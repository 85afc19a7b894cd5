"""Adaptive ODE integration for flow-matching sampling: Dormand-Prince 5(4) ("dopri5") with per-sample step control.

Written here rather than taken from torchdiffeq, for two reasons: no extra dependency for one solver, and torchdiffeq
controls ONE step size for the whole batch from a norm over the whole batch, so a sample's path (its steps, its
rejections, hence its result) would depend on which other samples share its batch. fae's rule is that sample i
depends only on (seed, i) (fae.transport, fae.sampling), so here every sample has its own time, step size and error
norm; a batch only shares the network calls: each iteration evaluates the stages of all unfinished samples at their
own times (the velocity function takes a (B,) tensor of times), and a sample that reaches t = 0 drops out.

The step rule is the standard one (Hairer, Norsett & Wanner, Solving ODEs I, II.4): error e = x5 - x4 from the
embedded 4th-order solution, norm = RMS over the sample's elements of e / (atol + rtol * max(|x|, |x_new|)), a step
is accepted when norm <= 1, and the next step is h * clamp(0.9 * norm^(-1/5), 0.2, 10) (at most h after a
rejection), rounded down to a power of 2^(1/4) (`_quantized`: a sample then takes the same steps in any batch). The
first step size is Hairer's starting-step estimate (two evaluations, the first reused as stage 1).
Steps never cross a `breaks` time (e.g. where a guidance schedule changes its scale): the velocity jumps there, and
an error estimate across the jump would only shrink the step.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# (x (B,...), t (B,), condition rows) -> v; integration runs from t = 1 down to t = 0 (dx/dt = v)
BatchVelocity = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]

_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = ((),
      (1 / 5,),
      (3 / 40, 9 / 40),
      (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
      (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_B5 = (*_A[6], 0.0)   # the 5th-order weights are the last stage's row (first same as last: k7 is the next k1)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4, strict=True))

MAX_ITERATIONS = 10_000   # per sample; a tolerance that needs more is a mistake, not a slow success


def rows(condition: Any, index: torch.Tensor) -> Any:
    """The conditions of the samples `index`: class ids, a structured condition with `select`, a list, or None."""
    if condition is None:
        return None
    if isinstance(condition, torch.Tensor):
        return condition[index.to(condition.device)]
    if hasattr(condition, "select"):
        return condition.select(index)
    return [condition[i] for i in index.tolist()]


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).flatten(1).mean(1).sqrt().double()


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _quantized(h: torch.Tensor) -> torch.Tensor:
    """h rounded down to a power of 2^(1/4). A network's output differs in its last bits with the batch it runs in
    (other kernel blocking); a step size computed from an error norm inherits that noise, and the paths of one
    sample in two batches would drift apart by a tolerance. On the coarse ladder both take the same steps, unless
    the norm lies within that noise of a rung or of 1 (rare)."""
    return torch.exp2(torch.floor(4 * torch.log2(h)) / 4)


def _initial_step(f: BatchVelocity, x: torch.Tensor, t: torch.Tensor, f0: torch.Tensor, y: Any, rtol: float,
                  atol: float) -> torch.Tensor:
    """Hairer's starting step, per sample: 1% of |x| / |v|, then limited by the change of v over that step."""
    scale = atol + rtol * x.abs()
    d0, d1 = _rms(x / scale), _rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-30))
    h0 = torch.minimum(h0, t)
    f1 = f(x - _view(h0, x) * f0, t - h0, y)
    d2 = _rms((f1 - f0) / scale) / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, (h0 * 1e-3).clamp_min(1e-6), (0.01 / big.clamp_min(1e-30)) ** (1 / 5))
    return _quantized(torch.minimum(torch.minimum(100 * h0, h1), t))


def dopri5(f: BatchVelocity, x: torch.Tensor, y: Any, rtol: float = 1e-3, atol: float = 1e-6,
           breaks: Sequence[float] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate dx/dt = f(x, t, y) from t = 1 to t = 0 for each sample on its own; returns (x_0, NFE per sample).

    `f` gets the rows of the unfinished samples, their times (B',) and their conditions (`rows`)."""
    batch = x.shape[0]
    x = x.clone()
    t = torch.ones(batch, dtype=torch.float64)
    nfe = torch.zeros(batch, dtype=torch.long)
    cuts = sorted({float(b) for b in breaks if 0.0 < float(b) < 1.0}, reverse=True)

    def next_stop(tt: torch.Tensor) -> torch.Tensor:
        """The largest break below each time (0 if none): a step ends there at the latest."""
        stop = torch.zeros_like(tt)
        for c in reversed(cuts):   # ascending, so the largest c < t wins
            stop = torch.where(tt > c + 1e-12, torch.full_like(tt, c), stop)
        return stop

    def call(xs: torch.Tensor, ts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        cond = y if len(idx) == batch else rows(y, idx)
        return f(xs, ts.to(xs.device), cond).to(xs.dtype)

    everyone = torch.arange(batch)
    k1 = call(x, t, everyone)
    h = _initial_step(lambda xs, ts, _: call(xs, ts, everyone), x, t, k1, y, rtol, atol)
    nfe += 2
    for _ in range(MAX_ITERATIONS):
        active = torch.nonzero(t > 0).flatten()
        if len(active) == 0:
            return x, nfe
        idx_dev = active.to(x.device)
        xa, ta, ka = x[idx_dev], t[active], k1[idx_dev]
        stop = next_stop(ta)
        lands = h[active] >= ta - stop - 1e-9           # this step ends at the stop (no sliver of a step left)
        ha = torch.where(lands, ta - stop, h[active])
        hv = _view(ha, xa)
        ks = [ka]
        for stage in range(1, 7):
            xi = xa - hv * sum(a * k for a, k in zip(_A[stage], ks, strict=False) if a != 0.0)
            ks.append(call(xi, ta - _C[stage] * ha, active))
        x5 = xi   # stage 7 is evaluated at the 5th-order solution
        err = hv * sum(e * k for e, k in zip(_E, ks, strict=True) if e != 0.0)
        norm = _rms(err / (atol + rtol * torch.maximum(xa.abs(), x5.abs())))
        nfe[active] += 6
        ok = norm <= 1.0
        factor = (0.9 * norm.clamp_min(1e-10) ** -0.2).clamp(0.2, 10.0)
        h[active] = _quantized(ha * torch.where(ok, factor, factor.clamp_max(1.0)))
        if bool(ok.any()):
            acc, acc_dev = active[ok], idx_dev[ok.to(x.device)]
            x[acc_dev], k1[acc_dev] = x5[ok.to(x.device)], ks[6][ok.to(x.device)]
            t[acc] = torch.where(lands[ok], stop[ok], ta[ok] - ha[ok])
        if bool((h[active] < 1e-10).any()):
            raise RuntimeError(f"dopri5: step size underflow at t = {t[active].min():.4g} (rtol {rtol}, atol {atol}); "
                               "the velocity is not smooth enough for these tolerances")
    raise RuntimeError(f"dopri5: more than {MAX_ITERATIONS} steps for one sample (rtol {rtol}, atol {atol})")

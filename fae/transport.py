"""Flow matching on latents: the path, training times and time shift, the loss, ODE/SDE samplers, guidance.

Convention (design.md, paper App. D): t in [0, 1], t = 0 data, t = 1 noise,

    x_t = (1 - t) x0 + t eps,      the model predicts v = eps - x0  (so dx_t/dt = v).

Sampling integrates from t = 1 (pure noise) down to t = 0.

Time shift. ONE parameter, `time_shift` = s, with the paper's meaning ("timesteps shift = 0.4"): the paper follows
LightningDiT, whose formula tau' = s tau / (1 + (s - 1) tau) is written on a grid where tau = 0 is noise. With
t = 1 - tau that is, in our convention,

    t' = t / (s + (1 - s) t)          (= alpha t / (1 + (alpha - 1) t) with alpha = 1/s, RAE's / SD3's form)

s = 1 is the identity; s < 1 moves times toward the noise end (s = 0.4 maps t = 0.5 to 0.714). The same map is
applied to the training times (unless `shift_in_training` is off) and to the sampling grid.

Reverse SDE (SiT's Euler-Maruyama with diffusion coefficient w_t = sigma_t = t). From v and the path,
E[eps | x_t] = x_t + (1 - t) v, so the score is s(x, t) = -(x + (1 - t) v) / t. Stepping from t to t - h:

    x <- x - h (v - w_t s) + sqrt(2 w_t h) z = x - h (v + x + (1 - t) v) + sqrt(2 t h) z       (w_t = t)

w_t s has no 1/t, so the step is finite down to t = 0. The last step goes to the mean (no noise) and, by default,
has SiT's fixed size 0.04: Euler-Maruyama covers [0.04, 1] in steps - 1 steps, then one mean step 0.04 -> 0
(`SamplerConfig.sde_last_step`; 0 gives a plain grid whose last 1/steps step goes to the mean).

DPM-Solver++(2M) ("dpmpp_2m") works on the data prediction x0 = x - t v with lambda = log((1 - t) / t); its
endpoints are first order (`_dpmpp_2m_step`). "dopri5" is adaptive, with per-sample step control (fae.solvers).

Classifier-free guidance acts on ALL channels (not the 3 of the DiT/SiT/LightningDiT code, a known leftover), with a
piecewise-constant scale over t; `GuidanceSchedule.paper()` is the main-results schedule. Autoguidance (a second,
weaker model in place of the unconditional branch) uses the same schedule (`GuidedVelocity(guide=...)`).
"""
from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F

from fae import kernels
from fae.solvers import dopri5

VelocityFn = Callable[[torch.Tensor, float, "torch.Tensor | None"], torch.Tensor]  # (x_t, t, condition) -> v


# ---------------------------------------------------------------------------------------------------------- path
def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, with t of shape (B,)."""
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


@overload
def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor: ...
@overload
def shift_time(t: float, shift: float) -> float: ...
def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The paper's time shift s (module docstring): t' = t / (s + (1 - s) t). s = 1 is the identity."""
    if shift <= 0:
        raise ValueError(f"time_shift must be > 0, got {shift}")
    if shift == 1.0:
        return t
    return t / (shift + (1.0 - shift) * t)


def dimension_shift(num_tokens: int, channels: int, base: int = 4096) -> float:
    """RAE's dimension rule alpha = sqrt(N * C / base), returned as the paper-convention s = 1 / alpha
    (16x16x32 latents: s = 0.71, near the paper's best 32-d value 0.7 in Table 8)."""
    return 1.0 / math.sqrt(num_tokens * channels / base)


# ------------------------------------------------------------------------------------------------------ training
@dataclass
class TransportConfig:
    time_dist: Literal["uniform", "logit_normal"] = "uniform"
    logit_normal_mean: float = 0.0     # t = sigmoid(mean + std * n); symmetric around 0.5 when mean = 0
    logit_normal_std: float = 1.0
    time_shift: float = 1.0            # the paper's s: 0.4 for the main results, 1.0 = no shift
    shift_in_training: bool = True     # apply the shift to training times too (RAE; see docs/diffusion.md)
    cosine_loss_weight: float = 0.0    # LightningDiT adds 1 - cos(v_pred, v) over channels with weight 1

    def validate(self) -> None:
        if self.time_shift <= 0:
            raise ValueError(f"time_shift must be > 0 (1.0 = no shift), got {self.time_shift}")
        if self.logit_normal_std <= 0:
            raise ValueError("logit_normal_std must be > 0")
        if self.cosine_loss_weight < 0:
            raise ValueError("cosine_loss_weight must be >= 0")


def sample_time(batch: int, cfg: TransportConfig, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Training times (B,) in [0, 1], shifted when `cfg.shift_in_training`."""
    if cfg.time_dist == "uniform":
        t = torch.rand(batch, generator=generator, device=device)
    else:
        n = torch.randn(batch, generator=generator, device=device)
        t = torch.sigmoid(cfg.logit_normal_mean + cfg.logit_normal_std * n)
    return shift_time(t, cfg.time_shift) if cfg.shift_in_training else t


def flow_matching_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, y: torch.Tensor | None,
                       cfg: TransportConfig, generator: torch.Generator | None = None,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE between the predicted and true velocity (mean over elements), plus the optional cosine term. The logs
    are detached 0-d tensors, not floats: the caller reads them when it logs, so the step itself never waits for
    the device and traces into one graph under torch.compile."""
    t = sample_time(x0.shape[0], cfg, generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    target = velocity_target(x0, eps)
    pred = model(interpolate(x0, eps, t), t, y)
    mse = (pred.float() - target.float()).pow(2).mean()
    loss = mse
    logs = {"mse": mse.detach()}
    if cfg.cosine_loss_weight > 0:
        cos = 1 - F.cosine_similarity(pred.float(), target.float(), dim=1).mean()
        loss = loss + cfg.cosine_loss_weight * cos
        logs["cos_loss"] = cos.detach()
    return loss, logs


# ------------------------------------------------------------------------------------------------------ guidance
@dataclass
class GuidanceInterval:
    t_min: float
    t_max: float
    scale: float


@dataclass
class GuidanceSchedule:
    """Piecewise-constant CFG scale over t. The first interval with t_min <= t <= t_max gives the scale; times in no
    interval get 1.0 (no guidance, and no unconditional pass). `channels=None` guides every channel; 3 reproduces
    the DiT/SiT/LightningDiT code, which guides only the first three."""

    intervals: list[GuidanceInterval] = field(default_factory=list)
    channels: int | None = None

    def validate(self) -> None:
        for iv in self.intervals:
            if not 0.0 <= iv.t_min <= iv.t_max <= 1.0:
                raise ValueError(f"guidance interval needs 0 <= t_min <= t_max <= 1, got [{iv.t_min}, {iv.t_max}]")
        if self.channels is not None and self.channels <= 0:
            raise ValueError("guidance channels must be positive or null (= all)")

    @classmethod
    def constant(cls, scale: float, t_min: float = 0.0, t_max: float = 1.0) -> GuidanceSchedule:
        return cls([GuidanceInterval(t_min, t_max, scale)])

    @classmethod
    def paper(cls) -> GuidanceSchedule:
        """Main results (App. D): 0.9 on t in [1, 0.9], 2.5 on [0.7, 0]; the middle value is missing from the
        paper's text and taken as 1.0, i.e. no interval (fae-paper.md open question 8)."""
        return cls([GuidanceInterval(0.9, 1.0, 0.9), GuidanceInterval(0.0, 0.7, 2.5)])

    @classmethod
    def paper_text(cls) -> GuidanceSchedule:
        """Text-to-image (App. D, MMDiT columns): 1.5 on t in [0, 0.9], none above."""
        return cls([GuidanceInterval(0.0, 0.9, 1.5)])

    @classmethod
    def parse(cls, text: str) -> GuidanceSchedule:
        """'none' | 'paper' | 'paper-text' | '2.5' (all t) | 't_min-t_max:scale,...' e.g. '0.9-1:0.9,0-0.7:2.5' |
        'starflow:2.5': ml-starflow's `cfg` w, which is fae's scale s = 1 + w (docs/flow.md), at all t."""
        text = text.strip().lower()
        if text.startswith("starflow:"):
            try:
                w = float(text.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"cannot read guidance {text!r}: starflow: takes ml-starflow's cfg, a number "
                                 "such as starflow:2.5 (= fae's 3.5)") from None
            return cls() if w == 0 else cls.constant(1.0 + w)  # ml-starflow's cfg 0 is no guidance
        if text in ("none", "", "1", "1.0"):
            return cls()
        if text == "paper":
            return cls.paper()
        if text == "paper-text":
            return cls.paper_text()
        try:
            return cls.constant(float(text))
        except ValueError:
            pass
        intervals = []
        try:
            for part in text.split(","):
                span, scale = part.split(":")
                lo, hi = span.split("-")
                intervals.append(GuidanceInterval(float(lo), float(hi), float(scale)))
        except ValueError:
            raise ValueError(f"cannot read guidance {text!r}; use none, paper, a number, or "
                             f"'t_min-t_max:scale,...' such as '0.9-1:0.9,0-0.7:2.5'") from None
        sched = cls(intervals)
        sched.validate()
        return sched

    def scale_at(self, t: float) -> float:
        for iv in self.intervals:
            if iv.t_min <= t <= iv.t_max:
                return iv.scale
        return 1.0

    @property
    def active(self) -> bool:
        return any(iv.scale != 1.0 for iv in self.intervals)


# guided calls of fewer parameters x samples than this are not timed (concat, the batch GPUs prefer)
SMALL_CFG_BATCH = 1 << 26


class GuidedVelocity:
    """Wraps a conditional velocity model `model(x, t, y)` (y=None: unconditional) with CFG. `y` is class ids, or a
    structured condition (MMDiT's text) that concatenates itself (`y.cat(other)`) with the model's
    `null_condition(batch)` in concat mode.

    `batch="concat"` runs the conditional and unconditional halves as one batch (best on GPU); "separate" runs two
    calls; "auto" (the default) = concat on a GPU, and on a CPU whichever of the two this machine measured faster
    for the model, dtype and batch (fae.kernels kind `cfg_batch`; two calls won at every batch on the Intel Xeon of
    issue 26, docs/diffusion.md). The choice is made before the first guided call, on inputs of its shape, so a
    sample never depends on which one the timing ran first.

    `guide` (autoguidance, Karras et al. 2024): a second velocity model of the same latent space takes the place of
    the unconditional branch, v = v_guide + s (v_model - v_guide), with the guide given the same condition as the
    model (conditional against conditional; an unconditional model is guided too). The schedule's scales and
    interval apply as to CFG.
    """

    def __init__(self, model: Callable[..., torch.Tensor], guidance: GuidanceSchedule | None = None,
                 batch: Literal["auto", "concat", "separate"] = "auto", null_class: int | None = None,
                 guide: Callable[..., torch.Tensor] | None = None) -> None:
        self.model, self.guidance, self.batch, self.guide = model, guidance or GuidanceSchedule(), batch, guide
        if null_class is None:
            null_class = getattr(getattr(model, "config", None), "null_class", None)
        self.null_class = null_class
        self._concat_possible = null_class is not None or hasattr(model, "null_condition")
        self._modes: dict[tuple, str] = {}  # input shape, dtype, autocast -> concat | separate
        if self.guidance.active and self.batch == "concat" and not self._concat_possible and guide is None:
            raise ValueError("concat guidance needs the model's null class id; pass null_class=")

    def _guided(self, mode: str, x: torch.Tensor, tt: torch.Tensor, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditional and unconditional velocities, as one batch (concat) or two calls (separate); with a
        `guide` (autoguidance), the model's and the guide's velocities, both on the same condition."""
        if self.guide is not None:
            return self.model(x, tt, y), self.guide(x, tt, y)
        if mode == "concat":
            if isinstance(y, torch.Tensor):
                both = torch.cat([y, torch.full_like(y, self.null_class)])  # type: ignore[arg-type]  # set in __init__
            else:
                both = y.cat(self.model.null_condition(len(y)))  # type: ignore[attr-defined]  # structured condition
            v_cond, v_uncond = self.model(torch.cat([x, x]), torch.cat([tt, tt]), both).chunk(2)
            return v_cond, v_uncond
        return self.model(x, tt, y), self.model(x, tt, None)

    def _mode(self, x: torch.Tensor, tt: torch.Tensor, y: Any) -> str:
        if self.batch != "auto" or self.guide is not None:
            return self.batch
        shape = (tuple(x.shape), x.dtype, torch.is_autocast_enabled("cpu"))
        if shape not in self._modes:
            self._modes[shape] = self._measured_mode(x, tt, y)
        return self._modes[shape]

    def _measured_mode(self, x: torch.Tensor, tt: torch.Tensor, y: Any) -> str:
        if not self._concat_possible:
            return "separate"
        if x.device.type != "cpu" or not isinstance(self.model, torch.nn.Module):
            return "concat"
        key, params = kernels.model_call(self.model, x)

        def candidates() -> dict[str, Callable[[], object]]:
            probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x)  # the model is deterministic
            return {mode: functools.partial(self._guided, mode, probe, tt, y) for mode in ("concat", "separate")}
        return kernels.choose("cfg_batch", key, candidates,
                              untimed="concat" if params * x.shape[0] < SMALL_CFG_BATCH else None)

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor, y: Any) -> torch.Tensor:
        """The guided velocity at time `t`: one float for the batch, or a (B,) tensor, one time per sample (the
        adaptive solver's), each sample then taking the guidance scale of its own time."""
        if isinstance(t, torch.Tensor):
            tt = t.to(device=x.device, dtype=torch.float32)
            scales = [self.guidance.scale_at(float(s)) for s in t.tolist()]
        else:
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
            scales = [self.guidance.scale_at(t)]
        if all(s == 1.0 for s in scales) or (y is None and self.guide is None):
            return self.model(x, tt, y)
        v_cond, v_uncond = self._guided(self._mode(x, tt, y), x, tt, y)
        if len(scales) == 1:
            guided = v_uncond + scales[0] * (v_cond - v_uncond)
        else:
            scale = torch.tensor(scales, device=x.device).view(-1, *([1] * (x.ndim - 1)))
            # samples whose time lies in no interval stay exactly unguided, as they are when sampled alone
            guided = torch.where(scale == 1.0, v_cond, v_uncond + scale.to(v_cond.dtype) * (v_cond - v_uncond))
        ch = self.guidance.channels
        if ch is None or ch >= x.shape[1]:
            return guided
        return torch.cat([guided[:, :ch], v_cond[:, ch:]], dim=1)  # legacy: the rest stays conditional


# ------------------------------------------------------------------------------------------------------ sampling
FIXED_STEP_METHODS = ("euler", "heun", "euler_maruyama", "dpmpp_2m")   # the cost is `steps` (Heun: 2x) evaluations
SAMPLER_METHODS = (*FIXED_STEP_METHODS, "dopri5")                          # dopri5's is known only afterwards


@dataclass
class SamplerConfig:
    method: Literal["euler", "heun", "euler_maruyama", "dpmpp_2m", "dopri5"] = "euler"
    steps: int = 250                   # fixed-grid methods; dopri5 chooses its own steps from rtol/atol
    time_shift: float | None = None    # None: the time_shift the model was trained with (its bundle)
    diffusion_norm: float = 1.0        # SDE: w_t = diffusion_norm * sigma_t (SiT's "sigma" form)
    sde_last_step: float = 0.04        # SDE: size of the final noise-free mean step (SiT's default); 0 = 1/steps
    rtol: float = 1e-3                 # dopri5: relative and absolute tolerance per sample (SiT's defaults)
    atol: float = 1e-6
    guidance: GuidanceSchedule = field(default_factory=GuidanceSchedule)
    cfg_batch: Literal["auto", "concat", "separate"] = "auto"  # GuidedVelocity: auto = measured on a CPU
    flow_denoise: bool = True          # flows only: STARFlow's score-based denoising step after the inverse
    flow: dict[str, Any] = field(default_factory=dict)  # flows only: overrides of the bundle's sampling switches
    #                                    (fae.models.starflow.FlowSampling keys, e.g. {"jacobi": True})

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.time_shift is not None and self.time_shift <= 0:
            raise ValueError("time_shift must be > 0")
        if self.diffusion_norm < 0:
            raise ValueError("diffusion_norm must be >= 0")
        if not 0 <= self.sde_last_step < 1:
            raise ValueError(f"sde_last_step must lie in [0, 1), got {self.sde_last_step}")
        if self.rtol <= 0 or self.atol <= 0:
            raise ValueError(f"rtol and atol must be > 0, got {self.rtol} and {self.atol}")
        if self.method not in SAMPLER_METHODS:
            raise ValueError(f"unknown sampler {self.method!r} ({', '.join(SAMPLER_METHODS)})")
        self.guidance.validate()


def paper_method(guidance: GuidanceSchedule) -> Literal["euler", "euler_maruyama"]:
    """The paper's sampler rule (App. D, after SiT): the Euler-Maruyama SDE without guidance, the Euler ODE with it
    (250 steps either way, SamplerConfig's default)."""
    return "euler" if guidance.active else "euler_maruyama"


def time_grid(steps: int, shift: float = 1.0, last_step: float = 0.0) -> list[float]:
    """steps + 1 times from 1 (noise) to 0 (data): a uniform grid mapped through the time shift. With `last_step`
    l > 0 (SiT's SDE rule), the first steps - 1 steps span [l, 1] on that grid and the last one is l -> 0."""
    if last_step <= 0 or steps == 1:
        return [float(shift_time(1.0 - i / steps, shift)) for i in range(steps + 1)]
    head = time_grid(steps - 1, shift)
    return [last_step + (1.0 - last_step) * t for t in head] + [0.0]


def _noise(shape: Sequence[int], generators: torch.Generator | Sequence[torch.Generator] | None,
           device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise; with one generator per sample, sample i's noise depends only on its own generator, so the
    result does not depend on how samples are batched or split across processes. Drawn on the CPU (reproducible
    across devices), then moved."""
    if generators is None or isinstance(generators, torch.Generator):
        return torch.randn(tuple(shape), generator=generators).to(device, dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generators]).to(device, dtype)


def _log_snr(t: float) -> float:
    """lambda = log(alpha_t / sigma_t) = log((1 - t) / t): -inf at t = 1 (noise), +inf at t = 0 (data)."""
    if t >= 1.0:
        return -math.inf
    return math.inf if t <= 0.0 else math.log((1.0 - t) / t)


def _dpmpp_2m_step(x: torch.Tensor, v: torch.Tensor, s: float, t: float,
                   previous: tuple[torch.Tensor, float] | None) -> tuple[torch.Tensor, tuple[torch.Tensor, float]]:
    """One DPM-Solver++(2M) step from time s to t < s in data prediction, on the path alpha = 1 - t, sigma = t.

    x0 = x - s v is the model's data prediction. The exact solution for a data prediction D held constant over the
    step is x_t = (t / s) x_s + (alpha_t - (t / s) alpha_s) D (finite at s = 1, where it is the Euler step). The
    second order takes D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h in lambda. Where that difference vanishes or
    is undefined the step is first order: after t = 1 (lambda = -inf, so r = inf) and into t = 0 (lambda = +inf,
    where x_0 is the data prediction itself). A fixed number of first-order steps keeps the global order 2."""
    x0 = x - s * v
    lam_s, lam_t = _log_snr(s), _log_snr(t)
    if t <= 0.0:
        return x0, (x0, lam_s)
    data = x0
    if previous is not None and math.isfinite(previous[1]):
        r = (lam_s - previous[1]) / (lam_t - lam_s)
        data = x0 + (x0 - previous[0]) / (2 * r)
    ratio = t / s
    return ratio * x + ((1.0 - t) - ratio * (1.0 - s)) * data, (x0, lam_s)


@torch.no_grad()
def sample(velocity: VelocityFn, noise: torch.Tensor, y: Any, cfg: SamplerConfig,
           time_shift: float = 1.0, generators: torch.Generator | Sequence[torch.Generator] | None = None,
           progress: bool = False, info: dict[str, Any] | None = None) -> torch.Tensor:
    """Integrate from x_1 = `noise` at t = 1 to t = 0 and return x_0.

    `velocity(x, t: float, y)` is e.g. a `GuidedVelocity`; dopri5 calls it with a (B,) tensor of times and the
    conditions of the samples still running (fae.solvers). `time_shift` is the trained model's s (overridden by
    `cfg.time_shift`; dopri5 chooses its own times). `generators` feed the SDE noise (one per sample for
    batch-independent results). `info`, when given, receives "nfe": the velocity evaluations per sample (B,)
    (a guided evaluation is one, whatever number of network calls it takes).
    """
    cfg.validate()
    if cfg.method == "dopri5":
        x, nfe = dopri5(velocity, noise, y, cfg.rtol, cfg.atol,  # type: ignore[arg-type]  # takes tensor times
                        breaks=[b for iv in cfg.guidance.intervals for b in (iv.t_min, iv.t_max)])
        if info is not None:
            info["nfe"] = nfe
        return x
    shift = cfg.time_shift if cfg.time_shift is not None else time_shift
    ts = time_grid(cfg.steps, shift, cfg.sde_last_step if cfg.method == "euler_maruyama" else 0.0)
    x = noise
    steps = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{cfg.method} x{cfg.steps}", leave=False)
    previous: tuple[torch.Tensor, float] | None = None
    for i in steps:
        t, t_next = ts[i], ts[i + 1]
        h = t - t_next
        v = velocity(x, t, y)
        if cfg.method == "euler":
            x = x - h * v
        elif cfg.method == "heun":
            x_pred = x - h * v
            x = x - h * 0.5 * (v + velocity(x_pred, t_next, y))
        elif cfg.method == "dpmpp_2m":
            if i > 0 and cfg.guidance.scale_at(ts[i - 1]) != cfg.guidance.scale_at(t):
                previous = None   # the velocity jumped at a guidance edge: a difference across it is no derivative
            x, previous = _dpmpp_2m_step(x, v, t, t_next, previous)
        else:   # euler_maruyama
            w = cfg.diffusion_norm * t
            # drift of the reverse SDE: v - w * score, with w * score = -(diffusion_norm) * (x + (1 - t) v)
            x_mean = x - h * (v + cfg.diffusion_norm * (x + (1 - t) * v))
            last = i == cfg.steps - 1  # the last step goes to the mean
            x = x_mean if last else x_mean + math.sqrt(2 * w * h) * _noise(x.shape, generators, x.device, x.dtype)
    if info is not None:
        info["nfe"] = torch.full((x.shape[0],), cfg.steps * (2 if cfg.method == "heun" else 1), dtype=torch.long)
    return x


# ---------------------------------------------------------------------------------------------- per-sample seeds
def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for global sample `index` of a run seeded with `seed` (independent of batching/ranks)."""
    digest = hashlib.sha256(f"fae-sample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_1 for a batch: one draw of shape[1:] from each sample's generator."""
    return _noise(shape, list(generators), torch.device(device), dtype)


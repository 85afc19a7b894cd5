"""Flow-matching path, time shift, time distributions, guidance schedule, samplers (the SDE with a diffusion norm too)
and per-sample noise (fae/transport.py)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from margins import within

from fae.transport import (
    GuidanceInterval,
    GuidanceSchedule,
    GuidedVelocity,
    SamplerConfig,
    TransportConfig,
    dimension_shift,
    flow_matching_loss,
    initial_noise,
    interpolate,
    sample,
    sample_generators,
    sample_time,
    shift_time,
    time_grid,
    velocity_target,
)


# ---------------------------------------------------------------------------------------------------- path
def test_interpolant_endpoints_and_velocity():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(interpolate(x0, eps, torch.zeros(3)), x0)        # t = 0 is data
    assert torch.equal(interpolate(x0, eps, torch.ones(3)), eps)        # t = 1 is noise
    t, dt = torch.full((3,), 0.3, dtype=torch.float64), 1e-6
    x0, eps = x0.double(), eps.double()
    fd = (interpolate(x0, eps, t + dt) - interpolate(x0, eps, t - dt)) / (2 * dt)
    torch.testing.assert_close(fd, velocity_target(x0, eps))            # v = d x_t / dt = eps - x0
    mixed = interpolate(x0, eps, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(mixed[1], 0.5 * (x0[1] + eps[1]))


# ---------------------------------------------------------------------------------------------------- shift
def test_time_shift_identity_monotone_endpoints():
    t = torch.linspace(0, 1, 101)
    assert torch.equal(shift_time(t, 1.0), t)
    for s in (0.2, 0.4, 0.7, 1.5, 3.0):
        u = shift_time(t, s)
        assert u[0] == 0 and u[-1] == 1
        assert torch.all(u[1:] > u[:-1]), f"shift {s} is not monotone"
    assert torch.all(shift_time(t[1:-1], 0.4) > t[1:-1])   # s < 1 spends more time near the noise end
    with pytest.raises(ValueError):
        shift_time(t, 0.0)


def test_paper_shift_04_is_lightningdit_formula_on_flipped_axis():
    """The paper's 'shift 0.4' is LightningDiT's tau' = s tau / (1 + (s-1) tau) on tau = 1 - t (tau = 0 noise);
    in our t = 1-noise axis that is alpha t / (1 + (alpha - 1) t) with alpha = 1/s = 2.5 (RAE/SD3 form)."""
    s, t = 0.4, torch.linspace(0, 1, 57, dtype=torch.float64)
    tau = 1 - t
    lightningdit = s * tau / (1 + (s - 1) * tau)
    torch.testing.assert_close(shift_time(t, s), 1 - lightningdit)
    alpha = 1 / s
    torch.testing.assert_close(shift_time(t, s), alpha * t / (1 + (alpha - 1) * t))
    assert shift_time(0.5, s) == pytest.approx(1.25 / 1.75)
    # the sampling grid uses the same map: uniform steps in the unshifted time
    grid = time_grid(10, s)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and all(a > b for a, b in itertools.pairwise(grid))
    assert grid[5] == pytest.approx(1.25 / 1.75)
    assert dimension_shift(256, 32) == pytest.approx(1 / math.sqrt(2))


@pytest.mark.margin
def test_training_time_distributions():
    g = torch.Generator().manual_seed(0)
    plain = sample_time(20000, TransportConfig(), g)
    assert plain.min() >= 0 and plain.max() <= 1
    within("|mean of uniform t - 0.5|", abs(plain.mean().item() - 0.5), hi=0.01)
    shifted = sample_time(20000, TransportConfig(time_shift=0.4), torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, shift_time(plain, 0.4))          # same draws, shifted
    off = sample_time(20000, TransportConfig(time_shift=0.4, shift_in_training=False), torch.Generator().manual_seed(0))
    assert torch.equal(off, plain)
    ln = sample_time(20000, TransportConfig(time_dist="logit_normal"), g)
    within("|median of logit-normal t - 0.5|", abs(ln.median().item() - 0.5), hi=0.02)
    within("std of logit-normal t / std of uniform t", ln.std() / plain.std(), hi=1)  # concentrates mid-way


def test_loss_matches_manual_and_cosine_term():
    x0, y = torch.randn(4, 3, 2, 2), torch.arange(4)
    model = lambda x, t, y: 0.5 * x  # noqa: E731
    loss, logs = flow_matching_loss(model, x0, y, TransportConfig(), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.rand(4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    manual = (0.5 * interpolate(x0, eps, t) - (eps - x0)).pow(2).mean()
    torch.testing.assert_close(loss, manual)
    loss_c, logs_c = flow_matching_loss(model, x0, y, TransportConfig(cosine_loss_weight=1.0),
                                        torch.Generator().manual_seed(3))
    assert "cos_loss" in logs_c and loss_c > loss and 0 <= logs_c["cos_loss"] <= 2


# ---------------------------------------------------------------------------------------------------- guidance
class _CountingModel:
    """Conditional output 1, unconditional output 0 in every channel; counts calls and batch sizes."""

    class config:  # noqa: N801 - mimics DiT.config
        null_class = 10

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x, t, y):
        self.calls.append(x.shape[0])
        if y is None:
            return torch.zeros_like(x)
        return (y != 10).to(x.dtype).view(-1, 1, 1, 1).expand_as(x).clone()


def test_paper_guidance_schedule_picks_scale_per_t():
    sched = GuidanceSchedule.paper()
    assert sched.scale_at(1.0) == 0.9 and sched.scale_at(0.95) == 0.9 and sched.scale_at(0.9) == 0.9
    assert sched.scale_at(0.8) == 1.0
    assert sched.scale_at(0.7) == 2.5 and sched.scale_at(0.3) == 2.5 and sched.scale_at(0.0) == 2.5
    assert GuidanceSchedule().scale_at(0.5) == 1.0 and not GuidanceSchedule().active
    parsed = GuidanceSchedule.parse("0.9-1:0.9,0-0.7:2.5")
    assert parsed == sched
    assert GuidanceSchedule.parse("paper") == sched and GuidanceSchedule.parse("1.5").scale_at(0.2) == 1.5
    with pytest.raises(ValueError, match="t_min-t_max"):
        GuidanceSchedule.parse("0.9:1:2")
    with pytest.raises(ValueError):
        GuidanceSchedule([GuidanceInterval(0.8, 0.2, 2.0)]).validate()


@pytest.mark.parametrize("batch", ["concat", "separate"])
def test_guidance_touches_every_channel(batch):
    model = _CountingModel()
    guided = GuidedVelocity(model, GuidanceSchedule.paper(), batch=batch)
    x, y = torch.randn(2, 32, 4, 4), torch.tensor([1, 2])
    for t, scale in ((0.95, 0.9), (0.3, 2.5)):
        out = guided(x, t, y)
        torch.testing.assert_close(out, torch.full_like(x, scale))   # uncond + s (cond - uncond) everywhere
    model.calls.clear()
    assert torch.equal(guided(x, 0.8, y), torch.ones_like(x))        # scale 1: one conditional call only
    assert model.calls == [2]
    legacy = GuidedVelocity(model, GuidanceSchedule(GuidanceSchedule.paper().intervals, channels=3), batch=batch)
    out = legacy(x, 0.3, y)
    assert torch.all(out[:, :3] == 2.5) and torch.all(out[:, 3:] == 1.0)  # the DiT leftover: 3 channels only
    model.calls.clear()
    guided(x, 0.3, y)
    assert model.calls == ([4] if batch == "concat" else [2, 2])


# ---------------------------------------------------------------------------------------------------- samplers
MU, SD = 1.5, 0.5


def _gaussian_velocity(x, t, y=None):
    """Exact velocity E[eps - x0 | x_t] for data x0 ~ N(MU, SD^2) per element."""
    t = torch.as_tensor(t, dtype=x.dtype)
    m = (1 - t) * MU
    var = (1 - t) ** 2 * SD ** 2 + t ** 2
    e_eps = t / var * (x - m)
    e_x0 = MU + (1 - t) * SD ** 2 / var * (x - m)
    return e_eps - e_x0


@pytest.mark.margin
@pytest.mark.parametrize("method,steps,order,tol", [("euler", 200, 1, 1e-2), ("heun", 25, 2, 5e-4)])
def test_ode_integrates_known_linear_flow(method, steps, order, tol):
    """For Gaussian data the exact flow is linear: x_1 = eps maps to x_0 = MU + SD * eps. The error (relative to the
    data's scale) is small and falls with the solver's order when the steps double: 2x for Euler, 4x for Heun.
    (A fixed absolute bound failed for one seed in five: the error grows with the largest |eps| drawn.)"""
    eps = torch.randn(64, 2, 3, 3, dtype=torch.float64)
    target = MU + SD * eps

    def error(n: int, shift: float) -> float:
        out = sample(_gaussian_velocity, eps, None, SamplerConfig(method=method, steps=n), time_shift=shift)
        return float((out - target).abs().max() / target.abs().max())

    for shift in (1.0, 0.4):
        coarse, fine = error(steps, shift), error(2 * steps, shift)
        within(f"{method} relative error at {2 * steps} steps, shift {shift}", fine, hi=tol)
        within(f"{method} error ratio {steps} -> {2 * steps} steps, shift {shift}", coarse / fine, lo=0.9 * 2 ** order)
    assert error(5, 1.0) > tol  # the test can fail: few steps are not enough


@pytest.mark.margin
def test_sde_reaches_data_distribution_and_last_step_is_mean():
    n = 80000   # the std's standard error 0.0013
    gens = torch.Generator().manual_seed(1)
    eps = torch.randn(n, 1, 1, 1, generator=gens, dtype=torch.float64)
    cfg = SamplerConfig(method="euler_maruyama", steps=400)
    out = sample(_gaussian_velocity, eps, None, cfg, time_shift=0.7, generators=gens)
    within("|SDE sample mean - mu|", abs(out.mean().item() - MU), hi=0.02)
    within("|SDE sample std - sd|", abs(out.std().item() - SD), hi=0.02)
    # the SDE really is stochastic, unlike the ODE, and it is not just the ODE result
    ode = sample(_gaussian_velocity, eps, None, SamplerConfig(steps=400), time_shift=0.7)
    within("mean |SDE - ODE|", (out - ode).abs().mean(), lo=0.05)
    # with one step the only step is the last one, which goes to the mean: deterministic
    one = SamplerConfig(method="euler_maruyama", steps=1)
    a = sample(_gaussian_velocity, eps[:8], None, one, generators=torch.Generator().manual_seed(5))
    b = sample(_gaussian_velocity, eps[:8], None, one, generators=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)


def test_sde_uses_sits_last_step_rule():
    """SiT's default: Euler-Maruyama over [0.04, 1] in steps - 1 steps, then one noise-free mean step 0.04 -> 0."""
    seen: list[float] = []

    def record(x, t, y):
        seen.append(t)
        return _gaussian_velocity(x, t, y)

    x = torch.randn(4, 1, 1, 1, dtype=torch.float64)
    sample(record, x, None, SamplerConfig(method="euler_maruyama", steps=5), generators=torch.Generator())
    assert seen == pytest.approx([1.0, 0.76, 0.52, 0.28, 0.04])          # 5 evaluations, the last at t = 0.04
    assert time_grid(5, 0.4, 0.04)[-2:] == pytest.approx([0.04, 0.0])     # the shift moves the grid, not the end
    seen.clear()
    sample(record, x, None, SamplerConfig(method="euler_maruyama", steps=5, sde_last_step=0.0), generators=None)
    assert seen == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])              # the old rule: last step 1/steps
    seen.clear()
    sample(record, x, None, SamplerConfig(method="euler", steps=5))       # the ODE keeps its uniform grid
    assert seen == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    # one step is only the last one, to the mean: deterministic
    cfg = SamplerConfig(method="euler_maruyama", steps=1)
    a = sample(_gaussian_velocity, x, None, cfg, generators=torch.Generator().manual_seed(1))
    b = sample(_gaussian_velocity, x, None, cfg, generators=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="sde_last_step"):
        SamplerConfig(sde_last_step=1.0).validate()


def test_per_sample_generators_make_batches_independent():
    idx = list(range(6))
    full = initial_noise((6, 2, 3, 3), sample_generators(7, idx))
    halves = torch.cat([initial_noise((3, 2, 3, 3), sample_generators(7, idx[:3])),
                        initial_noise((3, 2, 3, 3), sample_generators(7, idx[3:]))])
    assert torch.equal(full, halves)
    assert not torch.equal(full, initial_noise((6, 2, 3, 3), sample_generators(8, idx)))
    cfg = SamplerConfig(method="euler_maruyama", steps=20)
    run = lambda ids: sample(_gaussian_velocity, initial_noise((len(ids), 2, 3, 3), sample_generators(7, ids)),  # noqa: E731
                             None, cfg, generators=sample_generators(7, ids))
    torch.testing.assert_close(run(idx), torch.cat([run(idx[:2]), run(idx[2:])]), rtol=0, atol=1e-6)


def test_sampler_config_validation():
    with pytest.raises(ValueError):
        SamplerConfig(steps=0).validate()
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(_gaussian_velocity, torch.zeros(1, 1, 1, 1), None, SamplerConfig(method="rk4"))  # type: ignore[arg-type]


def test_paper_sampler_rule_lives_in_the_library():
    from fae.transport import GuidanceSchedule, paper_method

    assert paper_method(GuidanceSchedule()) == "euler_maruyama"          # no guidance: SDE
    assert paper_method(GuidanceSchedule.paper()) == "euler"             # guidance: ODE
    assert paper_method(GuidanceSchedule.parse("1.0")) == "euler_maruyama"  # scale 1 everywhere is no guidance


# ---------------------------------------------------------------------------------------------------- diffusion norm, noise
def _gaussian_velocity_of(m: float, s: float):
    """Exact v(x, t) = E[eps - x0 | x_t] for x0 ~ N(m, s^2), x_t = (1 - t) x0 + t eps."""
    def v(x: torch.Tensor, t: float, y) -> torch.Tensor:
        var = (1 - t) ** 2 * s * s + t * t
        centred = x - (1 - t) * m
        return t / var * centred - (m + (1 - t) * s * s / var * centred)
    return v


@pytest.mark.parametrize("norm", [0.5, 2.0])
@pytest.mark.margin
def test_sde_with_diffusion_norm_reaches_the_data(norm):
    m, s = 1.5, 0.5
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 1, 1, 1, generator=g)   # the mean's standard error 0.0035
    cfg = SamplerConfig(method="euler_maruyama", steps=100, diffusion_norm=norm)
    x = sample(_gaussian_velocity_of(m, s), noise, None, cfg, generators=g).flatten()
    within("|sample mean - data mean|", abs(float(x.mean()) - m), hi=0.04)
    within("|sample std - data std|", abs(float(x.std()) - s), hi=0.04)


@pytest.mark.margin
def test_logit_normal_times_center_on_the_mean():
    from fae.transport import sample_time

    cfg = TransportConfig(time_dist="logit_normal", logit_normal_mean=1.0, logit_normal_std=0.5, time_shift=1.0)
    t = sample_time(20000, cfg, torch.Generator().manual_seed(0))
    within("|median t - sigmoid(mean)|", abs(float(t.median()) - 1 / (1 + math.exp(-1.0))), hi=0.01)  # the law's median


def test_each_sample_gets_its_own_noise_from_seed_and_index():
    from fae.transport import initial_noise, sample_generators

    batch = initial_noise((3, 2, 2, 2), sample_generators(7, [4, 5, 6]))
    alone = initial_noise((1, 2, 2, 2), sample_generators(7, [5]))
    assert torch.equal(batch[1], alone[0])                       # depends on (seed, index), not on the batch
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[1], batch[2])
    assert not torch.equal(alone, initial_noise((1, 2, 2, 2), sample_generators(8, [5])))  # nor on the index only

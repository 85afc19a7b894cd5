"""The adaptive (dopri5) and multistep (DPM-Solver++ 2M) samplers and autoguidance (fae/solvers.py, fae/transport.py,
fae/generators): against the closed-form flow of Gaussian data, per-sample independence through a real tiny DiT, and
the guide's identity checks."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from margins import within
from recorder import Recorder, tiny_dit

import fae.sampling
import fae.stages
from fae.cli import main
from fae.config import ConfigError
from fae.generators import DiTGenerator, GeneratorRecord, LatentOrigin
from fae.models.dit import DiT
from fae.sampling import generate, sample_conditions, sampler_config
from fae.transport import SAMPLER_METHODS, GuidanceSchedule, SamplerConfig, initial_noise, sample, sample_generators

# Gaussian data, one mean and std per channel: the exact flow-matching velocity is linear in x and the ODE's flow
# maps x_1 = eps to x_0 = MU + SD * eps
MU = torch.tensor([0.5, -1.0], dtype=torch.float64).view(1, 2, 1, 1)
SD = torch.tensor([0.2, 0.5], dtype=torch.float64).view(1, 2, 1, 1)


def gaussian_velocity(x: torch.Tensor, t: float | torch.Tensor, y: object) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype)
    t = t.view(-1, 1, 1, 1) if t.ndim else t       # dopri5 passes one time per sample
    m = (1 - t) * MU
    var = (1 - t) ** 2 * SD ** 2 + t ** 2
    return t / var * (x - m) - (MU + (1 - t) * SD ** 2 / var * (x - m))


EPS = torch.randn(32, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
EXACT = MU + SD * EPS


def _error(method: str, steps: int = 1, **kw: float) -> float:
    out = sample(gaussian_velocity, EPS, None, SamplerConfig(method=method, steps=steps, **kw))  # type: ignore[arg-type]
    return float((out - EXACT).abs().max())


# ---------------------------------------------------------------------------------------------------- dopri5
def test_dopri5_matches_the_closed_form_and_a_fine_euler_reference():
    info: dict = {}
    out = sample(gaussian_velocity, EPS, None, SamplerConfig(method="dopri5", rtol=1e-6, atol=1e-9), info=info)
    within("dopri5 rtol 1e-6: max |x0 - closed form|", (out - EXACT).abs().max(), hi=1e-5)     # measured 7e-7
    euler = sample(gaussian_velocity, EPS, None, SamplerConfig(method="euler", steps=4000))
    euler_error = float((euler - EXACT).abs().max())                                          # ~6e-4
    # dopri5 sits within Euler's own error of the fine Euler result, at a small fraction of its evaluations
    within("max |dopri5 - Euler x4000| / Euler's error", (out - euler).abs().max() / euler_error, lo=0.9, hi=1.1)
    within("dopri5 mean NFE at rtol 1e-6", info["nfe"].float().mean(), lo=20, hi=400)
    # the tolerance is what buys the accuracy: looser is cheaper and worse
    loose: dict = {}
    coarse = sample(gaussian_velocity, EPS, None, SamplerConfig(method="dopri5", rtol=1e-2, atol=1e-5), info=loose)
    assert loose["nfe"].float().mean() < info["nfe"].float().mean() / 3
    within("dopri5 rtol 1e-2 error / rtol 1e-6 error", (coarse - EXACT).abs().max() / (out - EXACT).abs().max(),
           lo=100)


def test_dopri5_nfe_counts_every_evaluation_of_each_sample():
    rows = torch.zeros(len(EPS), dtype=torch.long)

    def counted(x, t, y):
        rows[y] += 1   # y carries each row's sample index: the solver hands over the running samples' conditions
        return gaussian_velocity(x, t, None)

    info: dict = {}
    sample(counted, EPS, torch.arange(len(EPS)), SamplerConfig(method="dopri5"), info=info)
    assert torch.equal(rows, info["nfe"]) and len(set(info["nfe"].tolist())) > 1   # samples take their own steps


def test_dopri5_steps_do_not_cross_the_guidance_schedules_breaks():
    times: list[float] = []

    def record(x, t, y):
        times.extend(t.tolist())
        return gaussian_velocity(x, t, y)

    sample(record, EPS[:2], None, SamplerConfig(method="dopri5", guidance=GuidanceSchedule.paper()))
    assert 0.7 in times and 0.9 in times          # a step ends exactly on each break
    with pytest.raises(ValueError, match="rtol"):
        SamplerConfig(method="dopri5", rtol=0).validate()


# ------------------------------------------------------------------------------------------------- DPM-Solver++
def test_dpmpp_2m_first_step_is_euler_and_it_converges_faster_than_euler():
    # from t = 1 (lambda = -inf) the data-prediction step is exactly Euler's
    one = SamplerConfig(method="dpmpp_2m", steps=1)
    torch.testing.assert_close(sample(gaussian_velocity, EPS, None, one),
                               sample(gaussian_velocity, EPS, None, SamplerConfig(method="euler", steps=1)))
    # equal error for a quarter of the steps; measured: DPM-Solver++ x32 1.1e-2, Euler x128 1.8e-2
    within("DPM-Solver++ x32 error / Euler x128 error", _error("dpmpp_2m", 32) / _error("euler", 128), hi=0.8)
    # the order: 4x the steps cut Euler's error 3.9x (order 1) and DPM-Solver++'s 6.1x (measured)
    within("DPM-Solver++ error ratio x32 -> x128", _error("dpmpp_2m", 32) / _error("dpmpp_2m", 128), lo=5.0)
    within("Euler error ratio x32 -> x128", _error("euler", 32) / _error("euler", 128), hi=4.2)


def test_dpmpp_2m_keeps_its_order_across_a_guidance_edge():
    """Under interval guidance the velocity jumps at the interval's edge; a multistep difference across the jump is no
    derivative, so the solver restarts there with a first-order step and stays second order overall."""
    edge = GuidanceSchedule.parse("0-0.5:2.0")

    def jumpy(x: torch.Tensor, t: float | torch.Tensor, y: object) -> torch.Tensor:
        scale = torch.where(torch.as_tensor(t, dtype=x.dtype) <= 0.5, 2.0, 1.0).to(x.dtype)
        return (scale.view(-1, 1, 1, 1) if scale.ndim else scale) * gaussian_velocity(x, t, y)

    ref = sample(jumpy, EPS, None, SamplerConfig(method="dopri5", rtol=1e-7, atol=1e-9, guidance=edge))

    def error(steps: int) -> float:
        return float((sample(jumpy, EPS, None, SamplerConfig(method="dpmpp_2m", steps=steps, guidance=edge))
                      - ref).abs().max())

    # measured: 6.6x with the restart; 3.0x (first order) when the history is carried across the edge
    within("DPM-Solver++ error ratio x32 -> x128 across a guidance edge", error(32) / error(128), lo=5.0)


# ------------------------------------------------------------------------------------------- through a real DiT
def _generator(seed: int = 0, num_classes: int = 3, **origin: object) -> DiTGenerator:
    """A tiny class-conditional DiT with random weights (an untrained one predicts v = 0)."""
    torch.manual_seed(seed)
    model = DiT(dataclasses.replace(tiny_dit().config, num_classes=num_classes))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)   # larger weights make a stiff field: dopri5 then needs ~1000 NFE
    fields = {"source": "fae", "channels": 2, "grid": (2, 2), "tokenizer": "fae", "tokenizer_sha256": "ab" * 32}
    record = GeneratorRecord([0.0, 0.0], [1.0, 1.0], LatentOrigin(**{**fields, **origin}), ["a", "b", "c"],
                             {"transport": {"time_shift": 0.5}})
    return DiTGenerator(model, record, f"dit-{seed}")


LOOSE = {"rtol": 1e-2, "atol": 1e-4}   # dopri5 through the DiT: the path, not the accuracy (and few calls)
SAMPLERS = [SamplerConfig(method=m, steps=6, **LOOSE) for m in SAMPLER_METHODS] + [
    SamplerConfig(method="dopri5", guidance=GuidanceSchedule.paper(), cfg_batch="separate", **LOOSE),
    SamplerConfig(method="dpmpp_2m", steps=6, guidance=GuidanceSchedule.parse("2.0"), cfg_batch="concat")]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: f"{s.method}{'-guided' if s.guidance.active else ''}")
def test_a_sample_does_not_depend_on_its_batch(sampler):
    gen = _generator()
    idx = [0, 1, 2, 3]
    gens = sample_generators(3, idx)
    labels = torch.tensor([0, 1, 2, 0])
    batch = gen.sample(initial_noise((4, 2, 2, 2), gens), labels, sampler, gens)
    alone_gens = sample_generators(3, [2])
    alone = gen.sample(initial_noise((1, 2, 2, 2), alone_gens), labels[2:3], sampler, alone_gens)
    torch.testing.assert_close(batch[2:3], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(batch[2], batch[1])


# ------------------------------------------------------------------------------------------------- autoguidance
def _draw(gen: DiTGenerator, sampler: SamplerConfig, labels: torch.Tensor | None = None, conditional: bool = True):
    labels = torch.tensor([0, 1, 2]) if labels is None and conditional else labels
    gens = sample_generators(0, range(3))
    return gen.sample(initial_noise((3, 2, 2, 2), gens), labels, sampler, gens)


@pytest.mark.parametrize("method", ["euler", "dopri5"])
def test_autoguidance_by_the_model_itself_is_the_unguided_sample(method):
    gen = _generator()
    plain = _draw(gen, SamplerConfig(method=method, steps=5, **LOOSE))
    gen.set_guide(_generator())                              # the same weights, loaded again
    guided = SamplerConfig(method=method, steps=5, guidance=GuidanceSchedule.parse("3.0"), **LOOSE)
    assert torch.equal(_draw(gen, guided), plain)
    gen.set_guide(_generator(seed=1))                        # another model: it changes the sample
    assert (_draw(gen, guided) - plain).abs().max() > 1e-3
    assert gen.settings(guided)["guidance_model"] == "dit-1"


def test_autoguidance_respects_the_interval_and_gives_the_guide_the_same_condition():
    gen = _generator()
    guide = _generator(seed=1)
    guide.model = Recorder(guide.model)
    gen.set_guide(guide)
    labels = torch.tensor([2, 0, 1])
    _draw(gen, SamplerConfig(method="euler", steps=10, time_shift=1.0, guidance=GuidanceSchedule.parse("0-0.5:2.0")),
          labels)
    times = [float(c["t"][0]) for c in guide.model.calls]
    assert times and max(times) <= 0.5 and len(times) == 5   # only inside the interval, once per step there
    assert all(torch.equal(c["y"], labels) for c in guide.model.calls)   # conditional against conditional


def test_an_unconditional_model_can_be_autoguided():
    """The guide stands in for the missing unconditional branch: guidance without labels is refused for CFG only."""
    gen, sampler = _generator(num_classes=0), SamplerConfig(guidance=GuidanceSchedule.parse("2.0"), steps=3)
    with pytest.raises(ConfigError, match="conditional model"):
        sample_conditions(gen, 3, "equal", None, 0, sampler)
    gen.set_guide(_generator(seed=1, num_classes=0))
    assert sample_conditions(gen, 3, "equal", None, 0, sampler)[0] is None
    plain = _draw(gen, SamplerConfig(steps=3), conditional=False)
    guided = _draw(gen, sampler, conditional=False)
    assert (guided - plain).abs().max() > 1e-3                      # guided, by the guide
    gen.set_guide(_generator(num_classes=0))
    assert torch.equal(_draw(gen, sampler, conditional=False), plain)   # by itself: unguided


@pytest.mark.parametrize("change,named", [
    ({"tokenizer_sha256": "cd" * 32}, "latent origin"),
    ({"channels": 2, "grid": (2, 2), "source": "raw_features", "tokenizer": None}, "latent origin"),
])
def test_a_guide_of_another_latent_space_is_refused_by_name(change, named):
    with pytest.raises(ConfigError, match=named):
        _generator().set_guide(_generator(**change))


def test_a_guide_of_another_shape_classes_or_statistics_is_refused_by_name():
    gen = _generator()
    config = tiny_dit().config
    other = DiTGenerator(DiT(dataclasses.replace(config, num_classes=5)), gen.record, "five classes")
    with pytest.raises(ConfigError, match="class count: 3 vs 5"):
        gen.set_guide(other)
    wide = DiTGenerator(DiT(dataclasses.replace(config, input_size=(4, 4))), gen.record, "bigger")
    with pytest.raises(ConfigError, match="latent shape"):
        gen.set_guide(wide)
    shifted = DiTGenerator(tiny_dit(), dataclasses.replace(gen.record, mean=[0.0, 1.0]), "other stats")
    with pytest.raises(ConfigError, match="latent statistics"):
        gen.set_guide(shifted)


# ------------------------------------------------------------------------------------------------------ the CLI
def test_sample_cli_takes_the_new_samplers_and_a_guidance_model(tmp_path, monkeypatch):
    seen: dict = {}
    loaded = {"d": _generator(), "small": _generator(seed=1)}
    monkeypatch.setattr(fae.stages, "load_run_generator", lambda path, device: loaded[path])
    monkeypatch.setattr(fae.sampling, "load_decoder", lambda gen, **kw: "decoder")
    monkeypatch.setattr(fae.sampling, "sample_to_dir", lambda gen, decode, out, n, **kw: seen.update(kw, gen=gen) or {})
    assert main(["sample", "--dit", "d", "--out", str(tmp_path), "--sampler", "dopri5", "--rtol", "1e-4",
                 "--atol", "1e-7", "--guidance-model", "small", "--guidance", "2.0", "--no-progress"]) == 0
    sampler = seen["sampler"]
    assert (sampler.method, sampler.rtol, sampler.atol) == ("dopri5", 1e-4, 1e-7)
    assert seen["gen"].guide is loaded["small"]
    assert sampler_config(method="dpmpp_2m").method == "dpmpp_2m"
    with pytest.raises(ConfigError, match="unknown sampler"):
        sampler_config(method="rk4")


def test_generate_with_dopri5_and_autoguidance_is_batch_independent():
    gen = _generator()
    gen.set_guide(_generator(seed=1))
    sampler = SamplerConfig(method="dopri5", guidance=GuidanceSchedule.paper(), **LOOSE)
    paint = lambda z: torch.sigmoid(z.mean(1, keepdim=True)).expand(-1, 3, -1, -1)  # noqa: E731
    a = generate(gen, paint, 4, sampler=sampler, batch_size=4, progress=False, precision="fp32")
    b = generate(gen, paint, 4, sampler=sampler, batch_size=3, progress=False, precision="fp32")
    assert (a.images.astype(int) - b.images.astype(int)).__abs__().max() <= 1
    assert a.settings["guidance_model"] == "dit-1"


def test_a_text_guide_must_share_the_text_width_and_encoder():
    from types import SimpleNamespace

    from fae.generators import check_guide

    def text_gen(width: int, encoder: str) -> SimpleNamespace:
        record = dataclasses.replace(_generator().record, settings={"text": {"encoder": {"name": encoder}}})
        return SimpleNamespace(record=record, latent_shape=(2, 2, 2), num_classes=0, condition_kind="text",
                               model=SimpleNamespace(config=SimpleNamespace(text_dim=width)), source=encoder)

    check_guide(text_gen(384, "minilm"), text_gen(384, "minilm"))
    with pytest.raises(ConfigError, match="text width, text encoder"):
        check_guide(text_gen(384, "minilm"), text_gen(2048, "minilm"))
    with pytest.raises(ConfigError, match="t5"):
        check_guide(text_gen(384, "minilm"), text_gen(384, "t5"))

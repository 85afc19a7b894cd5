"""What the sampling and evaluation docs claim, observed through behaviour: the time shift the DiT trains with and
samples with (the times the model is called at), `diffusion_norm` != 1, bf16 sampling, the CLI flags that reach the
library (--time-shift, --cfg-batch, --precision, --num-workers, --network inception:pytorch, --is-split-size), and
`fae eval is`. (benchmarks/mutation.py lists the bugs each test catches.)"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from margins import within
from torch import nn

import fae.encoding
import fae.sampling
import fae.stages
from fae.cli import main
from fae.generators import DiTGenerator, load_generator
from fae.metrics.inception import FIDInceptionV3, random_inception_state
from fae.metrics.scores import inception_score
from fae.models.dit import DiT, DiTConfig
from fae.sampling import generate
from fae.stages.dit import Config, DiTStage
from fae.transport import SamplerConfig, TransportConfig, sample, shift_time, time_grid

TRAINED_SHIFT = 0.3   # neither 1 (no shift) nor the paper's 0.4 (a default): only the configured value gives it


class Recorder(nn.Module):
    """Wraps a velocity model and records, per call, the time, the batch size and the autocast state."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.calls: list[dict] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append({"t": t.detach().clone(), "batch": x.shape[0], "y": y,
                           "autocast": torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")})
        return self.inner(x, t, y)


def _dit() -> DiT:
    return DiT(DiTConfig(input_size=(2, 2), in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3))


def _fake_cache() -> SimpleNamespace:
    manifest = {"source": "fae", "channels": 2, "grid": [2, 2], "class_names": ["a", "b", "c"]}
    return SimpleNamespace(manifest=manifest, path="latents", stats=lambda: {"mean": [0.0, 1.0], "std": [1.0, 2.0]})


@pytest.fixture
def generator(tmp_path) -> DiTGenerator:
    """A DiT bundle exported as `fae train dit` records it (transport included), loaded back from disk."""
    cfg = Config(latents="latents", transport=TransportConfig(time_shift=TRAINED_SHIFT))
    stage = DiTStage.__new__(DiTStage)   # the record needs the config and the cache, not a model
    stage.cfg, stage.cache = cfg, _fake_cache()
    DiTGenerator(_dit(), stage.record(), "made here").save_pretrained(tmp_path / "dit")
    gen = load_generator(tmp_path / "dit")
    gen.model = Recorder(gen.model)
    return gen


def _decode(z: torch.Tensor) -> torch.Tensor:
    return torch.zeros(z.shape[0], 3, 4, 4)


def _times(gen: DiTGenerator) -> list[float]:
    calls = gen.model.calls
    assert all(torch.all(c["t"] == c["t"][0]) for c in calls)
    return [float(c["t"][0]) for c in calls]


@pytest.mark.margin
def test_dit_stage_trains_at_the_configured_shift():
    stage = DiTStage.__new__(DiTStage)   # the loss needs the config and the model, not the latent cache
    stage.cfg = Config(latents="unused", transport=TransportConfig(time_shift=TRAINED_SHIFT))
    stage.modules = {"model": Recorder(_dit())}
    torch.manual_seed(0)
    n = 16000   # the empirical CDF's standard error is at most 0.004: the bound 0.03 is 7.5 of them
    stage.loss("main", {"latent": torch.randn(n, 2, 2, 2), "label": torch.zeros(n, dtype=torch.long)}, 0)
    t = stage.modules["model"].calls[0]["t"]
    for u in (0.1, 0.5, 0.9):  # P(t <= shift(u)) = u for t = shift(uniform)
        within(f"|P(t <= shift({u})) - {u}|", abs(float((t <= shift_time(u, TRAINED_SHIFT)).float().mean()) - u), hi=0.03)


def test_sampling_calls_the_model_at_the_trained_shift(generator):
    generate(generator, _decode, 2, sampler=SamplerConfig(method="euler", steps=4), batch_size=2, progress=False,
             precision="fp32")
    expected = time_grid(4, TRAINED_SHIFT)[:-1]
    assert expected[1] != pytest.approx(0.75) and _times(generator) == pytest.approx(expected, abs=1e-6)
    generator.model.calls.clear()
    samples = generate(generator, _decode, 2, sampler=SamplerConfig(method="euler", steps=4, time_shift=0.7),
                       batch_size=2, progress=False, precision="fp32")
    assert _times(generator) == pytest.approx(time_grid(4, 0.7)[:-1], abs=1e-6)   # --time-shift overrides
    assert samples.settings["time_shift"] == 0.7


def test_bf16_sampling_runs_the_model_under_autocast(generator):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "bf16 is not native here" on CPUs without it: slow, still bf16
        generate(generator, _decode, 2, sampler=SamplerConfig(method="euler", steps=2), batch_size=2,
                 progress=False, precision="bf16")
    assert [c["autocast"] for c in generator.model.calls] == [torch.bfloat16, torch.bfloat16]
    generator.model.calls.clear()
    generate(generator, _decode, 2, sampler=SamplerConfig(method="euler", steps=2), batch_size=2, progress=False,
             precision="fp32")
    assert [c["autocast"] for c in generator.model.calls] == [False, False]


def _gaussian_velocity(m: float, s: float):
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
    x = sample(_gaussian_velocity(m, s), noise, None, cfg, generators=g).flatten()
    within("|sample mean - data mean|", abs(float(x.mean()) - m), hi=0.04)
    within("|sample std - data std|", abs(float(x.std()) - s), hi=0.04)


def test_sample_cli_flags_reach_the_sampler(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(fae.stages, "load_run_generator", lambda path, device: "generator")
    monkeypatch.setattr(fae.sampling, "load_decoder", lambda gen, **kw: "decoder")
    monkeypatch.setattr(fae.sampling, "sample_to_dir", lambda gen, decode, out, n, **kw: seen.update(kw) or {})
    assert main(["sample", "--dit", "d", "--out", str(tmp_path), "--time-shift", "0.25", "--cfg-batch", "separate",
                 "--precision", "bf16", "--guidance", "2.0", "--steps", "7", "--no-progress"]) == 0
    sampler = seen["sampler"]
    assert (sampler.time_shift, sampler.cfg_batch, sampler.steps, seen["precision"]) == (0.25, "separate", 7, "bf16")
    assert sampler.method == "euler"   # --sampler auto with guidance: the paper's ODE


def test_encode_cli_passes_num_workers(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(fae.encoding, "encode_latents", lambda data, out, **kw: seen.update(kw) or Path(out))
    (tmp_path / "data.yaml").write_text("data: {kind: fashion_mnist, split: test, image_size: 16, limit: 4}\n")
    assert main(["encode", "--data", str(tmp_path / "data.yaml"), "--out", str(tmp_path / "c"), "--num-workers", "3",
                 "--no-progress"]) == 0
    assert seen["options"].num_workers == 3


def test_eval_is_command(tmp_path, one_thread):
    weights = tmp_path / "inception.pth"
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    np.savez(tmp_path / "samples.npz", images.permute(0, 2, 3, 1).numpy())
    # a random Inception often predicts one class for all four noise images (IS 1.0000x for some seeds): take the
    # first draw whose IS is clearly above 1, so that the split and the resize change the score
    net = FIDInceptionV3(resize="tf1")
    for draw in range(20):
        state = random_inception_state(draw)
        state["fc.weight"] *= 100  # sharper predictions
        net.load_state_dict(state)
        if inception_score(net(images)["logits"], splits=1)[0] > 1.01:
            break
    torch.save(state, weights)
    logits = {}
    for resize in ("tf1", "pytorch"):
        net = FIDInceptionV3(resize=resize)
        net.load_state_dict(state)
        logits[resize] = net(images)["logits"]
    common = ["--samples", str(tmp_path / "samples.npz"), "--inception-weights", str(weights), "--cache-dir",
              str(tmp_path / "cache"), "--no-progress"]

    def run(*args: str) -> dict:
        out = tmp_path / f"report{len(list(tmp_path.glob('report*')))}.json"
        assert main(["eval", *args, *common, "--out", str(out)]) == 0
        return json.loads(out.read_text())["metrics"]

    assert run("is", "--splits", "2")["is"] == pytest.approx(inception_score(logits["tf1"], splits=2)[0], rel=1e-5)
    by_size = inception_score(logits["pytorch"], split_size=3)
    assert by_size != pytest.approx(inception_score(logits["pytorch"], splits=2))
    got = run("is", "--split-size", "3", "--network", "inception:pytorch")
    assert (got["is"], got["is_std"]) == pytest.approx(by_size, rel=1e-5)
    assert inception_score(logits["tf1"], splits=1)[0] != pytest.approx(inception_score(logits["pytorch"], splits=1)[0])
    assert inception_score(logits["tf1"], splits=1)[0] > 1.01  # not the constant-prediction IS of 1
    got = run("gen", "--ref", str(tmp_path / "samples.npz"), "--metrics", "is", "--is-split-size", "3")
    assert got["is"] == pytest.approx(inception_score(logits["tf1"], split_size=3)[0], rel=1e-5)
    assert not math.isnan(got["is"])


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


def test_generator_returns_latents_in_the_fae_space(generator):
    # the untrained DiT predicts v = 0 (adaLN-Zero), so x0 is the noise; the generator de-normalises it with the
    # latent statistics its bundle records (mean [0, 1], std [1, 2])
    noise = torch.randn(2, 2, 2, 2)
    z = generator.sample(noise, torch.tensor([0, 1]), SamplerConfig(method="euler", steps=2))
    expected = noise * torch.tensor([1.0, 2.0]).view(1, 2, 1, 1) + torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)

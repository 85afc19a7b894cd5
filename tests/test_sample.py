"""End to end on Fashion-MNIST with tiny parts: `fae encode` -> `fae train dit` (resume, EMA) -> `fae sample`
(outputs, determinism, torchrun split). With a recorded DiT bundle: sampling calls the model at the trained time shift
or at --time-shift, under autocast in bf16, and returns de-normalised latents; the `fae sample` flags reach the sampler."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from margins import within
from recorder import TRAINED_SHIFT, Recorder
from recorder import tiny_dit as _dit
from safetensors.torch import load_file
from seeding import subprocess_env

import fae.sampling
import fae.stages
from fae.cli import main
from fae.config import ConfigError
from fae.data.latents import LatentCache
from fae.generators import DiTGenerator, load_generator
from fae.io import WEIGHTS_NAME, file_sha256, read_bundle_config
from fae.models.dit import DiT
from fae.sampling import generate, image_grid, load_decoder, make_labels
from fae.stages import load_run_generator, load_stage_config, train_stage
from fae.stages.dit import Config, DiTStage
from fae.tokenizers import FAE
from fae.transport import SamplerConfig, TransportConfig, time_grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_latent_world):
    """The shared tiny FAE, pipeline and latent cache (conftest), and a DiT trained on them."""
    w = tiny_latent_world
    root = tmp_path_factory.mktemp("sample")
    cfg = root / "dit.yaml"
    cfg.write_text(f"""
stage: dit
latents: {w['cache']}
model: {{input_size: [4, 4], in_channels: 4, hidden_size: 32, depth: 1, num_heads: 2, num_classes: 10}}
transport: {{time_shift: 0.5}}
optim: {{lr: 1.0e-3}}
train: {{steps: 6, batch_size: 8, checkpoint_every: 3, log_every: 1, ema_decay: 0.9, seed: 1}}
""")
    assert main(["train", "dit", "--config", str(cfg), "--out", str(root / "run"), "--no-progress"]) == 0
    return dict(root=w["root"], fae=w["fae"], pipeline=w["pipeline"], cfg=cfg, run=root / "run")


def test_generator_bundle_records_stats_fae_and_transport(world):
    bundle = world["run"] / "dit"
    record = read_bundle_config(bundle)
    cache = LatentCache(world["root"] / "cache")
    assert record["latent_stats"] == cache.stats()
    assert record["latents"]["fae"] == {"weights_sha256": file_sha256(Path(world["fae"]) / WEIGHTS_NAME)}  # identity, no path
    assert record["latents"]["source"] == "fae" and record["transport"]["time_shift"] == 0.5
    assert record["class_names"][9] == "Ankle boot"
    ema = load_file(str(world["run"] / "checkpoints" / "step_00000006" / "model.ema.safetensors"))
    exported = load_file(str(bundle / "model.safetensors"))
    assert all(torch.equal(ema[k], exported[k]) for k in ema)          # the bundle holds the EMA weights
    raw = load_file(str(world["run"] / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert not torch.equal(raw["final_layer.linear.weight"], ema["final_layer.linear.weight"])
    rows = [json.loads(line) for line in (world["run"] / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"mse", "loss/main", "grad_norm/main"} <= set(rows[0])


def test_resume_gives_the_same_weights(world, tmp_path):
    _, cfg = load_stage_config(world["cfg"])
    train_stage("dit", cfg, tmp_path / "paused", progress=False, stop_at=3)
    assert not (tmp_path / "paused" / "dit").exists()
    train_stage("dit", cfg, tmp_path / "paused", progress=False)
    for name in ("model.safetensors", "model.ema.safetensors"):
        a = load_file(str(world["run"] / "checkpoints" / "step_00000006" / name))
        b = load_file(str(tmp_path / "paused" / "checkpoints" / "step_00000006" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_model_must_match_the_cache(world, tmp_path):
    with pytest.raises(ConfigError, match=r"set model.in_channels=4"):
        _, cfg = load_stage_config(world["cfg"], ["model.in_channels=8"])
        train_stage("dit", cfg, tmp_path / "bad", progress=False)


def _sample(world, out: Path, *extra: str) -> np.lib.npyio.NpzFile:
    args = ["sample", "--dit", str(world["run"]), "--fae", str(world["pipeline"]), "--out", str(out), "-n", "12",
            "--steps", "4", "--batch-size", "5", "--no-progress", *extra]
    assert main(args) == 0
    return np.load(out / "samples.npz")


def test_sample_outputs_and_determinism(world, tmp_path):
    a = _sample(world, tmp_path / "a", "--guidance", "paper")
    assert a["arr_0"].shape == (12, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    assert list(a["labels"]) == [i % 10 for i in range(12)]
    assert (tmp_path / "a" / "grid.png").is_file() and len(list((tmp_path / "a" / "images").glob("*.png"))) == 12
    meta = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert meta["sampler"]["method"] == "euler" and meta["time_shift"] == 0.5
    b = _sample(world, tmp_path / "b", "--guidance", "paper")
    assert np.array_equal(a["arr_0"], b["arr_0"])                     # same seed, same images
    sde = _sample(world, tmp_path / "sde", "--labels", "random", "--seed", "1")  # auto: SDE without guidance
    assert json.loads((tmp_path / "sde" / "samples.json").read_text())["sampler"]["method"] == "euler_maruyama"
    assert sde["labels"].min() >= 0 and sde["labels"].max() < 10 and not np.array_equal(a["arr_0"], sde["arr_0"])


def test_torchrun_two_processes_give_the_same_images(world, tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")

    args = ["sample", "--dit", str(world["run"] / "dit"), "--fae", str(world["pipeline"]), "-n", "11", "--steps", "3",
            "--batch-size", "3", "--guidance", "2.0", "--sampler", "euler_maruyama", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fae.cli"]
    done = subprocess.run(cmd + args + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = np.load(tmp_path / "two" / "samples.npz")["arr_0"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0          # one process, here
    one = np.load(tmp_path / "one" / "samples.npz")["arr_0"]
    assert one.shape == (11, 16, 16, 3) and np.array_equal(one, two)
    assert len(list((tmp_path / "two" / "images").glob("*.png"))) == 11
    assert not list((tmp_path / "two").glob(".part-*"))


def test_unfinished_run_and_decoder_errors(world, tmp_path):
    _, cfg = load_stage_config(world["cfg"])
    train_stage("dit", cfg, tmp_path / "partial", progress=False, stop_at=3)
    with pytest.raises(FileNotFoundError, match="load_run_generator"):
        load_generator(tmp_path / "partial")                            # the sampling layer reads bundles only
    gen = load_run_generator(tmp_path / "partial")                      # newest checkpoint's EMA weights
    ema = load_file(str(tmp_path / "partial" / "checkpoints" / "step_00000003" / "model.ema.safetensors"))
    assert torch.equal(gen.model.state_dict()["final_layer.linear.weight"], ema["final_layer.linear.weight"])
    assert gen.time_shift == 0.5 and isinstance(gen.model, DiT)
    with pytest.raises(ConfigError, match="--pixel-decoder"):
        load_decoder(gen, fae=world["fae"])                             # a stage-1 bundle has no pixel decoder
    with pytest.raises(ConfigError, match="pass the FAE it was trained on"):
        load_decoder(gen)                                               # bundles record the FAE by hash, not by path
    gen.record.latents = dataclasses.replace(gen.record.latents, source="raw_features")
    with pytest.raises(ConfigError, match="raw encoder features"):
        load_decoder(gen)


def test_labels_and_grid():
    assert make_labels("equal", 5, 3, 0).tolist() == [0, 1, 2, 0, 1]
    assert make_labels("2,0", 5, 3, 0).tolist() == [2, 0, 2, 0, 2]
    assert torch.equal(make_labels("random", 50, 3, 4), make_labels("random", 50, 3, 4))
    assert make_labels("equal", 4, 0, 0) is None
    with pytest.raises(ConfigError, match="class ids"):
        make_labels("5", 2, 3, 0)
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    grid = image_grid(images, np.array([0, 1, 0, 1, 0, 1]), ["shirt", "boot"], per_row=3)
    assert grid.height == 2 * 10 + 2 and grid.width > 3 * 10


@pytest.mark.margin
def test_class_agreement_classifier(tmp_path):
    from fae.data import DataConfig, build_dataset
    from fae.io import read_bundle_config
    from fae.metrics.judge import class_agreement, train_classifier

    data = DataConfig(kind="fashion_mnist", image_size=16)
    clf = train_classifier(data, tmp_path / "clf", epochs=3, width=16, train_limit=3000, progress=False)
    record = read_bundle_config(tmp_path / "clf")
    within("judge test accuracy", record["test_accuracy"], lo=0.5)   # far above chance (0.1) on real test images
    again = train_classifier(data, tmp_path / "clf", epochs=3, width=16, train_limit=3000, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(), again.state_dict().values(), strict=True))
    test = build_dataset(DataConfig(kind="fashion_mnist", image_size=16, limit=200), "test")
    images = torch.stack([test[i]["image"] for i in range(200)])
    labels = torch.stack([test[i]["label"] for i in range(200)])
    right = class_agreement(clf, images, labels)
    wrong = class_agreement(clf, (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), (labels + 1) % 10)
    within("class agreement, right labels", right["agreement"], lo=0.5)
    within("class agreement, wrong labels", wrong["agreement"], hi=0.5)
    assert set(right["per_class"]) == set(range(10))


def test_sampling_speaks_only_to_the_generator_interface(tmp_path):
    """Any Generator works with generate / sample_to_dir (STARFlow and MMDiT will): a toy one whose latents encode
    the class id, and a decoder that paints it, come out in order, with its settings and its guidance rule."""
    from fae.generators import Generator, GeneratorRecord
    from fae.sampling import generate, sample_to_dir
    from fae.transport import GuidanceSchedule, SamplerConfig

    class Toy(Generator):
        record, source = GeneratorRecord([0.0, 0.0], [1.0, 1.0], class_names=[f"c{i}" for i in range(3)]), "toy"
        latent_shape, num_classes, supports_guidance = (2, 4, 4), 3, False
        calls = 0

        def sample(self, noise, conditions, sampler, generators=None):
            Toy.calls += 1
            assert noise.shape[1:] == (2, 4, 4) and len(generators) == len(noise)
            return conditions.float().view(-1, 1, 1, 1).expand_as(noise) / 2

        def settings(self, sampler):
            return {"generator": "toy", "steps": sampler.steps}

        def save_pretrained(self, directory):
            return Path(directory)

        def to(self, device):
            return self

    paint = lambda z: z[:, :1].mean((1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 3, 8, 8)  # noqa: E731
    out = generate(Toy(), paint, 7, labels="equal", sampler=SamplerConfig(steps=3), batch_size=3, progress=False)
    assert Toy.calls == 3 and out.images.shape == (7, 8, 8, 3)
    assert out.labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert out.images[:, 0, 0, 0].tolist() == [round(255 * y / 2) for y in out.labels.tolist()]
    assert out.settings["generator"] == "toy" and out.settings["steps"] == 3
    with pytest.raises(ConfigError, match="label dropout"):
        generate(Toy(), paint, 3, sampler=SamplerConfig(guidance=GuidanceSchedule.parse("2.0")), progress=False)
    written = sample_to_dir(Toy(), paint, tmp_path / "toy", 6, sampler=SamplerConfig(steps=2), progress=False)
    assert Path(written["grid"]).is_file() and np.load(written["npz"])["arr_0"].shape == (6, 8, 8, 3)


def test_generation_pipeline_folder_loads_with_one_call_and_checks_the_fae(world, tmp_path):
    """One folder (FAE pipeline + generator bundle) loads with one from_pretrained and samples in one call, the
    same images as the generator and decoder loaded apart; a generator of another FAE's latents is refused."""
    from fae.pipeline import GenerationPipeline
    from fae.sampling import generate
    from fae.transport import SamplerConfig

    pipe = GenerationPipeline.from_parts(world["run"], world["pipeline"])
    folder = pipe.save_pretrained(tmp_path / "pipe")
    again = GenerationPipeline.from_pretrained(folder)
    sampler = SamplerConfig(steps=3)
    ours = again.generate(6, seed=3, sampler=sampler, progress=False)
    apart = generate(load_generator(world["run"]), load_decoder(load_generator(world["run"]), fae=world["pipeline"]),
                     6, seed=3, sampler=sampler, progress=False)
    assert np.array_equal(ours.images, apart.images) and ours.images.shape == (6, 16, 16, 3)
    assert read_bundle_config(folder / "generator")["latent_stats"] == read_bundle_config(world["run"] / "dit")["latent_stats"]

    other = FAE.from_pretrained(world["pipeline"])
    with torch.no_grad():
        next(other.autoencoder.parameters()).add_(1.0)     # another FAE: different weights, same shapes
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="another FAE"):
        GenerationPipeline.from_parts(world["run"], tmp_path / "other")
    with pytest.raises(ConfigError, match="another FAE"):
        load_decoder(load_generator(world["run"]), fae=tmp_path / "other")   # the same check apart

    # `fae sample --pipeline` samples from the folder: the same images as the library call
    assert main(["sample", "--pipeline", str(folder), "-n", "6", "--seed", "3", "--steps", "3", "--sampler", "euler",
                 "--out", str(tmp_path / "cli"), "--no-progress", "--no-pngs"]) == 0
    assert np.array_equal(np.load(tmp_path / "cli" / "samples.npz")["arr_0"], ours.images)


def test_a_generation_pipeline_samples_on_the_device_it_was_loaded_on(world, tmp_path, monkeypatch):
    """from_pretrained(folder, device=...) puts both networks there, and generate() draws its noise and runs every
    network there (on the meta device: shapes only; the images' conversion is where the run is observed)."""
    import fae.sampling
    from fae.io import _parsed_config
    from fae.pipeline import GenerationPipeline
    from fae.transport import SamplerConfig

    folder = GenerationPipeline.from_parts(world["run"], world["pipeline"]).save_pretrained(tmp_path / "pipe")
    _parsed_config.cache_clear()
    pipe = GenerationPipeline.from_pretrained(folder, device="meta")
    configs = {p for p in folder.rglob("config.json") if p.parent.name != "encoder"}   # transformers reads the encoder's
    assert _parsed_config.cache_info().misses == len(configs)       # each config.json parsed once
    assert pipe.device == torch.device("meta") and pipe.generator.device == torch.device("meta")
    assert {p.device.type for p in [*pipe.fae.parameters(), *pipe.generator.model.parameters()]} == {"meta"}
    seen = []
    monkeypatch.setattr(fae.sampling, "to_uint8_hwc", lambda x: seen.append(x.device) or np.zeros((len(x), 16, 16, 3),
                                                                                              np.uint8))
    out = pipe.generate(3, sampler=SamplerConfig(steps=2), progress=False)
    assert seen == [torch.device("meta")] and out.images.shape == (3, 16, 16, 3)


# ---------------------------------------------------------------------------------------------------- the bundle's transport
# a DiT bundle exported with a trained time shift, its model wrapped in a Recorder: the times, batch sizes and
# autocast state it is called with
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


def test_generator_returns_latents_in_the_fae_space(generator):
    # the untrained DiT predicts v = 0 (adaLN-Zero), so x0 is the noise; the generator de-normalises it with the
    # latent statistics its bundle records (mean [0, 1], std [1, 2])
    noise = torch.randn(2, 2, 2, 2)
    z = generator.sample(noise, torch.tensor([0, 1]), SamplerConfig(method="euler", steps=2))
    expected = noise * torch.tensor([1.0, 2.0]).view(1, 2, 1, 1) + torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)

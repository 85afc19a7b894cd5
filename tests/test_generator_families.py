"""A generator family is one unit: a fourth family, defined here and registered through the public registry, trains
with `fae train`, resumes exactly, and samples through `fae sample` and `GenerationPipeline`, with no line of `fae/`
knowing it. The stage module of the family is this test file itself."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from margins import within
from safetensors.torch import load_file
from torch import nn

from fae.cli import main
from fae.config import ConfigError
from fae.data.latents import LatentCache, denormalize, normalize
from fae.generators import (
    BundledGenerator,
    GeneratorFamily,
    families,
    load_generator,
    register_family,
    unregister_family,
)
from fae.io import PretrainedMixin, read_bundle_config
from fae.pipeline import GenerationPipeline
from fae.stages import load_run_generator, load_stage_config, stage_names, train_stage
from fae.stages.generator import GeneratorStage
from fae.training import OptimConfig, TrainConfig
from fae.transport import SamplerConfig


@dataclass
class ToyConfig:
    in_channels: int = 4
    input_size: tuple[int, int] = (4, 4)
    num_classes: int = 10
    class_dropout: float = 0.0


class ToyModel(PretrainedMixin, nn.Module):
    """One learned latent per class (the class-conditional mean): the simplest generator a cache can teach."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.means = nn.Parameter(0.1 * torch.randn(config.num_classes, config.in_channels, *config.input_size))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.means[labels]


class ToyGenerator(BundledGenerator):
    """The class mean plus a little of the starting noise, de-normalised with the bundle's statistics."""

    def sample(self, noise: torch.Tensor, conditions: Any, sampler: SamplerConfig,
               generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        z = self.model(conditions) + 0.01 * noise
        return denormalize(z.float(), self.mean, self.std)


# ----- the stage module's three names: Config, build, components
@dataclass
class Config:
    latents: str
    model: ToyConfig = field(default_factory=ToyConfig)
    hflip: bool = True
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.05, schedule="constant"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=8))


class ToyStage(GeneratorStage):
    family = "toy"

    def loss(self, group: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mse = (self.modules["model"](batch["label"]) - batch["latent"]).pow(2).mean()
        return mse, {"mse": mse.detach()}


def build(cfg: Config) -> ToyStage:
    return ToyStage(cfg)


def components(cfg: Config) -> dict[str, nn.Module]:
    return {"toy": ToyModel(cfg.model)}


@pytest.fixture(scope="module")
def toy(tiny_latent_world, tmp_path_factory):
    family = register_family(GeneratorFamily("toy", ToyModel, ToyGenerator, sys.modules[__name__], "a test family"))
    root = tmp_path_factory.mktemp("toy")
    cfg = root / "toy.yaml"
    cfg.write_text(f"stage: toy\nlatents: {tiny_latent_world['cache']}\n"
                   "train: {steps: 30, batch_size: 8, checkpoint_every: 6, log_every: 1, ema_decay: 0.5, seed: 3}\n")
    trained = main(["train", "toy", "--config", str(cfg), "--out", str(root / "run"), "--no-progress"])
    yield {**tiny_latent_world, "family": family, "cfg": cfg, "root": root, "trained": trained}
    unregister_family("toy")


def test_the_family_joins_the_cli_and_the_stage_list(toy):
    assert "toy" in families() and "toy" in stage_names()
    from fae.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "toy" in sub.choices["train"].format_help() and "toy" in sub.choices["sample"].format_help()


def test_fae_train_trains_the_toy_family_and_exports_its_bundle(toy):
    run = toy["root"] / "run"
    assert toy["trained"] == 0                                        # `fae train toy` (the fixture ran it)
    record = read_bundle_config(run / "toy")
    assert record["class"] == "ToyModel" and record["latents"]["source"] == "fae" and len(record["class_names"]) == 10
    # it learns the class means of the (normalised, plain and flipped) latents: the distance to them shrinks
    cache = LatentCache(toy["cache"])
    z = torch.stack([normalize(cache.row(i, k).float(), cache.mean64.float(), cache.std64.float())
                     for i in range(len(cache)) for k in ("latents", "latents_flip")])
    y = torch.tensor([int(cache.row(i, "labels")) for i in range(len(cache)) for _ in range(2)])
    target = torch.stack([z[y == k].mean(0) for k in range(10)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)                                           # the run's train.seed: its initial weights
        start = ToyModel(ToyConfig()).means.detach()
    trained = load_file(str(run / "checkpoints" / "step_00000030" / "model.safetensors"))["means"]
    within("toy class means: squared distance to the data's after / before 30 steps",
           float((trained - target).pow(2).sum() / (start - target).pow(2).sum()), hi=0.45)
    gen = load_generator(run)
    assert isinstance(gen, ToyGenerator) and gen.latent_shape == (4, 4, 4)


def test_an_interrupted_toy_run_resumes_to_the_same_weights(toy, tmp_path):
    _, cfg = load_stage_config(toy["cfg"])
    train_stage("toy", cfg, tmp_path / "paused", progress=False, stop_at=6)
    gen = load_run_generator(tmp_path / "paused")                     # an unfinished run samples from its EMA
    ema = load_file(str(tmp_path / "paused" / "checkpoints" / "step_00000006" / "model.ema.safetensors"))
    assert isinstance(gen, ToyGenerator) and torch.equal(gen.model.means, ema["means"])
    assert main(["train", "toy", "--config", str(toy["cfg"]), "--out", str(tmp_path / "paused"), "--no-progress"]) == 0
    once = load_file(str(toy["root"] / "run" / "toy" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "paused" / "toy" / "model.safetensors"))
    assert torch.equal(once["means"], resumed["means"])


def test_fae_sample_and_the_generation_pipeline_sample_the_toy_family(toy, tmp_path):
    run = toy["root"] / "run"
    assert main(["sample", "--generator", str(run), "--fae", str(toy["pipeline"]), "--out", str(tmp_path / "s"),
                 "-n", "6", "--no-progress"]) == 0
    cli = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    pipe = GenerationPipeline.from_parts(run, toy["pipeline"])
    folder = pipe.save_pretrained(tmp_path / "pipe")
    out = GenerationPipeline.from_pretrained(folder).generate(6, progress=False)
    assert out.images.shape == (6, 16, 16, 3) and np.array_equal(out.images, cli)
    assert out.pil()[0].size == (16, 16) and out.labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_a_family_name_or_bundle_class_is_taken_once(toy):
    with pytest.raises(ValueError, match="registered already"):
        register_family(GeneratorFamily("toy", nn.Linear, ToyGenerator, "x"))
    with pytest.raises(ValueError, match="already belongs"):
        register_family(GeneratorFamily("other", ToyModel, ToyGenerator, "x"))
    with pytest.raises(ConfigError, match="unknown stage 'nope'.*toy"):
        load_stage_config(None, [], stage="nope")


def test_the_built_in_families_are_registered():
    assert {"dit", "flow", "mmdit"} <= set(families())
    assert Path(families()["dit"].stage_module().__file__).name == "dit.py"

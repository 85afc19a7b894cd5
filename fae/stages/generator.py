"""The base of every latent-generator stage (one per generator family: dit, flow, mmdit, and any registered later):
it opens the latent cache and checks the model config against it, builds the model from `train.seed` alone, serves
the cache as the training set, draws preview samples through the family's Generator and exports the bundle with its
record. A family's stage module keeps only its `Config` (fields `latents`, `model`, `hflip`, `optim`, `train`), its
model and its loss.

`load_run_generator` reads any family's run folder: a finished one through its bundle, an unfinished one through its
newest checkpoint's EMA weights and its config.yaml.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from fae.config import ConfigError, from_dict, read_yaml
from fae.data.labels import check_class_ids
from fae.data.latents import LatentCache, LatentDataset
from fae.generators import Generator, GeneratorFamily, GeneratorRecord, families, family, find_generator_bundle
from fae.generators import load_generator as load_generator_bundle
from fae.stages.preview import class_conditions, generator_sheets
from fae.training import TrainStage, checkpoint_dirs


def check_model_matches_cache(model: Any, cache: LatentCache) -> None:
    """A generator's model config (in_channels, input_size, and num_classes where it has classes) against the
    latents it will train on."""
    if model.in_channels != cache.channels:
        raise ConfigError(f"model.in_channels={model.in_channels} but the latents in {cache.path} have "
                          f"{cache.channels} channels; set model.in_channels={cache.channels}")
    if tuple(model.input_size) != tuple(cache.grid):
        raise ConfigError(f"model.input_size={list(model.input_size)} but the latents in {cache.path} are "
                          f"{list(cache.grid)}; set model.input_size={list(cache.grid)}")
    if getattr(model, "num_classes", cache.num_classes) < cache.num_classes:  # (text models have no classes)
        raise ConfigError(f"model.num_classes={model.num_classes} but the latent cache has {cache.num_classes} "
                          f"classes; set model.num_classes={cache.num_classes}")
    if getattr(model, "num_classes", 0) > 0:  # the labels the model will read, checked once (not per forward)
        check_class_ids(cache.labels(), model.num_classes, f"labels in the latent cache {cache.path}",
                        error=ConfigError)


class GeneratorStage(TrainStage):
    """Train one generator family's model on a latent cache. Subclasses name their `family` and write `loss`; they
    may add `check`, `prepare`, `record_settings`, `preview_conditions` and `train_dataset`."""

    family: ClassVar[str]
    supports_fsdp = True   # train.fsdp: FSDP2 over the transformer blocks

    def __init__(self, cfg: Any) -> None:
        self.cfg, self.optim = cfg, cfg.optim
        self.cache = LatentCache(cfg.latents)
        check_model_matches_cache(cfg.model, self.cache)
        self.check()
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed only
            torch.manual_seed(cfg.train.seed)
            model = self.spec.model(cfg.model)
        self.modules = {"model": self.prepare(model)}

    @property
    def spec(self) -> GeneratorFamily:
        return family(self.family)

    def check(self) -> None:
        """Family-specific checks of the config against the cache (after the shape checks)."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """The freshly built model, before training (MMDiT takes its null condition from the cache here)."""
        return model

    def record_settings(self) -> dict[str, Any]:
        """The family's own blocks in the bundle record (e.g. {"transport": ...})."""
        return {}

    def record(self) -> GeneratorRecord:
        return GeneratorRecord.from_cache(self.cache, **self.record_settings())

    def generator(self, model: nn.Module, source: str, device: str | torch.device) -> Generator:
        return self.spec.generator(model, self.record(), source, device)

    def train_dataset(self) -> Dataset:
        return LatentDataset(self.cache, hflip=self.cfg.hflip and self.cache.manifest["flip"])

    def preview_conditions(self, model: nn.Module, device: torch.device) -> tuple[Any, Sequence[str]]:
        """Conditions for the preview samples and their row names: classes 0, 1, ... by default."""
        return class_conditions(getattr(model.config, "num_classes", 0), self.cache.manifest.get("class_names"),
                                device)

    def preview(self, modules: dict[str, nn.Module], step: int) -> dict[str, torch.Tensor] | None:
        model = modules["model"]
        device = next(model.parameters()).device
        conditions, names = self.preview_conditions(model, device)
        return generator_sheets(self.generator(model, "preview", device), conditions, names)

    def export(self, out_dir: Path, modules: dict[str, nn.Module]) -> None:
        model = modules["model"]
        model.save_pretrained(out_dir / self.spec.folder, extra=self.record().to_json())  # type: ignore[operator]  # a PretrainedMixin model


def generator_stage_config(run: Path) -> tuple[GeneratorFamily, Any]:
    """The family and config of a generator run folder, from its config.yaml: its `stage:` key (runs written
    before fae 0.2 name none: then the first family whose Config reads it without an unknown key)."""
    data = read_yaml(run / "config.yaml")
    named = data.pop("stage", None)
    if named is not None:
        spec = family(named)
        return spec, from_dict(spec.stage_module().Config, data)
    errors = []
    for spec in families().values():
        try:
            return spec, from_dict(spec.stage_module().Config, dict(data))
        except ConfigError as exc:
            errors.append(f"{spec.name}: {exc}")
    raise ConfigError(f"{run}/config.yaml is no generator family's config ({'; '.join(errors)})")


def load_run_generator(path: str | Path, device: str | torch.device = "cpu", step: int | None = None) -> Generator:
    """A generator bundle or finished run folder (fae.generators.load_generator), or an unfinished run folder of any
    generator family: then the newest checkpoint's EMA weights with the run's config.yaml. `step`: that kept
    checkpoint's weights instead (finished runs too: a training curve of samples)."""
    from safetensors.torch import load_file

    run = Path(path)
    ckpts = checkpoint_dirs(run) if run.is_dir() else []
    if step is not None:
        kept = {int(c.name.split("_")[1]): c for c in ckpts}
        if step not in kept:
            raise ConfigError(f"{run} keeps no checkpoint of step {step} (kept: {sorted(kept) or 'none'})")
        ckpts = [kept[step]]
    elif not ckpts or find_generator_bundle(run) is not None:
        return load_generator_bundle(run, device)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is neither a generator bundle nor a generator run folder with checkpoints")
    spec, cfg = generator_stage_config(run)
    stage = spec.stage_module().build(cfg)
    model = stage.modules["model"]
    weights = ckpts[-1] / "model.ema.safetensors"
    if not weights.is_file():
        weights = ckpts[-1] / "model.safetensors"
    model.load_state_dict(load_file(str(weights), device=str(device)))
    return stage.generator(model, str(weights), device)

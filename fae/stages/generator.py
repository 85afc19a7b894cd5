"""The base of every latent-generator stage (one per generator family: dit, flow, mmdit, and any registered later):
it opens the latent cache and checks the model config against it, builds the model from `train.seed` alone, serves
the cache as the training set, draws preview samples through the family's Generator and exports the bundle with its
record. A family's stage module keeps only its `Config` (fields `latents`, `model`, `hflip`, `optim`, `train`,
`init_from`), its model, its loss and its `init_rules` (which tensors a new class count or text width re-initialises).

`load_run_generator` reads any family's run folder: a finished one through its bundle, an unfinished one through its
newest checkpoint's EMA weights and its config.yaml.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from fae import distributed as D
from fae.config import ConfigError, from_dict, read_yaml
from fae.data.labels import check_class_ids
from fae.data.latents import LatentCache, LatentDataset
from fae.evaluation import GeneratorEvalConfig, GeneratorScorer, load_eval_decoder
from fae.generators import Generator, GeneratorFamily, GeneratorRecord, LatentOrigin, families, family, find_generator_bundle
from fae.generators import load_generator as load_generator_bundle
from fae.init_from import InitSource, bundle_source
from fae.io import atomic_write_text, checkpoint_dirs, replace_dir
from fae.stages.preview import class_conditions, generator_sheets
from fae.training import TrainStage


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
        self._scorer: GeneratorScorer | None = None
        self._decode: Any = None
        # a family's Config may hold `eval: GeneratorEvalConfig` (dit, flow and mmdit do); without it: no scoring
        self.eval_cfg: GeneratorEvalConfig = getattr(cfg, "eval", None) or GeneratorEvalConfig()
        self._check_eval(self.eval_cfg)

    @property
    def spec(self) -> GeneratorFamily:
        return family(self.family)

    def _check_eval(self, cfg: GeneratorEvalConfig) -> None:
        try:
            cfg.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        gen = self.generator(self.modules["model"], "check", "cpu")
        if cfg.every and gen.condition_kind == "text":
            raise ConfigError("eval.every scores class-conditional and unconditional generators; a text generator's "
                              "prompts have no judge here yet: set eval.every=0 (previews still decode with "
                              "eval.decoder)")
        if cfg.decoder is not None or cfg.pixel_decoder is not None:   # refuse a wrong decoder before training
            self._decoder_for(gen)

    def _decoder_for(self, gen: Generator) -> Any:
        """The eval config's decoder, loaded once and checked against the cache's record (kind, identity, shape)."""
        if self._decode is None:
            self._decode = load_eval_decoder(gen, self.eval_cfg)
        return self._decode

    def eval_every(self) -> int:
        return int(self.eval_cfg.every)

    def periodic_eval(self, out_dir: Path, modules: dict[str, nn.Module], step: int) -> dict[str, float] | None:
        model = modules["model"]
        device = next(model.parameters()).device
        gen = self.generator(model, f"step {step}", device)
        if self._scorer is None:
            self._scorer = GeneratorScorer(self.eval_cfg, gen.record, device)
        scores = self._scorer.score(gen, self._decoder_for(gen))
        if D.is_main():
            self._record_best(out_dir, model, step, scores)
        return scores

    def _record_best(self, out_dir: Path, model: nn.Module, step: int, scores: dict[str, float]) -> None:
        """<run>/eval_best.json: the step whose FD was lowest so far (a resumed run re-scores later steps the same);
        with eval.keep_best its bundle in <run>/best/."""
        path = out_dir / "eval_best.json"
        metric = next(k for k in scores if k.startswith(("fd_", "fid")))
        best = json.loads(path.read_text()) if path.is_file() else None
        if best is not None and best["step"] < step and best["value"] <= scores[metric]:
            return
        if self.eval_cfg.keep_best:
            tmp = out_dir / ".best.tmp"
            model.save_pretrained(tmp, extra=self.record().to_json())  # type: ignore[operator]  # a PretrainedMixin model
            replace_dir(tmp, out_dir / "best")
        atomic_write_text(path, json.dumps({"step": step, "metric": metric, "value": scores[metric],
                                            "scores": scores, "bundle": "best" if self.eval_cfg.keep_best else None},
                                           indent=2))

    def check(self) -> None:
        """Family-specific checks of the config against the cache (after the shape checks)."""

    def init_bundle(self, path: Path) -> InitSource | None:
        """`init_from`: a bundle of this family (or a finished run folder holding one)."""
        return bundle_source(path, self.spec.folder, [self.spec.bundle_class], "model")

    def check_init_source(self, source: InitSource) -> list[str]:
        """A generator transfers only between latents of one shape (channels x grid): another shape is another
        latent space, and with RoPE a new grid would even load without a shape error (docs/training.md). Another
        tokenizer of the same shape (named in a bundle's record) loads, with a note."""
        model = source.model_config or {}
        their_shape = [model.get("in_channels"), *(model.get("input_size") or [None, None])]
        my_shape = [self.cfg.model.in_channels, *self.cfg.model.input_size]
        if their_shape != my_shape:
            raise ConfigError(f"init_from={source.path}: its latents are {'x'.join(map(str, their_shape))}, this "
                              f"run's {'x'.join(map(str, my_shape))} (channels x height x width): another latent "
                              "space, which a generator cannot start from; train from scratch or encode the new data "
                              "with the source's tokenizer")
        latents = (source.record or {}).get("latents")
        if not latents:   # a checkpoint source: its tokenizer is not recorded beside the weights
            return []
        theirs, ours = LatentOrigin.from_json(latents), LatentOrigin.from_json(self.cache.manifest)
        if (theirs.source, theirs.tokenizer_sha256) == (ours.source, ours.tokenizer_sha256):
            return []

        def named(o: LatentOrigin) -> str:
            return f"{o.tokenizer or o.source} {(o.tokenizer_sha256 or '?')[:12]}"

        return [f"the source learned the latents of {named(theirs)}, this run's cache holds those of {named(ours)}: "
                "the same shape, so the weights load, but they were fitted to another latent space"]

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
        gen = self.generator(model, "preview", device)
        decoded = self.eval_cfg.decoder is not None or self.eval_cfg.pixel_decoder is not None
        return generator_sheets(gen, conditions, names, self._decoder_for(gen) if decoded else None)

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


def evaluate_generator(generator: str | Path, cfg: GeneratorEvalConfig, step: int | None = None,
                       device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """`fae eval generator`: score a generator bundle or run folder of any family (`step`: that kept checkpoint's
    EMA weights) with `GeneratorScorer`, exactly as `eval.every` scores it in training."""
    gen = load_run_generator(generator, device=device, step=step)
    cfg.validate()
    scorer = GeneratorScorer(cfg, gen.record, device)
    return {"generator": str(generator), "step": step,
            **scorer.score(gen, load_eval_decoder(gen, cfg, device), progress)}

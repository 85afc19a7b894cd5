"""The Generator interface, the record every generator bundle carries, and the registry of generator families.

A generator turns starting noise and conditions (class ids, or prompts for a text generator) into latents z (B,C,h,w)
in the latent space its bundle records (de-normalised: the space the FAE decoder reads), with a sampler (step
budget, guidance schedule, ODE or SDE) and per-sample random generators (so any sample can be regenerated alone).

A *family* is one kind of generator as a unit: its network (a `PretrainedMixin` model, whose class name is the
bundle's "class"), its `Generator` class, its training stage (a module with `Config`, `build`, `components`) and its
name, which is both `fae train <name>` and the folder a finished run keeps its bundle in. `register_family` adds one;
nothing else in fae lists the families by hand.

    gen = load_generator("runs/dit")                 # a bundle or a finished run folder, any family
    z = gen.sample(noise, labels, SamplerConfig(steps=50, guidance=GuidanceSchedule.paper()), generators)
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from torch import nn

from fae.config import ConfigError
from fae.data.latents import LatentCache
from fae.io import find_bundle, read_bundle_config
from fae.speed import compile_in_place
from fae.transport import FIXED_STEP_METHODS, SamplerConfig


# ------------------------------------------------------------------------------------------------ the record
@dataclass(frozen=True)
class LatentOrigin:
    """Where a generator's latents came from. The tokenizer (fae.tokenizers) is named by kind and identity (the
    SHA-256 its `identity` gives; for the FAE: of its weights), never by path alone, so a bundle stays valid wherever
    files move; `tokenizer_reference` says how to load it again (a hub id or a folder, maybe moved since) and `cache`
    is provenance only."""

    source: str                          # "fae" (FAE posterior means), "raw_features" (the frozen encoder's) or
    channels: int                        # "tokenizer" (another latent space's, fae.tokenizers)
    grid: tuple[int, ...]
    tokenizer: str | None = None         # the kind: "fae", "sd-vae", ... (None for raw features)
    tokenizer_sha256: str | None = None
    tokenizer_reference: dict[str, Any] | None = None
    image_size: int | None = None        # of the images encoded (a VAE's latent grid depends on it)
    encoder: dict[str, Any] | None = None
    cache: str | None = None

    @property
    def fae_sha256(self) -> str | None:
        return self.tokenizer_sha256 if self.tokenizer == "fae" else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cache": self.cache, "source": self.source, "channels": self.channels,
                               "grid": list(self.grid), "fae": {"weights_sha256": self.fae_sha256} if self.fae_sha256
                               else None, "encoder": self.encoder}
        if self.tokenizer is not None:
            out["tokenizer"] = {"kind": self.tokenizer, "sha256": self.tokenizer_sha256,
                                "reference": self.tokenizer_reference, "image_size": self.image_size}
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LatentOrigin:
        """Also the cache manifest's layout (its "tokenizer", "fae" and "encoder" blocks); bundles and caches written
        before tokenizers were units name only an FAE ("fae": {"weights_sha256"})."""
        source = raw.get("source", "fae")
        tok = raw.get("tokenizer") or {}
        fae_sha = (raw.get("fae") or {}).get("weights_sha256")
        kind = tok.get("kind") or ("fae" if source == "fae" else None)
        return cls(source=source, channels=int(raw["channels"]), grid=tuple(raw["grid"]), tokenizer=kind,
                   tokenizer_sha256=tok.get("sha256") or fae_sha, tokenizer_reference=tok.get("reference"),
                   image_size=tok.get("image_size"), encoder=raw.get("encoder"), cache=raw.get("cache"))


@dataclass
class GeneratorRecord:
    """What a generator bundle's config.json records besides the model's class and config: the latent statistics it
    de-normalises with, the latents' origin, the class names, and the family's own settings (top-level blocks such
    as "transport", "flow" or "text"). Written and read here only."""

    mean: list[float]
    std: list[float]
    latents: LatentOrigin | None = None
    class_names: list[str] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    RESERVED = ("class", "config", "weights_sha256", "latent_stats", "latents", "class_names")

    @classmethod
    def from_cache(cls, cache: LatentCache, **settings: Any) -> GeneratorRecord:
        """The record of a generator trained on `cache`, with the family's `settings` blocks."""
        stats = cache.stats()
        origin = replace(LatentOrigin.from_json(cache.manifest), cache=str(Path(cache.path).resolve()))
        return cls(stats["mean"], stats["std"], origin, cache.manifest.get("class_names"), settings)

    def to_json(self) -> dict[str, Any]:
        return {"latent_stats": {"mean": list(self.mean), "std": list(self.std)},
                "latents": self.latents.to_json() if self.latents else None,
                "class_names": self.class_names, **self.settings}

    @classmethod
    def from_json(cls, raw: dict[str, Any], source: str, hint: str) -> GeneratorRecord:
        if "latent_stats" not in raw:
            raise ConfigError(f"{source}: the generator records no latent statistics; export it with {hint}")
        stats = raw["latent_stats"]
        return cls(stats["mean"], stats["std"], LatentOrigin.from_json(raw["latents"]) if raw.get("latents") else None,
                   raw.get("class_names"), {k: v for k, v in raw.items() if k not in cls.RESERVED})

    @property
    def raw_features(self) -> bool:
        return self.latents is not None and self.latents.source == "raw_features"


RecordLike = GeneratorRecord | dict[str, Any]   # a record, or its config.json layout


# ----------------------------------------------------------------------------------------------- the interface
class Generator(ABC):
    """A trained generative model on latents."""

    record: GeneratorRecord
    source: str                          # where it was loaded from
    device: torch.device

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latents it generates."""

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Number of class labels it is conditioned on (0: unconditional)."""

    @property
    @abstractmethod
    def supports_guidance(self) -> bool:
        """Whether it has an unconditional branch for classifier-free guidance."""

    @property
    def condition_kind(self) -> Literal["class", "text", "none"]:
        """What `sample` takes as conditions: class ids, a list of prompt strings, or None."""
        return "class" if self.num_classes > 0 else "none"

    @abstractmethod
    def sample(self, noise: torch.Tensor, conditions: Any, sampler: SamplerConfig,
               generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Latents (B,C,h,w), de-normalised, from starting `noise` (B,C,h,w) and `conditions`: class ids (B,), B
        prompts for a text generator, or None. Runs under the caller's autocast; returns float32."""

    @property
    def sampler_methods(self) -> tuple[str, ...]:
        """The SamplerConfig methods whose choice (and step count) changes what `sample` does; () when it has one
        fixed pass (a flow's exact inverse). `fae serve` offers only these, so only the fixed-step ones, whose cost
        it can bound before it starts; a velocity model's `sample` takes adaptive dopri5 too."""
        return FIXED_STEP_METHODS

    guide: Generator | None = None       # autoguidance: the model whose velocity replaces the unconditional one

    def set_guide(self, guide: Generator | None) -> None:
        """Autoguidance (Karras et al. 2024): guide this generator with `guide`, a smaller or less-trained model of
        the same family, latent space and conditions (`check_guide`); the sampler's guidance schedule then scales
        v_guide + s (v_self - v_guide) instead of classifier-free guidance. None turns it off."""
        raise ConfigError(f"{self.source}: autoguidance needs a velocity model (dit, mmdit), not a {type(self).__name__}")

    def settings(self, sampler: SamplerConfig) -> dict[str, Any]:
        """What a sampling run records about the generator besides the sampler."""
        return {"generator": self.source}

    def compile_model(self) -> bool:
        """torch.compile, in place, the network `sample` calls at every step (fae.speed); False when compiling
        would not pay (the default)."""
        return False

    @abstractmethod
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the generator bundle (weights + its record); `load_generator` reads it back."""

    @abstractmethod
    def to(self, device: str | torch.device) -> Generator:
        """Move it (in place) to `device`, where `sample` then expects its noise and conditions."""

    @property
    def class_names(self) -> list[str] | None:
        return self.record.class_names


class BundledGenerator(Generator):
    """What every generator of a registered family shares: its model (a `PretrainedMixin` network whose config
    declares `in_channels`, `input_size` and, when class-conditional, `num_classes` and `class_dropout`), its record,
    and the latent statistics it de-normalises with."""

    def __init__(self, model: Any, record: RecordLike, source: str, device: str | torch.device = "cpu") -> None:
        if isinstance(record, dict):  # the config.json layout
            record = GeneratorRecord.from_json(record, source, "its family's `fae train` stage")
        self.model, self.record, self.source = model.to(device).eval(), record, source
        self.device = torch.device(device)
        self.mean = torch.tensor(record.mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(record.std, dtype=torch.float32, device=device)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.model.config
        return (cfg.in_channels, *cfg.input_size)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model.config, "num_classes", 0))

    @property
    def supports_guidance(self) -> bool:
        return self.num_classes > 0 and getattr(self.model.config, "class_dropout", 0) > 0

    def save_pretrained(self, directory: str | Path) -> Path:
        return self.model.save_pretrained(directory, extra=self.record.to_json())

    def to(self, device: str | torch.device) -> BundledGenerator:
        self.device = torch.device(device)
        self.model.to(self.device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return self

    def compile_model(self) -> bool:
        compile_in_place(self.model)  # its forward is the velocity of every sampling step
        return True


def check_guide(main: Generator, guide: Generator) -> None:
    """Refuse a guide whose velocities do not live where `main`'s do: another family, latent space (tokenizer kind
    and the SHA-256 of its weights, latent shape, the latent statistics both normalise with) or conditions (class
    count, text encoder and width). The message names every difference."""
    def origin(g: Generator) -> tuple[Any, ...]:
        o = g.record.latents
        return (o.source, o.tokenizer, o.tokenizer_sha256) if o else (None, None, None)

    def text(g: Generator) -> tuple[Any, ...]:
        width = getattr(getattr(getattr(g, "model", None), "config", None), "text_dim", None)
        return (g.condition_kind, width, (g.record.settings.get("text") or {}).get("encoder"))

    checks = [("family", type(main).__name__, type(guide).__name__),
              ("latent origin (source, tokenizer, weights SHA-256)", origin(main), origin(guide)),
              ("latent shape", tuple(main.latent_shape), tuple(guide.latent_shape)),
              ("latent statistics (mean, std)", (main.record.mean, main.record.std),
               (guide.record.mean, guide.record.std)),
              ("class count", main.num_classes, guide.num_classes),
              ("conditions (kind, text width, text encoder)", text(main), text(guide))]
    differ = [f"{what}: {a} vs {b}" for what, a, b in checks if a != b]
    if differ:
        raise ConfigError(f"guidance model {guide.source} cannot guide {main.source}: they differ in "
                          + "; ".join(differ) + " (autoguidance needs the same latent space and conditions)")


# ------------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class GeneratorFamily:
    """One kind of generator, as a unit. `name` is `fae train <name>` and the folder a finished run keeps its bundle
    in; `model`'s class name is the bundle's "class"; `stage` is the training stage's module (or its import path):
    it defines `Config`, `build(cfg)` and `components(cfg)` (fae.stages.generator has a base for them)."""

    name: str
    model: type[nn.Module]
    generator: type[BundledGenerator]
    stage: str | ModuleType
    description: str = ""

    @property
    def bundle_class(self) -> str:
        return self.model.__name__

    @property
    def folder(self) -> str:
        return self.name

    def stage_module(self) -> ModuleType:
        return self.stage if isinstance(self.stage, ModuleType) else importlib.import_module(self.stage)

    def load(self, bundle: Path, device: str | torch.device = "cpu") -> Generator:
        record = GeneratorRecord.from_json(read_bundle_config(bundle), str(bundle), f"`fae train {self.name}`")
        model = self.model.from_pretrained(bundle, map_location=device)  # type: ignore[attr-defined]  # a PretrainedMixin model
        return self.generator(model, record, str(bundle), device)


_FAMILIES: dict[str, GeneratorFamily] = {}


def register_family(family: GeneratorFamily) -> GeneratorFamily:
    """Add a generator family (`fae train`, `fae sample`, `load_generator` and the pipelines then know it). A name or
    bundle class already taken by another family is refused."""
    for other in _FAMILIES.values():
        if other.name != family.name and other.bundle_class == family.bundle_class:
            raise ValueError(f"bundle class {family.bundle_class!r} already belongs to family {other.name!r}")
    known = _FAMILIES.get(family.name)
    if known is not None and known != family:
        raise ValueError(f"a generator family named {family.name!r} is registered already")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    _FAMILIES.pop(name, None)


def families() -> dict[str, GeneratorFamily]:
    """The registered families by name, built-in ones first."""
    return dict(_FAMILIES)


def family(name: str) -> GeneratorFamily:
    if name not in _FAMILIES:
        raise ConfigError(f"unknown generator family {name!r}; choose one of: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def family_of_bundle(bundle: Path) -> GeneratorFamily:
    cls = read_bundle_config(bundle).get("class")
    for f in _FAMILIES.values():
        if f.bundle_class == cls:
            return f
    raise ConfigError(f"{bundle}: a {cls} bundle is no generator family's ({', '.join(_FAMILIES)})")


def find_generator_bundle(path: Path) -> Path | None:
    """`path` when it is a generator bundle of a registered family, else its `<family>/` bundle (a finished run)."""
    return find_bundle(path, [f.folder for f in _FAMILIES.values()],
                       classes=[f.bundle_class for f in _FAMILIES.values()])


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """A generator bundle (e.g. `<run>/dit`, `<run>/flow`) or a finished run folder holding one, of any registered
    family. (An unfinished run folder: `fae.stages.load_run_generator`, which knows the stages' checkpoints.)"""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"generator {path}: no such folder")
    bundle = find_generator_bundle(path)
    if bundle is None:
        raise FileNotFoundError(f"{path} holds no generator bundle of the families {', '.join(_FAMILIES)} (an "
                                "unfinished run? `fae sample` and fae.stages.load_run_generator read its newest "
                                "checkpoint)")
    return family_of_bundle(bundle).load(bundle, device)

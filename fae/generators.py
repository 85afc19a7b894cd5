"""The Generator interface: what sampling, evaluation, the CLI and the demo speak to.

A generator turns starting noise and conditions (class labels now, prompts with MMDiT) into latents z (B,C,h,w) in
the FAE latent space (de-normalised: the space the FAE decoder reads), with a sampler (step budget, guidance
schedule, ODE or SDE) and per-sample random generators (so any sample can be regenerated alone). Its bundle
records everything it needs: the latent statistics it was trained with, its transport settings, its class names
(or text encoder), and where its latents came from. DiT, MMDiT and STARFlow (`FlowGenerator`) implement it.
`condition_kind` says what `sample` takes: class ids, or a list of prompt strings (MMDiT).

    gen = load_generator("runs/dit")                 # a bundle or a finished run folder
    z = gen.sample(noise, labels, SamplerConfig(steps=50, guidance=GuidanceSchedule.paper()), generators)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from fae.config import ConfigError
from fae.data.labels import check_class_ids
from fae.data.latents import denormalize
from fae.encoders.text import TextEncoder, TextEncoderConfig
from fae.io import find_bundle, read_bundle_config
from fae.models.dit import DiT
from fae.models.mmdit import MMDiT, TextCondition
from fae.models.starflow import StarFlow
from fae.speed import compile_in_place
from fae.transport import GuidedVelocity, SamplerConfig, sample


class Generator(ABC):
    """A trained generative model on FAE latents."""

    record: dict[str, Any]              # what its bundle's config.json records
    source: str                         # where it was loaded from

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
    def sample(self, noise: torch.Tensor, conditions: torch.Tensor | Sequence[str] | None, sampler: SamplerConfig,
               generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Latents (B,C,h,w), de-normalised, from starting `noise` (B,C,h,w) and `conditions`: class ids (B,), B
        prompts for a text generator, or None. Runs under the caller's autocast; returns float32."""

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

    @property
    def class_names(self) -> list[str] | None:
        return self.record.get("class_names")


class BundledGenerator(Generator):
    """What every generator loaded from a bundle shares: its model, its record, the latent statistics it
    de-normalises with, and the shape and classes its model config declares."""

    export_hint = "`fae train dit`"

    def __init__(self, model: Any, record: dict[str, Any], source: str, device: str | torch.device = "cpu") -> None:
        if "latent_stats" not in record:
            raise ConfigError(f"{source}: the generator records no latent statistics; export it with {self.export_hint}")
        stats = record["latent_stats"]
        self.model, self.record, self.source = model.to(device).eval(), record, source
        self.mean = torch.tensor(stats["mean"], dtype=torch.float32, device=device)
        self.std = torch.tensor(stats["std"], dtype=torch.float32, device=device)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.model.config
        return (cfg.in_channels, *cfg.input_size)

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    @property
    def supports_guidance(self) -> bool:
        return self.num_classes > 0 and self.model.config.class_dropout > 0

    def save_pretrained(self, directory: str | Path) -> Path:
        return self.model.save_pretrained(directory, extra={k: v for k, v in self.record.items()
                                                            if k not in ("class", "config")})

    def compile_model(self) -> bool:
        compile_in_place(self.model)  # its forward is the velocity of every sampling step
        return True


class DiTGenerator(BundledGenerator):
    """A DiT/SiT/LightningDiT velocity model, integrated with fae.transport, with classifier-free guidance."""

    def __init__(self, model: DiT, record: dict[str, Any], source: str, device: str | torch.device = "cpu") -> None:
        super().__init__(model, record, source, device)
        self.time_shift = float(record.get("transport", {}).get("time_shift", 1.0))

    def sample(self, noise: torch.Tensor, conditions: torch.Tensor | None, sampler: SamplerConfig,
               generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        if isinstance(conditions, torch.Tensor):  # once per call, not once per step inside the model
            check_class_ids(conditions, self.num_classes, "class ids", null_ok=True)
        velocity = GuidedVelocity(self.model, sampler.guidance, batch=sampler.cfg_batch)
        x0 = sample(velocity, noise, conditions, sampler, time_shift=self.time_shift, generators=generators)
        return denormalize(x0.float(), self.mean, self.std)

    def settings(self, sampler: SamplerConfig) -> dict[str, Any]:
        return {"generator": self.source,
                "time_shift": sampler.time_shift if sampler.time_shift is not None else self.time_shift}


class MMDiTGenerator(DiTGenerator):
    """A text-conditional MMDiT: prompts are encoded by the text encoder its latent cache was built with (loaded on
    first use, or given), and guidance runs against the empty prompt, the model's null condition."""

    def __init__(self, model: MMDiT, record: dict[str, Any], source: str, device: str | torch.device = "cpu",
                 text_encoder: TextEncoder | None = None) -> None:
        super().__init__(model, record, source, device)  # type: ignore[arg-type]
        self.device, self._text_encoder = device, text_encoder
        self._prompts: dict[str, TextCondition] = {}  # sampling asks for the same prompts chunk after chunk

    @property
    def num_classes(self) -> int:
        return 0

    @property
    def supports_guidance(self) -> bool:
        return self.model.config.caption_dropout > 0

    @property
    def condition_kind(self) -> Literal["class", "text", "none"]:
        return "text"

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text_encoder is None:
            reference = (self.record.get("text") or {}).get("encoder")
            if reference is None:
                raise ConfigError(f"{self.source}: the generator records no text encoder")
            self._text_encoder = TextEncoder.from_config(TextEncoderConfig.from_reference(reference)).to(self.device)
        return self._text_encoder

    @text_encoder.setter
    def text_encoder(self, encoder: TextEncoder) -> None:
        self._text_encoder, self._prompts = encoder, {}

    def encode_prompts(self, prompts: Sequence[str]) -> TextCondition:
        new = sorted(set(prompts) - set(self._prompts))
        if new:
            out = self.text_encoder.encode(new)
            rows = TextCondition(out["text_tokens"], out["text_mask"], out["text_pooled"]).to(self.device)
            self._prompts.update({p: rows.select([i]) for i, p in enumerate(new)})
        parts = [self._prompts[p] for p in prompts]
        return TextCondition(*(torch.cat([getattr(r, k) for r in parts]) for k in ("tokens", "mask", "pooled")))

    def sample(self, noise: torch.Tensor, conditions: torch.Tensor | Sequence[str] | None, sampler: SamplerConfig,
               generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        if conditions is not None and not isinstance(conditions, TextCondition):
            if isinstance(conditions, (str, torch.Tensor)) or len(conditions) != noise.shape[0]:
                raise ValueError(f"a text generator takes a list of {noise.shape[0]} prompts, one per sample")
            conditions = self.encode_prompts(conditions)
        return super().sample(noise, conditions, sampler, generators)  # type: ignore[arg-type]


# bundle class (config.json "class") -> how to load it; STARFlow adds itself here
GENERATOR_BUNDLES: dict[str, tuple[type, type[Generator]]] = {"DiT": (DiT, DiTGenerator),
                                                              "MMDiT": (MMDiT, MMDiTGenerator)}


class FlowGenerator(BundledGenerator):
    """A STARFlow normalizing flow: the exact inverse token by token with a KV cache, flow guidance on the
    sampler's guidance schedule (token i of T at t = 1 - (i + 1) / T; fae.models.starflow), then STARFlow's
    score-based denoising step (`SamplerConfig.flow_denoise`) with the noise level it was trained at. The
    sampler's step budget and ODE/SDE method do not apply: a flow has one exact pass."""

    export_hint = "`fae train flow`"

    def __init__(self, model: StarFlow, record: dict[str, Any], source: str, device: str | torch.device = "cpu") -> None:
        if "flow" not in record:
            raise ConfigError(f"{source}: the flow bundle records no latent statistics or noise level; export it "
                              "with `fae train flow`")
        super().__init__(model, record, source, device)
        self.noise_std = float(record["flow"]["noise_std"])

    def sample(self, noise: torch.Tensor, conditions: torch.Tensor | Sequence[str] | None, sampler: SamplerConfig,
               generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        if conditions is not None and not isinstance(conditions, torch.Tensor):
            raise ValueError("a class-conditional flow takes class ids (B,), not prompts")
        if conditions is not None:
            check_class_ids(conditions, self.num_classes, "class ids", null_ok=True)
        guided = sampler.guidance.active and conditions is not None
        x = self.model.inverse(noise.float(), conditions, sampler.guidance.scale_at if guided else None)
        if sampler.flow_denoise and self.noise_std > 0:
            x = self.model.denoise(x, conditions, self.noise_std)
        return denormalize(x.float(), self.mean, self.std)

    def compile_model(self) -> bool:
        return False  # sampling runs the inverse, layer by layer over a growing KV cache, not the compiled forward

    def settings(self, sampler: SamplerConfig) -> dict[str, Any]:
        return {"generator": self.source, "noise_std": self.noise_std,
                "denoised": bool(sampler.flow_denoise and self.noise_std > 0)}


GENERATOR_BUNDLES["StarFlow"] = (StarFlow, FlowGenerator)
GENERATOR_FOLDERS = ["dit", "mmdit", "flow"]  # where a finished run keeps its generator bundle


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """A generator bundle (e.g. `<run>/dit`, `<run>/flow`) or a finished run folder holding one. (An unfinished `fae train dit`
    run folder: `fae.stages.dit.load_run_generator`, which knows the stage's checkpoints.)"""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"generator {path}: no such folder")
    bundle = find_bundle(path, GENERATOR_FOLDERS, classes=list(GENERATOR_BUNDLES))
    if bundle is None:
        raise FileNotFoundError(f"{path} holds no generator bundle (an unfinished run? `fae sample` and "
                                "fae.stages.dit.load_run_generator read its newest checkpoint)")
    record = read_bundle_config(bundle)
    model_class, generator_class = GENERATOR_BUNDLES[record["class"]]
    return generator_class(model_class.from_pretrained(bundle, map_location=device), record, str(bundle), device)

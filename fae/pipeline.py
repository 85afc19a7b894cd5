"""`GenerationPipeline`: conditions -> images from one folder. In fae "pipeline" means this and only this.

    pipe = GenerationPipeline.from_pretrained("runs/demo/pipeline", device="cuda")
    out = pipe.generate(20, labels=[3, 7], sampler=SamplerConfig(steps=25, guidance=GuidanceSchedule.paper()))
    out.images        # (20, H, W, 3) uint8 numpy; out.pil() -> PIL images; out.labels -> class ids

The folder holds `tokenizer/` (the latent space, any kind of fae.tokenizers: for the FAE its bundle with frozen-encoder
reference, FAE and pixel decoder, and a copy of a small encoder; folders written before 0.2 call it `fae_pipeline/`) and
`generator/` (the generator bundle of any registered family, with its latent statistics and the identity of the
tokenizer it was trained on, checked on load). Nothing in it names a path relative to the working directory: the folder
can be copied to another machine (docs/encoders.md, "portable bundles").
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fae.config import ConfigError
from fae.generators import Generator, load_generator
from fae.io import CONFIG_NAME, atomic_write_text, read_bundle_config
from fae.sampling import Samples, check_trained_on, generate
from fae.speed import CompileMode
from fae.tokenizers import FAE, TOKENIZER_FOLDERS, Tokenizer, load_tokenizer
from fae.transport import SamplerConfig


class GenerationPipeline:
    """A generator and the tokenizer (for the paper: the FAE with its pixel decoder) whose latents it learned, on
    one device."""

    def __init__(self, tokenizer: Tokenizer, generator: Generator, device: str | torch.device | None = None) -> None:
        if isinstance(tokenizer, FAE) and tokenizer.pixel_decoder is None:
            raise ConfigError("a generation pipeline needs an FAE bundle with its pixel decoder (the pixel-decoder "
                              "fine-tune run's tokenizer/)")
        check_trained_on(generator, tokenizer)
        self.tokenizer, self.generator, self.device = tokenizer, generator, generator.device
        if device is not None:
            self.to(device)

    @property
    def fae(self) -> Tokenizer:
        """The tokenizer, by its name from before tokenizers were units."""
        return self.tokenizer

    def to(self, device: str | torch.device) -> GenerationPipeline:
        """Move both networks; later `generate` calls draw their noise and run there."""
        self.device = torch.device(device)
        self.tokenizer.to(self.device)
        self.generator.to(self.device)
        return self

    @classmethod
    def from_parts(cls, generator: str | Path, tokenizer: str | Path | dict[str, Any],
                   device: str | torch.device = "cpu") -> GenerationPipeline:
        """A generator bundle or run folder (any family) and the tokenizer of its latents: what `--tokenizer` names
        (fae.tokenizers.load_tokenizer), e.g. the pixel-decoder fine-tune run holding the FAE with its pixel decoder."""
        return cls(load_tokenizer(tokenizer, device=device), load_generator(generator, device), device)

    @classmethod
    def assemble(cls, generator: str | Path, fae: str | Path | None = None, pixel_decoder: str | Path | None = None,
                 tokenizer: str | Path | dict[str, Any] | None = None, device: str | torch.device = "cpu"
                 ) -> GenerationPipeline:
        """What `fae pipeline` names: a finished generator run or bundle, and its latents' tokenizer as `fae sample`
        takes it (`fae`: the pixel-decoder fine-tune run, or a stage-1 run plus `pixel_decoder`; `tokenizer`: any
        kind; neither: the reference the generator's bundle records). Checked like every pipeline."""
        gen = load_generator(generator, device)
        if fae is not None:
            return cls(FAE.load(fae, pixel_decoder, map_location=device), gen, device)
        spec = tokenizer if tokenizer is not None else (gen.record.latents.tokenizer_reference if gen.record.latents
                                                        else None)
        if spec is None:
            raise ConfigError(f"{generator} records no tokenizer: pass --fae <pixel-decoder fine-tune run> or "
                              "--tokenizer <spec>")
        return cls(load_tokenizer(spec, device=device), gen, device)

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory / TOKENIZER_FOLDERS[0])
        self.generator.save_pretrained(directory / "generator")
        atomic_write_text(directory / CONFIG_NAME, json.dumps({"class": type(self).__name__}, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> GenerationPipeline:
        directory = Path(directory)
        if read_bundle_config(directory).get("class") != cls.__name__:
            raise ConfigError(f"{directory} is not a {cls.__name__} folder")
        folder = next((directory / n for n in TOKENIZER_FOLDERS if (directory / n).is_dir()), None)
        if folder is None:
            raise FileNotFoundError(f"{directory}: the pipeline folder holds no {TOKENIZER_FOLDERS[0]}/")
        return cls.from_parts(directory / "generator", folder, device)

    def generate(self, num_samples: int, *, seed: int = 0, labels: str | Sequence[int] = "equal",
                 prompts: Sequence[str] | None = None, sampler: SamplerConfig | None = None, batch_size: int = 64,
                 precision: str = "auto", compile: CompileMode = "auto", progress: bool = True,
                 resume_dir: str | Path | None = None) -> Samples:
        """`num_samples` images on the pipeline's device (fae.sampling.generate): sample i's noise from (seed, i);
        `labels` equal | random | class ids, or `prompts` for a text generator; `sampler` (steps, guidance, method;
        default: SamplerConfig()); `precision` auto | fp32 | bf16; `compile` auto | on | off (generator and
        decoders); `resume_dir` keeps finished chunks so an interrupted call resumes."""
        self.tokenizer.compile_networks(compile, self.device)
        return generate(self.generator, self.tokenizer.decode, num_samples, seed=seed, labels=labels,
                        sampler=sampler, batch_size=batch_size, device=self.device, progress=progress,
                        precision=precision, prompts=prompts, resume_dir=resume_dir, compile=compile)

"""`GenerationPipeline`: conditions -> images from one folder. In fae "pipeline" means this and only this.

    pipe = GenerationPipeline.from_pretrained("runs/demo/pipeline", device="cuda")
    out = pipe.generate(20, labels=[3, 7], sampler=SamplerConfig(steps=25, guidance=GuidanceSchedule.paper()))
    out.images        # (20, H, W, 3) uint8 numpy; out.pil() -> PIL images; out.labels -> class ids

The folder holds `tokenizer/` (the FAE bundle: frozen-encoder reference, FAE, pixel decoder; folders written before
0.2 call it `fae_pipeline/`) and `generator/` (the generator bundle of any registered family, with its latent
statistics and the SHA-256 of the FAE weights it was trained on, checked on load).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from fae.config import ConfigError
from fae.generators import Generator, load_generator
from fae.io import CONFIG_NAME, atomic_write_text, find_bundle, read_bundle_config
from fae.sampling import Samples, check_trained_on, generate
from fae.speed import CompileMode
from fae.tokenizers import FAE, TOKENIZER_FOLDERS
from fae.transport import SamplerConfig


class GenerationPipeline:
    """A generator and the FAE (with pixel decoder) whose latents it learned, on one device."""

    def __init__(self, fae: FAE, generator: Generator, device: str | torch.device | None = None) -> None:
        if fae.pixel_decoder is None:
            raise ConfigError("a generation pipeline needs an FAE bundle with its pixel decoder (the pixel-decoder "
                              "fine-tune run's tokenizer/)")
        check_trained_on(generator, fae)
        self.fae, self.generator, self.device = fae, generator, generator.device
        if device is not None:
            self.to(device)

    def to(self, device: str | torch.device) -> GenerationPipeline:
        """Move both networks; later `generate` calls draw their noise and run there."""
        self.device = torch.device(device)
        self.fae.to(self.device)
        self.generator.to(self.device)
        return self

    @classmethod
    def from_parts(cls, generator: str | Path, fae: str | Path, device: str | torch.device = "cpu"
                   ) -> GenerationPipeline:
        """A generator bundle or run folder (any family) and the FAE bundle with pixel decoder (or the run holding
        it) of its latents."""
        bundle = find_bundle(Path(fae), TOKENIZER_FOLDERS, classes=["FAE"])
        if bundle is None:
            raise FileNotFoundError(f"{fae}: no FAE bundle with a pixel decoder (tokenizer/, written by the "
                                    "pixel-decoder fine-tune stage) here")
        return cls(FAE.from_pretrained(bundle, map_location=device), load_generator(generator, device), device)

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.fae.save_pretrained(directory / TOKENIZER_FOLDERS[0])
        self.generator.save_pretrained(directory / "generator")
        atomic_write_text(directory / CONFIG_NAME, json.dumps({"class": type(self).__name__}, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> GenerationPipeline:
        directory = Path(directory)
        if read_bundle_config(directory).get("class") != cls.__name__:
            raise ConfigError(f"{directory} is not a {cls.__name__} folder")
        return cls.from_parts(directory / "generator", directory, device)

    def generate(self, num_samples: int, *, seed: int = 0, labels: str | Sequence[int] = "equal",
                 prompts: Sequence[str] | None = None, sampler: SamplerConfig | None = None, batch_size: int = 64,
                 precision: str = "auto", compile: CompileMode = "auto", progress: bool = True,
                 resume_dir: str | Path | None = None) -> Samples:
        """`num_samples` images on the pipeline's device (fae.sampling.generate): sample i's noise from (seed, i);
        `labels` equal | random | class ids, or `prompts` for a text generator; `sampler` (steps, guidance, method;
        default: SamplerConfig()); `precision` auto | fp32 | bf16; `compile` auto | on | off (generator and
        decoders); `resume_dir` keeps finished chunks so an interrupted call resumes."""
        self.fae.compile_networks(compile, self.device)
        return generate(self.generator, self.fae.decode_to_pixels, num_samples, seed=seed, labels=labels,
                        sampler=sampler, batch_size=batch_size, device=self.device, progress=progress,
                        precision=precision, prompts=prompts, resume_dir=resume_dir, compile=compile)

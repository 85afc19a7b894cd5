"""fae: Feature Auto-Encoders (arXiv 2512.07829) — a frozen encoder, a one-attention-layer latent, and generators on it.

The public surface, loaded on first use (`import fae` itself imports no torch):

    pipe = fae.GenerationPipeline.from_pretrained("runs/demo/pipeline", device="cpu")   # conditions -> images
    out = pipe.generate(20, sampler=fae.SamplerConfig(steps=25, guidance=fae.GuidanceSchedule.paper()))
    out.images, out.pil(), out.labels                                                   # numpy, PIL, class ids

    tok = fae.FAE.load("runs/demo/pixel-decoder-ft")       # images <-> latents (frozen encoder + FAE + pixel decoder)
    gen = fae.load_generator("runs/demo/dit")              # any registered generator family's bundle or run
    samples = fae.generate(gen, tok.decode_to_pixels, 16)  # the same, from the parts
    vae = fae.load_tokenizer("sd-vae:stabilityai/sd-vae-ft-ema")   # any latent space as a unit (docs/tokenizers.md)

Train: `train_stage(name, cfg, out_dir)` with `load_stage_config(path)`; encode a data set into a latent cache:
`encode_latents`; evaluate: `evaluate_generation`, `evaluate_reconstruction`, `fid`. A new generator family:
`register_family(GeneratorFamily(...))` (fae.generators.base); a new latent space:
`register_tokenizer(TokenizerKind(...))` (fae.tokenizers.base). The command line (`fae --help`) calls the same
functions.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_SURFACE: dict[str, str] = {
    "FAE": "fae.tokenizers", "Tokenizer": "fae.tokenizers", "TokenizerKind": "fae.tokenizers",
    "load_tokenizer": "fae.tokenizers", "register_tokenizer": "fae.tokenizers", "tokenizer_kinds": "fae.tokenizers",
    "evaluate_tokenizers": "fae.evaluation",
    "GenerationPipeline": "fae.pipeline",
    "Samples": "fae.sampling", "generate": "fae.sampling", "sample_to_dir": "fae.sampling",
    "write_samples": "fae.sampling", "load_decoder": "fae.sampling",
    "SamplerConfig": "fae.transport", "GuidanceSchedule": "fae.transport",
    "Generator": "fae.generators", "GeneratorFamily": "fae.generators", "GeneratorRecord": "fae.generators",
    "load_generator": "fae.generators", "register_family": "fae.generators", "families": "fae.generators",
    "load_run_generator": "fae.stages", "train_stage": "fae.stages", "load_stage_config": "fae.stages",
    "encode_latents": "fae.encoding", "EncodeOptions": "fae.encoding",
    "evaluate_generation": "fae.metrics", "evaluate_reconstruction": "fae.metrics", "fid": "fae.metrics",
    "FrozenEncoder": "fae.encoders", "EncoderConfig": "fae.encoders",
    "DataConfig": "fae.data", "build_dataset": "fae.data",
    "ConfigError": "fae.config",
}

__all__ = ["__version__", *_SURFACE]


def __getattr__(name: str) -> Any:
    if name in _SURFACE:
        value = getattr(importlib.import_module(_SURFACE[name]), name)
        globals()[name] = value   # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'fae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SURFACE))

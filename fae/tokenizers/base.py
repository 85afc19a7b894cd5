"""The Tokenizer interface (a latent space as one unit) and the registry of tokenizer kinds.

A tokenizer turns images (B,3,H,W) in [0,1] into latents (B,C,h,w) and back. `fae encode --tokenizer` caches its
latents, the generator stages train on them, and a generator bundle records the tokenizer by *identity* (the
SHA-256 its `identity` gives: of the weights that make the latents) and by *reference* (how to load it again: a
kind and a hub id or folder), so sampling can reload it and refuses a different one.

A *kind* is one implementation: `fae` (the paper's, fae.tokenizers.fae), `sd-vae`, `va-vae`, `rae`, `dc-ae`
(fae.tokenizers.baselines, through the diffusers classes that hold them). `register_tokenizer` adds one; nothing
else in fae lists them by hand. What a user names on the command line (`--tokenizer`), `load_tokenizer` reads:

    load_tokenizer("sd-vae:stabilityai/sd-vae-ft-ema")   # <kind>:<hub id or folder>
    load_tokenizer("runs/demo/pixel-decoder-ft")          # a folder one registered kind recognises
    load_tokenizer(generator.record.latents.tokenizer_reference)   # the reference a bundle recorded
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fae.config import ConfigError


class Tokenizer(ABC):
    """A latent space: images in [0,1] <-> latents. Inference only: every call runs without gradients."""

    kind: str                        # the registry name of its kind (each implementation sets it)
    device: torch.device

    @abstractmethod
    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of `image_size` x `image_size` images."""

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B,3,H,W) in [0,1] -> latents (B,C,h,w), deterministic (a posterior's mean), float32."""

    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, std) of the posterior; std is None for a deterministic tokenizer. The cache's `store_std`."""
        return self.encode(images), None

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B,C,h,w) -> images (B,3,H,W) in [0,1], float32."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """SHA-256 (hex) of what makes the latents: generator bundles record it and sampling checks it."""

    @abstractmethod
    def reference(self) -> dict[str, Any]:
        """JSON: {"kind": ..., "path": hub id or folder, ...}; `load_tokenizer(reference)` builds it again."""

    @abstractmethod
    def to(self, device: str | torch.device) -> Tokenizer:
        """Move it (in place)."""

    @abstractmethod
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write it as a folder that `load_tokenizer(directory)` reads (a generation pipeline's `tokenizer/`)."""

    def compile_networks(self, mode: str = "on", device: torch.device | str | None = None) -> bool:
        """torch.compile its decoder in place when `mode` says so (fae.speed); False where it does not pay."""
        return False

    def describe(self) -> str:
        return f"{self.kind} tokenizer ({self.reference().get('path', '?')})"


# ------------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class TokenizerKind:
    """One tokenizer implementation as a unit. `load(path, device)` builds it from what follows `<name>:` on the
    command line or a reference's "path" (a hub id or a folder) with the reference's other keys as options;
    `recognises(folder)` says whether a bare folder is one of its own (tried in registration order)."""

    name: str
    load: Callable[..., Tokenizer]
    recognises: Callable[[Path], bool]
    description: str = ""


_KINDS: dict[str, TokenizerKind] = {}


def register_tokenizer(kind: TokenizerKind) -> TokenizerKind:
    known = _KINDS.get(kind.name)
    if known is not None and known != kind:
        raise ValueError(f"a tokenizer kind named {kind.name!r} is registered already")
    _KINDS[kind.name] = kind
    return kind


def unregister_tokenizer(name: str) -> None:
    _KINDS.pop(name, None)


def tokenizer_kinds() -> dict[str, TokenizerKind]:
    """The registered kinds by name, built-in ones first."""
    _load_builtin()
    return dict(_KINDS)


def _load_builtin() -> None:
    import importlib

    for module in ("fae.tokenizers.fae", "fae.tokenizers.baselines"):  # each registers its kinds; fae first
        importlib.import_module(module)


def _kind(name: str) -> TokenizerKind:
    kinds = tokenizer_kinds()
    if name not in kinds:
        raise ConfigError(f"unknown tokenizer kind {name!r}; choose one of: {', '.join(kinds)}")
    return kinds[name]


def parse_tokenizer_spec(spec: str | Path | dict[str, Any]) -> dict[str, Any] | Path:
    """A reference dict, `<kind>:<hub id or folder>` as a reference, or a bare folder as a Path."""
    if isinstance(spec, dict):
        if "kind" not in spec:
            raise ConfigError(f"tokenizer reference {spec} names no kind")
        return spec
    text = str(spec)
    head, sep, rest = text.partition(":")
    if sep and head in tokenizer_kinds() and rest:
        return {"kind": head, "path": rest}
    return Path(text)


def load_tokenizer(spec: str | Path | dict[str, Any], device: str | torch.device = "cpu") -> Tokenizer:
    """What `--tokenizer` names (module docstring), on `device`. Bad specs raise ConfigError naming the kinds."""
    parsed = parse_tokenizer_spec(spec)
    if isinstance(parsed, dict):
        options = {k: v for k, v in parsed.items() if k not in ("kind", "path")}
        return _kind(parsed["kind"]).load(parsed.get("path"), device=device, **options)
    if not parsed.exists():
        raise ConfigError(f"tokenizer {spec}: no such folder; name a folder, or <kind>:<hub id or folder> with kind "
                          f"one of {', '.join(tokenizer_kinds())}")
    for kind in tokenizer_kinds().values():
        if kind.recognises(parsed):
            return kind.load(str(parsed), device=device)
    raise ConfigError(f"{parsed}: no tokenizer kind recognises this folder ({', '.join(tokenizer_kinds())}); "
                      "name the kind: --tokenizer <kind>:<folder>")


def check_tokenizer(tokenizer: Tokenizer, kind: str | None, identity: str | None, shape: tuple[int, ...] | None,
                    image_size: int | None, what: str) -> None:
    """Refuse a tokenizer of another kind, another latent shape or other weights (identity) than `what` records:
    latents decoded by the wrong tokenizer look like images and are wrong. The shape is compared where the record
    names the image size, and always for an FAE (its grid does not depend on the image size; records of FAE latents
    name none)."""
    if kind is not None and tokenizer.kind != kind:
        raise ConfigError(f"{what} holds {kind} latents; the tokenizer given is a {tokenizer.kind} tokenizer")
    if shape is not None and (image_size is not None or tokenizer.kind == "fae"):
        made = tuple(tokenizer.latent_shape(image_size or 0))
        if made != tuple(shape):
            raise ConfigError(f"{what} holds {tuple(shape)} latents; the {tokenizer.kind} tokenizer makes {made}"
                              + (f" from {image_size}-px images" if image_size else ""))
    if identity and tokenizer.identity != identity:
        raise ConfigError(f"{what} was trained on the latents of another {tokenizer.kind.upper()} (its identity, the "
                          f"SHA-256 of the weights that make the latents, {tokenizer.identity[:12]}..., differs from the "
                          f"{identity[:12]}... recorded)")

"""Feature networks: what every distribution metric (FID, sFID, IS, precision/recall, FD-DINOv2) runs images through.

A `FeatureNetwork` has a `name`, a `weights_hash` (both go into reports and feature-cache keys) and
`features(images) -> {"pool": (B, D), "logits": (B, K), "spatial": (B, S)}` with only the entries it supports
(`outputs`). Images are uint8 (B,3,H,W) in [0,255] or float in [0,1]. Two adapters:

* `InceptionNetwork`: the FID Inception-v3 (fae.metrics.inception): pool, logits, spatial. FID, sFID, IS, P/R.
* `EncoderNetwork`: any fae `FrozenEncoder` (DINOv2 for FD-DINOv2, the demo's tiny encoder, SigLIP2, MAE): `pool`
  = the mean of the last-layer patch tokens. Our FrozenEncoder drops the CLS token, so FD-DINOv2 here is on
  mean-pooled patch tokens, not on the CLS token that dgm-eval / Stein et al. (2023) use: numbers are comparable
  across our runs, not with published FD_DINOv2 values.

`build_network("inception" | "inception:pytorch" | "encoder:<folder or hub id>" | "encoder:<kind>:<...>")`.

Names say what was measured (`frechet_name`): a Fréchet distance is "fid" only through the FID Inception; in an
encoder's space it is "fd_encoder" (the in-training `eval/fd_encoder` too), in any other network's "fd_<its name>".
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from fae.config import ConfigError
from fae.io import file_sha256, state_dict_sha256
from fae.metrics.inception import (
    WEIGHTS_SHA256_PREFIX,
    ResizeMode,
    find_inception_weights,
    load_fid_inception,
)
from fae.precision import strict_fp32

FEATURE_KINDS = ("pool", "logits", "spatial")


@runtime_checkable
class FeatureNetwork(Protocol):
    name: str
    weights_hash: str
    outputs: tuple[str, ...]

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def info(self) -> dict[str, Any]: ...


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] or float [0,1] images -> float32 in [0,1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return images.float()


class InceptionNetwork:
    """FID Inception-v3 from the standard weights file (see `fae.metrics.inception`)."""

    outputs: tuple[str, ...] = ("pool", "logits", "spatial")

    def __init__(self, weights: str | Path | None = None, resize: ResizeMode = "tf1",
                 device: str | torch.device = "cpu") -> None:
        path = find_inception_weights(weights)
        self.model = load_fid_inception(path, resize=resize, device=device)
        self.device = torch.device(device)
        self.weights_path = path
        self.weights_hash = file_sha256(path)
        self.standard_weights = self.weights_hash.startswith(WEIGHTS_SHA256_PREFIX)
        self.resize = resize
        self.name = "inception-v3-fid" if resize == "tf1" else "inception-v3-fid-pytorch-resize"

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with strict_fp32():  # no TF32 on Ampere/Hopper: FID statistics must match the ADM reference's
            return self.model(images.to(self.device))

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "weights_hash": self.weights_hash, "weights_file": str(self.weights_path),
                "standard_weights": self.standard_weights, "resize": self.resize, "input_size": 299,
                "outputs": list(self.outputs)}


class EncoderNetwork:
    """A fae FrozenEncoder as a feature network: pool = mean over its patch tokens."""

    outputs: tuple[str, ...] = ("pool",)

    def __init__(self, encoder: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()
        ref = encoder.reference() if hasattr(encoder, "reference") else {}  # type: ignore[operator]  # checked by hasattr
        self.reference = ref
        self.name = f"encoder:{ref.get('kind', type(encoder).__name__)}:{ref.get('name_or_path', '?')}"
        self.weights_hash = state_dict_sha256(encoder)

    @classmethod
    def from_spec(cls, spec: str, device: str | torch.device = "cpu") -> EncoderNetwork:
        """`<folder or hub id>` (kind read from its config.json) or `<kind>:<folder or hub id>`. Runs in fp32, like
        every metric network: a distance must not depend on whether the device has native bf16."""
        from fae.encoders import FrozenEncoder, encoder_config_from_spec

        return cls(FrozenEncoder.from_config(encoder_config_from_spec(spec, precision="fp32")), device)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with strict_fp32():
            tokens = self.encoder(to_unit_float(images).to(self.device))
        return {"pool": tokens.float().mean(dim=1)}

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "weights_hash": self.weights_hash, "encoder": self.reference,
                "pooling": "mean of patch tokens (CLS/registers dropped)", "outputs": list(self.outputs)}


def frechet_name(network: Any, prefix: str = "fd") -> str:
    """The report name of a Fréchet distance through `network`: "fid" ("rfid" with prefix "rfd") for the FID
    Inception, "fd_encoder" ("rfd_encoder") for a frozen encoder, else "fd_<the network's name>"."""
    if isinstance(network, InceptionNetwork) or str(getattr(network, "name", "")).startswith("inception-v3-fid"):
        return {"fd": "fid", "rfd": "rfid"}.get(prefix, f"{prefix}_inception")
    if isinstance(network, EncoderNetwork):
        return f"{prefix}_encoder"
    slug = re.sub(r"[^a-z0-9]+", "_", str(getattr(network, "name", "network")).lower()).strip("_")
    return f"{prefix}_{slug or 'network'}"


def build_network(spec: str = "inception", inception_weights: str | Path | None = None,
                  device: str | torch.device = "cpu") -> FeatureNetwork:
    """A feature network from a short spec (the CLI's --network)."""
    if spec in ("inception", "inception:tf1"):
        return InceptionNetwork(inception_weights, resize="tf1", device=device)
    if spec == "inception:pytorch":
        return InceptionNetwork(inception_weights, resize="pytorch", device=device)
    if spec.startswith("encoder:") and len(spec) > len("encoder:"):
        return EncoderNetwork.from_spec(spec[len("encoder:"):], device=device)
    raise ConfigError(f"--network {spec!r}: expected inception, inception:pytorch or encoder:<model folder>")


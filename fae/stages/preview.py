"""Preview sheets for `train.preview_every` (TrainStage.preview): a few samples of a generator, drawn with few
steps from the same noise at every preview, and reconstructions of a decoder.

Generator stages train on a latent cache, which records its FAE by identity only (no pixel decoder), so their
samples are shown as latent channel images (one row per sample, one column per channel); decode them to pixels
with `fae sample` once a pixel decoder exists.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fae.generators import Generator
from fae.monitoring import image_sheet, latent_sheet
from fae.transport import SamplerConfig, initial_noise, sample_generators

PREVIEW_SAMPLES = 8
PREVIEW_STEPS = 10   # Euler steps: enough to see structure emerge, cheap next to a log interval


def generator_sheets(generator: Generator, conditions: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """{"samples": latent channel sheet} of len(names) samples, noise seeded 0..n-1 (the same at every preview)."""
    count = len(names)
    noise = initial_noise((count, *generator.latent_shape), sample_generators(0, range(count)), generator.device)
    z = generator.sample(noise, conditions, SamplerConfig(method="euler", steps=PREVIEW_STEPS))
    return {"samples": latent_sheet(z, row_names=names)}


def class_conditions(num_classes: int, class_names: Sequence[str] | None, device: torch.device
                     ) -> tuple[torch.Tensor | None, list[str]]:
    """Labels 0, 1, ... (cycling) for PREVIEW_SAMPLES samples and their row names; None for an unconditional model."""
    if num_classes <= 0:
        return None, [f"#{i}" for i in range(PREVIEW_SAMPLES)]
    labels = torch.arange(PREVIEW_SAMPLES, device=device) % num_classes
    names = [class_names[k] if class_names and k < len(class_names) else f"class {k}" for k in labels.tolist()]
    return labels, names


def reconstruction_sheet(images: torch.Tensor, decoded: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"reconstruction": input | decoded, one row per image}."""
    return {"reconstruction": image_sheet({"input": images, "decoded": decoded.float().clamp(0, 1)})}

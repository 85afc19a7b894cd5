"""Preview sheets for `train.preview_every` (TrainStage.preview): a few samples of a generator, drawn with few
steps from the same noise at every preview, and reconstructions of a decoder.

Generator stages train on a latent cache, which records its tokenizer by identity; given its decoder
(`eval.decoder`, or `eval.pixel_decoder` for raw features) their samples are shown as pixels, one column per
sample, from the same noise at every preview (so a cell compares across steps); without one, as latent channel
images (one row per sample, one column per channel).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fae.generators import Generator
from fae.grid import draw_grid, to_uint8_hwc
from fae.monitoring import image_sheet, latent_sheet, picture_tensor
from fae.transport import SamplerConfig, initial_noise, sample_generators

PREVIEW_SAMPLES = 8
PREVIEW_STEPS = 10   # Euler steps: enough to see structure emerge, cheap next to a log interval


def generator_sheets(generator: Generator, conditions: Any, names: Sequence[str],
                     decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{"samples": sheet} of len(names) samples, noise seeded 0..n-1 (the same at every preview): the decoded images
    in one row (a column per sample) with `decode`, else the latent channels."""
    count = len(names)
    noise = initial_noise((count, *generator.latent_shape), sample_generators(0, range(count)), generator.device)
    z = generator.sample(noise, conditions, SamplerConfig(method="euler", steps=PREVIEW_STEPS))
    if decode is None:
        return {"samples": latent_sheet(z, row_names=names)}
    images = decode(z.float()).float().clamp(0, 1).cpu()
    return {"samples": picture_tensor(draw_grid([[to_uint8_hwc(img) for img in images]], column_names=list(names)))}


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

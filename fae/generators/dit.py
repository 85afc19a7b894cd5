"""The DiT family: LightningDiT / SiT velocity models, integrated with fae.transport, with classifier-free guidance."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fae.data.labels import check_class_ids
from fae.data.latents import denormalize
from fae.generators.base import (
    BundledGenerator,
    Generator,
    GeneratorFamily,
    RecordLike,
    check_guide,
    register_family,
)
from fae.models.dit import DiT
from fae.transport import GuidedVelocity, SamplerConfig, sample


class DiTGenerator(BundledGenerator):
    """A flow-matching velocity model; its record's "transport" block holds the time shift it was trained with."""

    def __init__(self, model: Any, record: RecordLike, source: str, device: str | torch.device = "cpu") -> None:
        super().__init__(model, record, source, device)
        self.time_shift = float(self.record.settings.get("transport", {}).get("time_shift", 1.0))

    def sample(self, noise: torch.Tensor, conditions: Any, sampler: SamplerConfig,
               generators: Sequence[torch.Generator] | None = None, info: dict[str, Any] | None = None) -> torch.Tensor:
        """Generator.sample; `info`, when given, receives "nfe", the velocity evaluations per sample (fae.transport)."""
        if isinstance(conditions, torch.Tensor):  # once per call, not once per step inside the model
            check_class_ids(conditions, self.num_classes, "class ids", null_ok=True)
        guide = self.guide.model if isinstance(self.guide, BundledGenerator) else None
        velocity = GuidedVelocity(self.model, sampler.guidance, batch=sampler.cfg_batch, guide=guide)
        x0 = sample(velocity, noise, conditions, sampler, time_shift=self.time_shift, generators=generators,
                    info=info)
        return denormalize(x0.float(), self.mean, self.std)

    def set_guide(self, guide: Generator | None) -> None:
        if guide is not None:
            check_guide(self, guide)
            guide.to(self.device)
        self.guide = guide

    def settings(self, sampler: SamplerConfig) -> dict[str, Any]:
        return {"generator": self.source,
                "time_shift": sampler.time_shift if sampler.time_shift is not None else self.time_shift,
                **({"guidance_model": self.guide.source} if self.guide is not None else {})}


FAMILY = register_family(GeneratorFamily("dit", DiT, DiTGenerator, "fae.stages.dit",
                                         "class-conditional LightningDiT/SiT, flow matching"))

"""The STARFlow family: a normalizing flow sampled by its exact inverse (token by token with a KV cache, or by Jacobi
iteration), flow guidance on the sampler's guidance schedule (token i of T at t = 1 - (i + 1) / T; fae.models.starflow),
then STARFlow's score-based denoising step (`SamplerConfig.flow_denoise`) with the noise level it was trained at. How
the inverse runs (`FlowSampling`: guide_top, annealed guidance, Jacobi, ...) is what the bundle records, with
`SamplerConfig.flow` overriding single keys. The sampler's step budget and ODE/SDE method do not apply: a flow has one
exact pass. Guidance scales are fae's s = 1 + ml-starflow's cfg (`--guidance starflow:<cfg>` takes the latter)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fae.config import ConfigError, from_dict, to_dict
from fae.data.labels import check_class_ids
from fae.data.latents import denormalize
from fae.generators.base import BundledGenerator, GeneratorFamily, RecordLike, register_family
from fae.models.starflow import FlowSampling, StarFlow
from fae.transport import SamplerConfig


class FlowGenerator(BundledGenerator):
    def __init__(self, model: Any, record: RecordLike, source: str, device: str | torch.device = "cpu") -> None:
        super().__init__(model, record, source, device)
        if "flow" not in self.record.settings:
            raise ConfigError(f"{source}: the flow bundle records no noise level; export it with `fae train flow`")
        self.noise_std = float(self.record.settings["flow"]["noise_std"])
        # bundles written before the sampling switches existed record none: the defaults are how they sampled
        self.flow_sampling = self.sampling(self.record.settings["flow"].get("sampling", {}), f"{source}: sampling")

    @staticmethod
    def sampling(raw: dict[str, Any], where: str = "sampling") -> FlowSampling:
        """FlowSampling from a mapping (a bundle's record, or overrides); an unknown key or bad value is a ConfigError."""
        return from_dict(FlowSampling, raw, where)

    def sampling_for(self, sampler: SamplerConfig) -> FlowSampling:
        """The bundle's FlowSampling with the sampler's `flow` overrides."""
        if not sampler.flow:
            return self.flow_sampling
        return self.sampling({**to_dict(self.flow_sampling), **sampler.flow}, "flow sampling")

    def sample(self, noise: torch.Tensor, conditions: Any, sampler: SamplerConfig,
               generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        if conditions is not None and not isinstance(conditions, torch.Tensor):
            raise ValueError("a class-conditional flow takes class ids (B,), not prompts")
        if conditions is not None:
            check_class_ids(conditions, self.num_classes, "class ids", null_ok=True)
        guided = sampler.guidance.active and conditions is not None
        x = self.model.inverse(noise.float(), conditions, sampler.guidance.scale_at if guided else None,
                               sampling=self.sampling_for(sampler))
        if sampler.flow_denoise and self.noise_std > 0:
            x = self.model.denoise(x, conditions, self.noise_std)
        return denormalize(x.float(), self.mean, self.std)

    @property
    def sampler_methods(self) -> tuple[str, ...]:
        return ()   # one exact inverse pass: no ODE/SDE method, no step count

    def compile_model(self) -> bool:
        return False  # sampling runs the inverse, layer by layer over a growing KV cache, not the compiled forward

    def settings(self, sampler: SamplerConfig) -> dict[str, Any]:
        return {"generator": self.source, "noise_std": self.noise_std,
                "denoised": bool(sampler.flow_denoise and self.noise_std > 0),
                "flow_sampling": to_dict(self.sampling_for(sampler))}


FAMILY = register_family(GeneratorFamily("flow", StarFlow, FlowGenerator, "fae.stages.flow",
                                         "STARFlow normalizing flow, exact likelihood"))

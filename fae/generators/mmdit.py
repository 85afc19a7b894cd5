"""The MMDiT family: text-to-image flow matching. Prompts are encoded by the text encoder its latent cache was built
with (loaded on first use, or given), and guidance runs against the empty prompt, the model's null condition."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch

from fae.config import ConfigError
from fae.encoders.text import TextEncoder, TextEncoderConfig
from fae.generators.base import GeneratorFamily, RecordLike, register_family
from fae.generators.dit import DiTGenerator
from fae.models.mmdit import MMDiT, TextCondition
from fae.transport import SamplerConfig


class MMDiTGenerator(DiTGenerator):
    # the most recent prompts whose encodings stay on the device: sampling asks for the same prompts chunk after chunk,
    # while an evaluation over 30K captions (T5-XL: 128 x 2048 floats each) must not keep them all
    prompt_cache_size = 256

    def __init__(self, model: Any, record: RecordLike, source: str, device: str | torch.device = "cpu",
                 text_encoder: TextEncoder | None = None) -> None:
        super().__init__(model, record, source, device)
        self._text_encoder = text_encoder
        self._prompts: OrderedDict[str, TextCondition] = OrderedDict()   # least recently used first

    def to(self, device: str | torch.device) -> MMDiTGenerator:
        super().to(device)
        if self._text_encoder is not None:
            self._text_encoder.to(self.device)
        self._prompts.clear()
        return self

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
            reference = (self.record.settings.get("text") or {}).get("encoder")
            if reference is None:
                raise ConfigError(f"{self.source}: the generator records no text encoder")
            self._text_encoder = TextEncoder.from_config(TextEncoderConfig.from_reference(reference)).to(self.device)
        return self._text_encoder

    @text_encoder.setter
    def text_encoder(self, encoder: TextEncoder) -> None:
        self._text_encoder = encoder
        self._prompts.clear()

    def encode_prompts(self, prompts: Sequence[str]) -> TextCondition:
        new = sorted(set(prompts) - set(self._prompts))
        if new:
            out = self.text_encoder.encode(new)
            rows = TextCondition(out["text_tokens"], out["text_mask"], out["text_pooled"]).to(self.device)
            self._prompts.update({p: rows.select([i]) for i, p in enumerate(new)})
        parts = [self._prompts[p] for p in prompts]
        for p in prompts:
            self._prompts.move_to_end(p)
        while len(self._prompts) > self.prompt_cache_size:
            self._prompts.popitem(last=False)
        return TextCondition(*(torch.cat([getattr(r, k) for r in parts]) for k in ("tokens", "mask", "pooled")))

    def sample(self, noise: torch.Tensor, conditions: Any, sampler: SamplerConfig,
               generators: Sequence[torch.Generator] | None = None, info: dict[str, Any] | None = None) -> torch.Tensor:
        if conditions is not None and not isinstance(conditions, TextCondition):
            if isinstance(conditions, (str, torch.Tensor)) or len(conditions) != noise.shape[0]:
                raise ValueError(f"a text generator takes a list of {noise.shape[0]} prompts, one per sample")
            conditions = self.encode_prompts(conditions)
        return super().sample(noise, conditions, sampler, generators, info)


FAMILY = register_family(GeneratorFamily("mmdit", MMDiT, MMDiTGenerator, "fae.stages.mmdit",
                                         "text-to-image MMDiT on a latent cache with text embeddings"))

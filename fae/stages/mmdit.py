"""Stage 3c: text-to-image MMDiT on a latent cache with text embeddings (`fae encode --text-encoder ...` of a caption
data set), flow matching.

Paper recipe (App. D, MMDiT column; §5.2): MMDiT 603.46M on 16x16x32 latents, T5-XL text, CC12M at 256 px, AdamW
(0.9, 0.999), lr 1e-4 constant, no warmup, batch 512, 1M iterations; interpolant, objective and samplers as the
class-conditional LDM (so time shift 0.4); guidance 1.5 on t in [0, 0.9]. Unstated and chosen here
(docs/text-to-image.md): caption dropout 0.1 to the empty prompt, EMA 0.9999, gradient clipping at 1.0, no flips
(STARFlow's T2I data setting; `hflip: true` flips the latent under the same caption).

The bundle (`<out>/mmdit`) holds the EMA weights with the empty prompt's embedding (the null) as buffers, and in
config.json the latent statistics, the latent cache's FAE and encoder references, the transport settings and the
text encoder's reference, so `fae sample --prompt` needs nothing else.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fae.config import ConfigError, to_dict
from fae.data.latents import TEXT_KEYS, LatentCache
from fae.evaluation import GeneratorEvalConfig
from fae.init_from import InitRule
from fae.models.mmdit import MMDiT, MMDiTConfig, TextCondition
from fae.stages.generator import GeneratorStage
from fae.stages.preview import PREVIEW_SAMPLES
from fae.training import OptimConfig, TrainConfig
from fae.transport import TransportConfig, flow_matching_loss


@dataclass
class Config:
    latents: str                                          # latent cache with text embeddings (`fae encode`)
    model: MMDiTConfig = field(default_factory=MMDiTConfig)
    transport: TransportConfig = field(default_factory=lambda: TransportConfig(time_shift=0.4))
    hflip: bool = True                                    # the flipped latent keeps its caption
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, schedule="constant", grad_clip=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=512, ema_decay=0.9999))
    eval: GeneratorEvalConfig = field(default_factory=GeneratorEvalConfig)   # in-training scores (fae.evaluation)
    init_from: str | None = None                          # a run or bundle of this family: start from its weights


def check_text_matches_cache(model: MMDiTConfig, cache: LatentCache) -> None:
    if not cache.has_text:
        raise ConfigError(f"{cache.path} holds no text embeddings: encode a caption data set with a text encoder "
                          "(fae encode --text-encoder minilm ...)")
    tokens = cache.text_null()["text_tokens"]
    length, dim = tokens.shape[-2:]
    if (model.text_tokens, model.text_dim) != (length, dim):
        raise ConfigError(f"model.text_tokens={model.text_tokens}, model.text_dim={model.text_dim} but the text "
                          f"embeddings in {cache.path} are {length} x {dim}; set model.text_tokens={length} "
                          f"model.text_dim={dim}")


class MMDiTStage(GeneratorStage):
    family = "mmdit"

    def check(self) -> None:
        check_text_matches_cache(self.cfg.model, self.cache)

    def prepare(self, model: nn.Module) -> nn.Module:
        null = self.cache.text_null()
        model.set_null(TextCondition(null["text_tokens"], null["text_mask"], null["text_pooled"]))  # type: ignore[operator]  # an MMDiT
        return model

    def loss(self, group: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # t, noise and caption dropout come from the global RNG, which the trainer seeds at every step
        y = TextCondition(batch["text_tokens"], batch["text_mask"], batch["text_pooled"])
        return flow_matching_loss(self.modules["model"], batch["latent"], y, self.cfg.transport)  # type: ignore[arg-type]  # MMDiT takes a TextCondition

    def record_settings(self) -> dict[str, Any]:
        """The transport settings and the text encoder the embeddings came from."""
        return {"transport": to_dict(self.cfg.transport), "text": self.cache.manifest["text"]}

    def init_rules(self) -> dict[str, list[InitRule]]:
        """Another text width (another text encoder): the two text projections are re-learned, the joint blocks
        kept. The empty prompt's embedding always comes from this run's cache (`prepare`)."""
        return {"model": [InitRule(("context_embedder.*", "pooled_embedder.*"), "text width differs"),
                          InitRule(("null_tokens", "null_mask", "null_pooled"), "this run's empty prompt", always=True)]}

    def preview_conditions(self, model: nn.Module, device: torch.device) -> tuple[Any, Sequence[str]]:
        """The captions of the cache's first rows (their cached text embeddings: no text encoder)."""
        rows = range(min(PREVIEW_SAMPLES, len(self.cache)))
        text = {k: torch.stack([self.cache.row(i, k) for i in rows]).to(device) for k in TEXT_KEYS}
        condition = TextCondition(text["text_tokens"].float(), text["text_mask"], text["text_pooled"].float())
        return condition, [c[:24] for c in self.cache.captions()[: len(rows)]]


def build(cfg: Config) -> MMDiTStage:
    return MMDiTStage(cfg)


def components(cfg: Config) -> dict[str, nn.Module]:
    return {"text-to-image transformer": MMDiT(cfg.model)}

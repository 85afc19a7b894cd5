"""CLIP score of image-caption pairs, with any CLIP-style model transformers loads (hub id or local folder).

    scorer = ClipScorer.load("openai/clip-vit-large-patch14", device="cuda")
    per_pair = scorer.scores(images_uint8_nhwc, captions)          # 100 * max(cos(image, text), 0), one per pair
    mean = float(per_pair.mean())

Definition: the per-pair score is 100 * max(cos(E_I(image), E_T(caption)), 0) with E_I / E_T the model's projected
image and text embeddings (`get_image_features` / `get_text_features`), and the reported CLIP score is its mean over
the pairs. This is the score text-to-image papers report as "CLIP score" (the torchmetrics `CLIPScore` definition);
Hessel et al.'s CLIPScore scales by 2.5 instead of 100. Images go through the model's own image processor (resize
to its input size and normalise, as in training); captions are truncated to the text tower's length.

SigLIP-style models (`model_type` siglip, e.g. google/siglip-so400m-patch14-384 or a fixed-resolution SigLIP2) load
through the same AutoModel path; their text is padded to the full length without an attention mask, as they were
trained. Cosines are comparable within one model only: always report the model (`info()`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fae import distributed as D
from fae.config import ConfigError
from fae.io import state_dict_sha256

SIGLIP_TYPES = ("siglip", "siglip2")   # trained on max-length padding without a mask


def _pooled(out: Any) -> torch.Tensor:
    """transformers 4 returns the projected embedding itself, transformers 5 an output whose pooler_output it is."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """A frozen image-text model, its tokenizer and image processor, and where they came from."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, name_or_path: str,
                 device: str | torch.device = "cpu") -> None:
        # float32 like every metric network (a checkpoint stored in fp16 would otherwise load as fp16)
        self.model = model.float().eval().requires_grad_(False).to(device)
        self.tokenizer, self.image_processor, self.name_or_path = tokenizer, image_processor, name_or_path
        self.device = torch.device(device)
        self.model_type = str(model.config.model_type)
        text_config = getattr(model.config, "text_config", model.config)
        self.max_length = int(text_config.max_position_embeddings)
        self._sha256: str | None = None

    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device = "cpu", revision: str | None = None) -> ClipScorer:
        """A hub id (online, or from the HF cache) or a local folder written by save_pretrained, holding the model,
        its tokenizer and its image processor (what openai/clip-vit-* and google/siglip-* hold)."""
        import transformers

        from fae.encoders.image import _quiet_transformers

        path = Path(name_or_path).expanduser()
        looks_local = path.is_absolute() or name_or_path.startswith(".") or name_or_path.count("/") > 1
        if path.exists():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"CLIP model {path} is not a transformers model folder (config.json is "
                                        "missing); pass a folder written by save_pretrained, or a hub id")
            source = str(path)
        elif looks_local:
            raise FileNotFoundError(f"CLIP model folder {name_or_path} does not exist")
        else:
            source = name_or_path
        try:
            with _quiet_transformers():
                model = transformers.AutoModel.from_pretrained(source, revision=revision)
                tokenizer = transformers.AutoTokenizer.from_pretrained(source, revision=revision)
                image_processor = transformers.AutoImageProcessor.from_pretrained(source, revision=revision)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(
                f"cannot load CLIP model {name_or_path!r} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Offline? Download it once with network (e.g. "
                f"`hf download {name_or_path}`), or save model, tokenizer and image processor with save_pretrained "
                "and pass the folder") from None
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ConfigError(f"{name_or_path} holds a {model.config.model_type!r} model ({type(model).__name__}), "
                              "not an image-text model with get_image_features/get_text_features (CLIP, SigLIP)")
        return cls(model, tokenizer, image_processor, name_or_path, device)

    @property
    def weights_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = state_dict_sha256(self.model)
        return self._sha256

    def info(self) -> dict[str, Any]:
        """What names the model in a report: where it came from, the hub commit (hub loads), the weights' hash."""
        return {"name_or_path": self.name_or_path, "class": type(self.model).__name__, "model_type": self.model_type,
                "hub_commit": getattr(self.model.config, "_commit_hash", None), "weights_sha256": self.weights_sha256,
                "text_max_length": self.max_length}

    @torch.no_grad()
    def embed_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N,H,W,3) uint8 -> (N,D) unit-norm float32 image embeddings."""
        arrays = [np.asarray(img) for img in (images.cpu().numpy() if isinstance(images, torch.Tensor) else images)]
        inputs = self.image_processor(images=arrays, return_tensors="pt").to(self.device)
        return F.normalize(_pooled(self.model.get_image_features(**inputs)).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> (N,D) unit-norm float32 text embeddings (truncated to the text tower's length)."""
        siglip = self.model_type in SIGLIP_TYPES
        batch = self.tokenizer(list(captions), padding="max_length" if siglip else True, truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.device)
        inputs = {"input_ids": batch["input_ids"]}
        if not siglip and "attention_mask" in batch:
            inputs["attention_mask"] = batch["attention_mask"]
        return F.normalize(_pooled(self.model.get_text_features(**inputs)).float(), dim=-1)

    def scores(self, images: Any, captions: Sequence[str], batch_size: int = 50, progress: bool = False) -> np.ndarray:
        """Per-pair CLIP scores, 100 * max(cos, 0), float64 (N,); see `cosines`."""
        return 100.0 * np.clip(self.cosines(images, captions, batch_size, progress), 0.0, None)

    def cosines(self, images: Any, captions: Sequence[str], batch_size: int = 50, progress: bool = False) -> np.ndarray:
        """Per-pair cos(image embedding, text embedding), float64 (N,): `images` (N,H,W,3) uint8, an .npz / folder, or
        an ImageSource (fae.metrics.features; an .npz streams batch by batch), paired in order with `captions`. Under
        torchrun each process embeds a contiguous share of the batches and every process returns all N values."""
        from fae.metrics.features import open_images

        source = open_images(images)
        if source.num_images != len(captions):
            raise ConfigError(f"{source.num_images} images but {len(captions)} captions: CLIP score needs pairs")
        if not captions:
            raise ConfigError("CLIP score of no pairs")
        share = D.shard_of(math.ceil(len(captions) / batch_size))
        starts = [k * batch_size for k in (share if D.is_distributed() else range(len(share)))]
        bar = None
        if progress and D.is_main():
            from tqdm.auto import tqdm

            bar = tqdm(total=len(captions), desc="clip score", unit="img", dynamic_ncols=True)
        parts = []
        batches = source.batches(batch_size, share if D.is_distributed() else None)
        for start, batch in zip(starts, batches, strict=True):   # uint8 (B,3,H,W)
            texts = captions[start:start + batch.shape[0]]
            cos = (self.embed_images(batch.permute(0, 2, 3, 1)) * self.embed_texts(texts)).sum(-1)
            parts.append(cos.double().cpu().numpy())
            if bar is not None:
                bar.update(len(parts[-1]) * D.world_size())
        if bar is not None:
            bar.close()
        gathered = D.all_gather_objects(parts)   # rank order = batch order: the shares are contiguous
        return np.concatenate([p for part in gathered for p in part])

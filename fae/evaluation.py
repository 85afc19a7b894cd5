"""Evaluating latent spaces side by side: every tokenizer's reconstructions of the same held-out images, scored with
the same metrics (fae.metrics.reconstruction), so only the latent space changes.

    scores = evaluate_tokenizers({"fae": "runs/demo/pixel-decoder-ft", "sd-vae": "sd-vae:stabilityai/sd-vae-ft-ema"},
                                 DataConfig(kind="fashion_mnist", image_size=32), limit=1000, out_dir="runs/recon")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fae.config import ConfigError
from fae.data import build_dataset
from fae.data.loading import num_items
from fae.metrics.reconstruction import evaluate_reconstructions
from fae.tokenizers import Tokenizer, load_tokenizer


@torch.no_grad()
def evaluate_tokenizers(tokenizers: dict[str, Any], data: Any, split: str = "test", limit: int | None = 1000,
                        network: Any | None = None, batch_size: int = 250, device: str | torch.device = "cpu",
                        out_dir: str | Path | None = None) -> dict[str, Any]:
    """PSNR, SSIM and (with a `network`, fae.metrics.networks) rFID of decode(encode(images)) for each
    `name -> tokenizer` (a Tokenizer or what `--tokenizer` names) on the first `limit` images of `data` (a DataConfig
    or a Dataset). With `out_dir`: recon.json and recon_grid.png (original | each tokenizer)."""
    if not tokenizers:
        raise ConfigError("nothing to evaluate: name at least one tokenizer")
    loaded = {name: (t if isinstance(t, Tokenizer) else load_tokenizer(t, device=device)).to(device)
              for name, t in tokenizers.items()}
    dataset: Dataset = data if isinstance(data, Dataset) else build_dataset(data, split)
    if limit is not None and num_items(dataset) > limit:
        dataset = torch.utils.data.Subset(dataset, range(limit))
    scores = evaluate_reconstructions(lambda x: {name: t.decode(t.encode(x)) for name, t in loaded.items()}, dataset,
                                      device, network, batch_size, out_dir=out_dir,
                                      inputs={name: t.describe() for name, t in loaded.items()})
    scores["tokenizers"] = {name: {"kind": t.kind, "identity": t.identity} for name, t in loaded.items()}
    return scores

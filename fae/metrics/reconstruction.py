"""Reconstruction evaluation of pixel decoders (`fae eval recon`, and the end of every pixel-decoder run).

For held-out images it compares, side by side, the decoders that matter for the paper's two-stage recipe:

- `gaussian(x)`       the Gaussian embedding decoder on the encoder's own features x (its training input, no noise);
- `gaussian(x_hat)`   the same decoder on the FAE's reconstructed features x_hat = feature_decoder(mode(z));
- `finetuned(x_hat)`  the fine-tuned decoder on x_hat (stage II) — what generation uses.

Metrics per decoder: PSNR and SSIM (fae.metrics.recon) and rFID: the Fréchet distance between the feature
statistics of originals and reconstructions in a pluggable feature space (`fae.metrics.networks`: the frozen
encoder's mean-pooled tokens by default, offline; Inception with a local weights file for the paper's rFID).
Writes `recon.json` and `recon_grid.png` (columns: original | each decoder).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fae.io import atomic_write, atomic_write_text
from fae.models.autoencoder import FeatureAutoEncoder
from fae.models.pixel_decoder import PixelDecoder

FeatureInput = Literal["x", "x_hat"]


@torch.no_grad()
def evaluate_decoders(encoder: Any, dataset: Dataset, decoders: dict[str, tuple[PixelDecoder, FeatureInput]],
                            fae: FeatureAutoEncoder | None = None, network: Any | None = None, batch_size: int = 250,
                            grid_rows: int = 8, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Score each `name -> (decoder, "x" | "x_hat")` on every image of `dataset` (items {"image": (3,H,W)}).

    `network` is a `fae.metrics.networks.FeatureNetwork` for rFID (None = no rFID). With `out_dir`, writes
    recon.json and recon_grid.png there. Returns the scores.
    """
    from fae.metrics.frechet import StatsAccumulator, frechet_distance
    from fae.metrics.recon import PairedAccumulator

    if not decoders:
        raise ValueError("nothing to evaluate: give at least one decoder")
    if fae is None and any(src == "x_hat" for _, src in decoders.values()):
        raise ValueError("decoding x_hat needs the FAE bundle (--fae)")
    device = encoder.mean.device if hasattr(encoder, "mean") else torch.device("cpu")
    for dec, _ in decoders.values():
        dec.eval().to(device)
    if fae is not None:
        fae.eval().to(device)
    paired = {name: PairedAccumulator() for name in decoders}
    seams = {name: SeamAccumulator(dec.config.patch_size) for name, (dec, _) in decoders.items()}
    stats: dict[str, Any] = {}
    grid: dict[str, list[torch.Tensor]] = {"original": [], **{name: [] for name in decoders}}
    t0 = time.time()
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images = batch["image"].to(device).float()
        x = encoder(images).float()
        inputs = {"x": x}
        if fae is not None:
            inputs["x_hat"] = fae.decode(fae.encode(x).mode()).float()
        outputs = {name: dec.decode(inputs[src]).float() for name, (dec, src) in decoders.items()}
        for name, rec in outputs.items():
            if rec.shape != images.shape:
                raise ValueError(f"{name} makes {tuple(rec.shape[1:])} images, the data set has "
                                 f"{tuple(images.shape[1:])}; evaluate at the decoder's image size")
            paired[name].update(images.cpu(), rec.cpu())
            seams[name].update(images, rec)
        if network is not None:
            for name, imgs in {"original": images, **outputs}.items():
                feats = network.features(imgs)["pool"].double().cpu()
                stats.setdefault(name, StatsAccumulator(feats.shape[1])).update(feats)
        have = len(grid["original"])
        if have < grid_rows:
            take = min(grid_rows - have, images.shape[0])
            grid["original"] += list(images[:take].cpu())
            for name, rec in outputs.items():
                grid[name] += list(rec[:take].cpu())
    count = next(iter(paired.values())).n
    scores: dict[str, Any] = {"images": count, "decoders": {}, "seconds": round(time.time() - t0, 2)}
    for name, (_, src) in decoders.items():
        row = {"input": src, **paired[name].summarize(), "seam_ratio": seams[name].ratio()}
        if network is not None and count > 1:
            row["rfid"] = frechet_distance(stats["original"].stats(), stats[name].stats())
        scores["decoders"][name] = row
    if network is not None:
        scores["rfid_network"] = network.info() if hasattr(network, "info") else str(network)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_grid(grid, out_dir / "recon_grid.png")
        scores["grid"] = str(out_dir / "recon_grid.png")
        atomic_write_text(out_dir / "recon.json", json.dumps(scores, indent=2, default=float))
    return scores


class SeamAccumulator:
    """Visible patch grid, as a number: the error of horizontal and vertical pixel differences (reconstruction vs
    original) across patch borders divided by the same error inside patches. ~1.0 = no seams; a per-token head
    that draws patches independently gives > 1."""

    def __init__(self, patch_size: int) -> None:
        self.p = patch_size
        self.border = self.inside = 0.0

    def update(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        for dim in (-1, -2):
            n = originals.shape[dim] - 1
            d_rec = reconstructions.narrow(dim, 1, n) - reconstructions.narrow(dim, 0, n)
            d_org = originals.narrow(dim, 1, n) - originals.narrow(dim, 0, n)
            err = (d_rec - d_org).abs().float().transpose(dim, -1).mean((0, 1, 2)).cpu()  # per neighbour pair
            border = (torch.arange(n) + 1) % self.p == 0
            self.border += err[border].mean().item() if border.any() else 0.0
            self.inside += err[~border].mean().item()

    def ratio(self) -> float:
        return self.border / self.inside if self.inside > 0 else float("nan")


def save_grid(columns: dict[str, list[torch.Tensor]], path: str | Path, min_cell: int = 96) -> Path:
    """One row per image, one labelled column per entry of `columns` (images (3,H,W) in [0,1])."""
    from PIL import Image, ImageDraw

    names = [n for n, imgs in columns.items() if imgs]
    rows = min(len(columns[n]) for n in names)
    h, w = columns[names[0]][0].shape[-2:]
    scale = max(1, -(-min_cell // max(h, w)))  # nearest-neighbour upscaling keeps pixels (and any seams) visible
    ch, cw, pad, header = h * scale, w * scale, 4, 16
    canvas = Image.new("RGB", (len(names) * (cw + pad) + pad, header + rows * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        x0 = pad + c * (cw + pad)
        draw.text((x0, 2), name[: max(4, cw // 6)], fill="black")
        for r in range(rows):
            img = columns[name][r].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(np.ascontiguousarray(img)).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (x0, header + pad + r * (ch + pad)))
    path = Path(path)
    atomic_write(path, lambda p: canvas.save(p, format="PNG"))
    return path


def replace_features(cfg: Any) -> Any:
    """Evaluation reads images only (the encoder runs on them): no feature cache for the held-out split."""
    from dataclasses import replace

    return replace(cfg, features="on_the_fly")


def build_fid_network(kind: str, encoder: Any, inception_weights: str | None = None) -> Any | None:
    """'encoder': the frozen encoder's mean-pooled tokens (offline); 'inception': FID Inception-v3 from a local
    weights file; 'none': no rFID."""
    if kind == "none":
        return None
    from fae.metrics.networks import EncoderNetwork, InceptionNetwork

    device = encoder.mean.device if hasattr(encoder, "mean") else "cpu"
    if kind == "encoder":
        return EncoderNetwork(encoder, device=device)
    if kind == "inception":
        return InceptionNetwork(inception_weights, device=device)
    raise ValueError(f"rFID feature space must be encoder, inception or none, not {kind!r}")

"""Reconstruction evaluation of pixel decoders (`fae eval recon`, and the end of every pixel-decoder run).

For held-out images it compares, side by side, the decoders that matter for the paper's two-stage recipe:

- `gaussian(x)`       the Gaussian embedding decoder on the encoder's own features x (its training input, no noise);
- `gaussian(x_hat)`   the same decoder on the FAE's reconstructed features x_hat = feature_decoder(mode(z));
- `finetuned(x_hat)`  the fine-tuned decoder on x_hat (stage II) — what generation uses.

Metrics per decoder: PSNR and SSIM (fae.metrics.recon) and rFID: the Fréchet distance between the feature
statistics of originals and reconstructions in a pluggable feature space (`fae.metrics.networks`: the frozen
encoder's mean-pooled tokens by default, offline; Inception with a local weights file for the paper's rFID). Its key
names the space: `rfid` only through Inception, `rfd_encoder` in an encoder's space (`recon_fd` reads either, and
the `rfid` that files written before 0.3 hold in any space).
Writes `recon.json` and `recon_grid.png` (columns: original | each decoder).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, Subset

from fae import distributed as D
from fae.data.loading import num_items
from fae.data.readable import readable_batches
from fae.grid import draw_columns
from fae.io import atomic_write, atomic_write_text
from fae.metrics.networks import frechet_name
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
    device = _prepare_models(encoder, decoders, fae)
    return evaluate_reconstructions(lambda images: _reconstruct(encoder, fae, decoders, images), dataset, device,
                                    network, batch_size, grid_rows, out_dir,
                                    patch_sizes={name: dec.config.patch_size for name, (dec, _) in decoders.items()},
                                    inputs={name: src for name, (_, src) in decoders.items()})


@torch.no_grad()
def evaluate_reconstructions(reconstruct: Callable[[torch.Tensor], dict[str, torch.Tensor]], dataset: Dataset,
                             device: torch.device | str = "cpu", network: Any | None = None, batch_size: int = 250,
                             grid_rows: int = 8, out_dir: str | Path | None = None,
                             patch_sizes: dict[str, int] | None = None, inputs: dict[str, str] | None = None
                             ) -> dict[str, Any]:
    """Score every reconstruction `reconstruct(images)` gives ({name: images (B,3,H,W) in [0,1]}, e.g. one per
    tokenizer) against the originals of `dataset`: PSNR, SSIM, rFID in `network`'s space (None: no rFID) and, for the
    names in `patch_sizes`, the seam ratio; `inputs` names what each read (a row's "input"). Under torchrun each
    process scores its share. With `out_dir`, writes recon.json and recon_grid.png (original | each one)."""
    from fae.metrics.frechet import frechet_distance
    from fae.metrics.recon import PairedAccumulator

    dataset = Subset(dataset, D.shard_of(num_items(dataset)))
    paired: dict[str, Any] = {}
    seams = {name: SeamAccumulator(p) for name, p in (patch_sizes or {}).items()}
    stats: dict[str, Any] = {}
    grid: dict[str, list[torch.Tensor]] = {"original": []}
    t0 = time.time()
    for batch in readable_batches(dataset, batch_size):
        images = batch["image"].to(device).float()
        outputs = {name: rec.float() for name, rec in reconstruct(images).items()}
        for name, rec in outputs.items():
            if rec.shape != images.shape:
                raise ValueError(f"{name} makes {tuple(rec.shape[1:])} images, the data set has "
                                 f"{tuple(images.shape[1:])}; evaluate at the decoder's image size")
            paired.setdefault(name, PairedAccumulator()).update(images.cpu(), rec.cpu())
            if name in seams:
                seams[name].update(images, rec)
            grid.setdefault(name, [])
        if network is not None:
            _accumulate_features(network, {"original": images, **outputs}, stats)
        _extend_grid(grid, images, outputs, grid_rows)
    paired, seams, stats = D.merged(paired), D.merged(seams), D.merged(stats)
    count = next(iter(paired.values())).n
    scores: dict[str, Any] = {"images": count, "decoders": {}, "seconds": round(time.time() - t0, 2)}
    for name in paired:
        row = {**({"input": inputs[name]} if inputs and name in inputs else {}), **paired[name].summarize(),
               **({"seam_ratio": seams[name].ratio()} if name in seams else {})}
        if network is not None and count > 1:
            row[frechet_name(network, "rfd")] = frechet_distance(stats["original"].stats(), stats[name].stats())
        scores["decoders"][name] = row
    if network is not None:
        scores["fd_network"] = network.info() if hasattr(network, "info") else str(network)
    if out_dir is not None and D.is_main():   # the grid shows rank 0's share: the first images
        _write_recon(Path(out_dir), grid, scores)
    return scores


def recon_fd(row: dict[str, Any]) -> tuple[str, float] | None:
    """(name, value) of a recon.json row's Fréchet distance: `rfid` (Inception, or any space in older files) or
    `rfd_<network>`; None when the row has none."""
    for key, value in row.items():
        if key == "rfid" or key.startswith("rfd_"):
            return key, float(value)
    return None


def _prepare_models(encoder: Any, decoders: dict[str, tuple[PixelDecoder, FeatureInput]],
                    fae: FeatureAutoEncoder | None) -> torch.device:
    """Check that every decoder's input can be made, and put the decoders and the FAE in eval mode on the
    encoder's device (returned)."""
    if not decoders:
        raise ValueError("nothing to evaluate: give at least one decoder")
    if fae is None and any(src == "x_hat" for _, src in decoders.values()):
        raise ValueError("decoding x_hat needs the FAE bundle (--fae)")
    device = encoder.mean.device if hasattr(encoder, "mean") else torch.device("cpu")
    for dec, _ in decoders.values():
        dec.eval().to(device)
    if fae is not None:
        fae.eval().to(device)
    return device


def _reconstruct(encoder: Any, fae: FeatureAutoEncoder | None, decoders: dict[str, tuple[PixelDecoder, FeatureInput]],
                 images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each decoder's images from its input: the encoder's features x, or the FAE's reconstruction x_hat of them."""
    x = encoder(images).float()
    inputs = {"x": x}
    if fae is not None:
        inputs["x_hat"] = fae.decode(fae.encode(x).mode()).float()
    return {name: dec.decode(inputs[src]).float() for name, (dec, src) in decoders.items()}


def _accumulate_features(network: Any, images: dict[str, torch.Tensor], stats: dict[str, Any]) -> None:
    """Fold `network`'s pooled features of each named set of images into its Frechet statistics in `stats`."""
    from fae.metrics.frechet import StatsAccumulator

    for name, imgs in images.items():
        feats = network.features(imgs)["pool"].double().cpu()
        stats.setdefault(name, StatsAccumulator(feats.shape[1])).update(feats)


def _extend_grid(grid: dict[str, list[torch.Tensor]], images: torch.Tensor, outputs: dict[str, torch.Tensor],
                 grid_rows: int) -> None:
    """Add this batch's first originals and reconstructions to `grid` until it holds `grid_rows` of each."""
    have = len(grid["original"])
    if have < grid_rows:
        take = min(grid_rows - have, images.shape[0])
        grid["original"] += list(images[:take].cpu())
        for name, rec in outputs.items():
            grid[name] += list(rec[:take].cpu())


def _write_recon(out_dir: Path, grid: dict[str, list[torch.Tensor]], scores: dict[str, Any]) -> None:
    """recon_grid.png and recon.json (which names the grid) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_grid(grid, out_dir / "recon_grid.png")
    scores["grid"] = str(out_dir / "recon_grid.png")
    atomic_write_text(out_dir / "recon.json", json.dumps(scores, indent=2, default=float))


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

    def merge(self, other: SeamAccumulator) -> None:
        self.border, self.inside = self.border + other.border, self.inside + other.inside

    def ratio(self) -> float:
        return self.border / self.inside if self.inside > 0 else float("nan")


def save_grid(columns: dict[str, list[torch.Tensor]], path: str | Path, min_cell: int = 96) -> Path:
    """One row per image, one labelled column per entry of `columns` (images (3,H,W) in [0,1])."""
    canvas = draw_columns(columns, pad=4, min_cell=min_cell)
    path = Path(path)
    atomic_write(path, lambda p: canvas.save(p, format="PNG"))
    return path


def replace_features(cfg: Any) -> Any:
    """Evaluation reads images only (the encoder runs on them): no feature cache for the held-out split."""
    from dataclasses import replace

    return replace(cfg, features="on_the_fly")


def build_fid_network(kind: str, encoder: Any, inception_weights: str | None = None) -> Any | None:
    """'encoder': the frozen encoder's mean-pooled tokens (offline); 'none': no rFID; any other
    `fae.metrics.networks.build_network` spec ('inception', 'inception:pytorch', 'encoder:<folder>')."""
    if kind == "none":
        return None
    from fae.metrics.networks import EncoderNetwork, build_network

    device = encoder.mean.device if hasattr(encoder, "mean") else "cpu"
    if kind == "encoder":
        return EncoderNetwork(encoder, device=device)
    return build_network(kind, inception_weights, device=device)


def evaluate_bundles(gaussian: str | Path | None = None, finetuned: str | Path | None = None,
                     fae: str | Path | None = None, data: Any | None = None, split: str = "test", limit: int = 1000,
                     batch_size: int = 250, grid_rows: int = 8, network: str = "encoder",
                     inception_weights: str | None = None, device: str | torch.device = "cpu",
                     out_dir: str | Path | None = None) -> dict[str, Any]:
    """`fae eval recon` as a library call: score a Gaussian decoder (on x, and on x_hat when an FAE is known) and a
    fine-tuned decoder (on x_hat) from their bundles or run folders.

    The FAE defaults to the one the fine-tuned decoder was trained with, the frozen encoder to the one the bundles
    record (all must agree), and `data` (a DataConfig) to the `data` block of the run's config.yaml."""
    from dataclasses import replace

    from fae.config import ConfigError, from_dict, yaml_section
    from fae.data import DataConfig, build_dataset
    from fae.encoders import FrozenEncoder
    from fae.io import check_same_encoder, find_autoencoder_bundle, read_bundle_config, require_bundle

    if gaussian is None and finetuned is None:
        raise ConfigError("reconstruction evaluation: give a Gaussian and/or a fine-tuned decoder")
    bundles = {k: require_bundle(v, "pixel_decoder", classes=["PixelDecoder"])
               for k, v in (("gaussian", gaussian), ("finetuned", finetuned)) if v is not None}
    records = {k: read_bundle_config(b) for k, b in bundles.items()}
    fae_path = fae or records.get("finetuned", {}).get("fae")
    fae_dir = find_autoencoder_bundle(fae_path) if fae_path else None
    if fae_dir is not None:
        bundles["fae"], records["fae"] = fae_dir, read_bundle_config(fae_dir)
    first = next(iter(records))
    for name in records:
        check_same_encoder(records[name].get("encoder"), records[first].get("encoder"), f"the {name} bundle "
                           f"{bundles[name]}", f"the {first} bundle {bundles[first]}")
    encoder = FrozenEncoder.from_reference(records[first]["encoder"]).to(device)

    decoders: dict[str, tuple[PixelDecoder, FeatureInput]] = {}
    if "gaussian" in bundles:
        decoder = PixelDecoder.from_pretrained(bundles["gaussian"])
        decoders["gaussian(x)"] = (decoder, "x")
        if fae_dir is not None:
            decoders["gaussian(x_hat)"] = (decoder, "x_hat")
    if "finetuned" in bundles:
        if fae_dir is None:
            raise ConfigError("the fine-tuned decoder reads x_hat: give the FAE bundle (--fae); its record names none")
        decoders["finetuned(x_hat)"] = (PixelDecoder.from_pretrained(bundles["finetuned"]), "x_hat")
    if data is None:
        run_config = bundles.get("finetuned", bundles.get("gaussian")).parent / "config.yaml"  # type: ignore[union-attr]  # one is given
        if not run_config.is_file():
            raise ConfigError(f"no data given, and the decoder's run config {run_config} is missing")
        data = from_dict(DataConfig, yaml_section(run_config, "data"), "data")
    image_size = next(iter(decoders.values()))[0].config.image_size   # the decoders define the image size
    dataset = build_dataset(replace(data, hflip=False, limit=limit, image_size=image_size), split)
    scores = evaluate_decoders(encoder, dataset, decoders,
                               fae=FeatureAutoEncoder.from_pretrained(fae_dir) if fae_dir is not None else None,
                               network=build_fid_network(network, encoder, inception_weights),
                               batch_size=batch_size, grid_rows=grid_rows, out_dir=out_dir)
    return {"split": split, **scores}

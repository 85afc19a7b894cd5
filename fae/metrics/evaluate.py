"""One call per evaluation: generation metrics (FID, sFID, IS, precision, recall) and reconstruction metrics
(rFID, PSNR, SSIM), each returning an `EvalReport`. Features are extracted once per input and shared by all
metrics (and cached on disk when `cache_dir` is given).

The Fréchet distance is asked for as "fid" (or "fd") and reported under the name of the space it was measured in
(`fae.metrics.networks.frechet_name`): "fid" through the FID Inception, "fd_encoder" in a frozen encoder's space;
likewise "rfid" / "rfd_encoder" for reconstructions.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fae.config import ConfigError
from fae.metrics.features import FolderSource, ImageSource, extract_features, open_images
from fae.metrics.frechet import compute_stats, frechet_distance
from fae.metrics.networks import frechet_name
from fae.metrics.recon import PairedAccumulator
from fae.metrics.reference import Reference, load_reference
from fae.metrics.report import EvalReport
from fae.metrics.scores import inception_score, precision_recall

GENERATION_METRICS = ("fid", "sfid", "is", "precision", "recall")
# the feature each metric needs
NEEDS = {"fid": "pool", "sfid": "spatial", "is": "logits", "precision": "pool", "recall": "pool"}


def _select_metrics(metrics: Sequence[str] | None, network: Any) -> list[str]:
    if metrics is None:  # everything the network supports
        return [m for m in GENERATION_METRICS if NEEDS[m] in network.outputs]
    metrics = ["fid" if m == "fd" else m for m in metrics]   # "fd": the Fréchet distance in any network's space
    unknown = [m for m in metrics if m not in NEEDS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; choose from {list(GENERATION_METRICS)}")
    unsupported = [m for m in metrics if NEEDS[m] not in network.outputs]
    if unsupported:
        raise ConfigError(f"feature network {network.name} cannot give {unsupported} (it has no "
                          f"{sorted({NEEDS[m] for m in unsupported})} features); use --network inception")
    return list(metrics)


FRECHET_DESCRIPTION = "Frechet distance of pool features; float64, Cholesky/eigvalsh route (no sqrtm)"


def evaluate_generation(samples: str | Path | ImageSource | np.ndarray | torch.Tensor,
                        reference: str | Path | ImageSource | Reference, network: Any, *,
                        metrics: Sequence[str] | None = None, num_samples: int | None = None,
                        batch_size: int = 50, cache_dir: str | Path | None = None, is_splits: int = 10,
                        is_split_size: int | None = None, pr_k: int = 3, pr_chunk: int = 4096,
                        device: str | torch.device = "cpu", progress: bool = False) -> EvalReport:
    """FID / sFID / IS / precision / recall of `samples` against `reference` through `network`.

    `reference`: an ADM or fae reference `.npz`, an image folder / `.npz` of images, or a loaded `Reference`.
    `metrics=None` runs every metric the network supports (all five with Inception; FID/P/R with an encoder).
    """
    chosen = _select_metrics(metrics, network)
    fs = extract_features(samples, network, batch_size, cache_dir, num_samples, progress)
    ref = reference if isinstance(reference, Reference) else \
        load_reference(reference, network, batch_size=batch_size, cache_dir=cache_dir, progress=progress)
    values: dict[str, float | int | None] = {}
    notes = list(ref.notes)
    needed = pr_k + 1 if ("precision" in chosen or "recall" in chosen) else 2
    if fs.num_samples < needed:
        raise ConfigError(f"{fs.num_samples} samples are too few for {', '.join(chosen)} (need at least {needed})")
    fd = frechet_name(network)   # "fid" only through the FID Inception
    for name, kind in (("fid", "pool"), ("sfid", "spatial")):
        if name in chosen:
            if kind not in ref.stats:
                raise ConfigError(f"reference {ref.name} has no {kind} statistics for {name}")
            values[fd if name == "fid" else name] = frechet_distance(compute_stats(fs[kind]), ref.stats[kind])
    if "is" in chosen:
        if is_split_size is None and not 1 <= is_splits <= fs.num_samples:
            raise ConfigError(f"the Inception Score needs at least one sample per split: {fs.num_samples} samples, "
                              f"{is_splits} splits (--is-splits)")
        values["is"], values["is_std"] = inception_score(fs["logits"], splits=is_splits, split_size=is_split_size)
    if "precision" in chosen or "recall" in chosen:
        ref_pool = ref.get_features("pool")
        if ref_pool.shape[0] <= pr_k:
            raise ConfigError(f"reference {ref.name} has only {ref_pool.shape[0]} points for k={pr_k} precision/recall")
        precision, recall = precision_recall(ref_pool, fs["pool"], k=pr_k, chunk=pr_chunk, device=device)
        values.update({k: v for k, v in (("precision", precision), ("recall", recall)) if k in chosen})
    if fs.num_samples < 50_000 and ("fid" in chosen or "sfid" in chosen):
        notes.append(f"{fd} from {fs.num_samples} samples: a Fréchet distance is biased upwards at small N; the "
                     "paper protocol uses 50,000")
    described = {
        "fid": FRECHET_DESCRIPTION,
        "sfid": "Frechet distance of spatial features (mixed_6/conv = Mixed_6d.branch1x1, first 7 channels)",
        "is": {"splits": is_splits if is_split_size is None else None, "split_size": is_split_size,
               "logits": "pool @ W^T (no bias), all outputs"},
        "precision": {"k": pr_k, "reference_points": int(ref.features["pool"].shape[0]) if "pool" in ref.features
                      else None, "distance": "squared L2, float32"},
    }
    described["recall"] = described["precision"]
    protocol = {"metrics": [fd if m == "fid" else m for m in chosen], "feature_cache": fs.cached,
                "batch_size": batch_size, **{fd if m == "fid" else m: described[m] for m in chosen
                                             if m != "recall" or "precision" not in chosen}}
    return EvalReport("generation", values, network.info(), fs.num_samples, protocol,
                      {"samples": fs.source, "reference": ref.describe()}, notes)


def fid(samples: Any, reference: Any, network: Any, **kwargs: Any) -> float:
    """FID (or FD in another network's space) of `samples` against `reference`; see `evaluate_generation`."""
    values = evaluate_generation(samples, reference, network, metrics=["fid"], **kwargs).metrics
    return float(values[frechet_name(network)])  # type: ignore[arg-type]  # asked for: never None


def _check_pairing(a: ImageSource, b: ImageSource) -> None:
    if a.num_images != b.num_images:
        raise ConfigError(f"{a.name} has {a.num_images} images but {b.name} has {b.num_images}; originals and "
                          "reconstructions must pair up one to one")
    if isinstance(a, FolderSource) and isinstance(b, FolderSource):
        names_a = [p.relative_to(a.root).with_suffix("") for p in a.files]
        names_b = [p.relative_to(b.root).with_suffix("") for p in b.files]
        for x, y in zip(names_a, names_b, strict=True):
            if x != y:
                raise ConfigError(f"image names do not pair up: {a.root / x} vs {b.root / y}; give the "
                                  "reconstruction of each original the original's file name")


def evaluate_reconstruction(originals: str | Path | ImageSource | np.ndarray | torch.Tensor,
                            reconstructions: str | Path | ImageSource | np.ndarray | torch.Tensor,
                            network: Any | None = None, *, num_samples: int | None = None, batch_size: int = 50,
                            cache_dir: str | Path | None = None, progress: bool = False) -> EvalReport:
    """PSNR and SSIM of aligned pairs, and rFID through `network` when one is given."""
    src_a, src_b = open_images(originals, limit=num_samples), open_images(reconstructions, limit=num_samples)
    _check_pairing(src_a, src_b)
    acc = PairedAccumulator()
    for x, y in zip(src_a.batches(batch_size), src_b.batches(batch_size), strict=True):
        if x.shape != y.shape:
            raise ConfigError(f"image sizes differ: {tuple(x.shape[1:])} in {src_a.name} vs {tuple(y.shape[1:])} "
                              f"in {src_b.name}")
        acc.update(x, y)
    summary = acc.summarize()
    values: dict[str, float | int | None] = {"psnr": summary["psnr"], "ssim": summary["ssim"]}
    notes = []
    if summary["identical_pairs"]:
        notes.append(f"{summary['identical_pairs']} identical pairs: their infinite PSNR is counted as 100 dB")
    info = None
    if network is not None:
        fa = extract_features(src_a, network, batch_size, cache_dir, None, progress)
        fb = extract_features(src_b, network, batch_size, cache_dir, None, progress)
        values[frechet_name(network, "rfd")] = frechet_distance(compute_stats(fa["pool"]), compute_stats(fb["pool"]))
        info = network.info()
    protocol = {"psnr": "per image, data range 1.0, mean over images",
                "ssim": "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, valid region, mean over channels/images"}
    if network is not None:
        protocol[frechet_name(network, "rfd")] = "Frechet distance of pool features: originals vs reconstructions"
    return EvalReport("reconstruction", values, info, int(summary["num_pairs"]), protocol,
                      {"originals": src_a.describe(), "reconstructions": src_b.describe()}, notes)

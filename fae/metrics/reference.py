"""Reference statistics: ADM reference batches and our own, in one `.npz` format.

ADM's reference batches (e.g. `VIRTUAL_imagenet256_labeled.npz`, used by the paper's Table 2 protocol) hold
`mu`, `sigma` (pool_3 statistics of the whole reference set, from the TensorFlow Inception graph), `mu_s`,
`sigma_s` (sFID statistics) and `arr_0`: 10,000 reference images (uint8, N x 256 x 256 x 3) for precision/recall.
`save_reference` writes the same keys, so the ADM TensorFlow evaluator can read our files too, plus
`feat_pool` (the pool features of a random subset, so precision/recall needs no image pass) and `fae_meta`
(JSON: feature network, weights hash, sample count, protocol). Statistics are only reused with the network that
made them: an ADM file's `mu`/`sigma` with our Inception and the standard weights, ours with the same network and
weights hash; otherwise they are recomputed from the stored images (and the report says so).
"""
from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fae import distributed as D
from fae.config import ConfigError
from fae.io import atomic_save_npz, reference_differences
from fae.metrics.features import ImageSource, extract_features, meta_array, open_images, read_npz_meta
from fae.metrics.frechet import GaussianStats, compute_stats

ADM_STATS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


@dataclass
class Reference:
    """What a metric needs from the reference side. Features for precision/recall are extracted on first use."""

    name: str
    stats: dict[str, GaussianStats]       # "pool" / "spatial" -> statistics
    origin: str                           # "adm-npz" | "fae-stats" | "images"
    num_samples: int | None               # images behind the statistics (None: not recorded, as in ADM files)
    network: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    features: dict[str, np.ndarray] = field(default_factory=dict)   # reference features on hand
    loader: Callable[[], dict[str, np.ndarray]] | None = None      # computes `features` when first needed

    def get_features(self, kind: str) -> np.ndarray:
        if kind not in self.features and self.loader is not None:
            self.features = {**self.loader(), **self.features}
            self.loader = None
        if kind not in self.features:
            raise ConfigError(f"reference {self.name} has neither reference images (arr_0) nor {kind} features "
                              "(feat_pool) for precision/recall")
        return self.features[kind]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "origin": self.origin, "num_samples_stats": self.num_samples,
                "num_samples_features": {k: int(v.shape[0]) for k, v in self.features.items()},
                "statistics_by": self.network, "notes": self.notes}


def _stats_compatible(meta: dict[str, Any] | None, network: Any) -> bool:
    info = network.info()
    if meta is None:  # an ADM file: TF-graph Inception statistics
        return info["name"] == "inception-v3-fid" and bool(info.get("standard_weights"))
    made_by = meta.get("network", {})
    if made_by.get("weights_hash") != info["weights_hash"]:
        return False
    if made_by.get("name") == info["name"]:
        return True
    if info["weights_hash"] is None:
        return False
    # a frozen encoder's name holds the folder it was loaded from: the same encoder from another folder (a bundle's
    # copy of it, a moved checkout) with the same pooling makes the same features; "the same encoder" is the rule
    # every bundle and cache check uses (fae.io.reference_differences: by weights hash where both record it)
    mine, theirs = info.get("encoder"), made_by.get("encoder")
    return (isinstance(mine, dict) and isinstance(theirs, dict) and made_by.get("pooling") == info.get("pooling")
            and not reference_differences(mine, theirs))


def _from_images(name: str, source: Any, network: Any, batch_size: int, cache_dir: str | Path | None,
                 limit: int | None, progress: bool, notes: list[str] | None = None) -> Reference:
    fs = extract_features(source, network, batch_size, cache_dir, limit, progress)
    stats = {k: compute_stats(v) for k, v in fs.features.items() if k != "logits"}
    return Reference(name, stats, "images", fs.num_samples, fs.network, notes or [], fs.features)


def load_reference(spec: str | Path | ImageSource, network: Any, *, batch_size: int = 50,
                   cache_dir: str | Path | None = None, limit: int | None = None,
                   progress: bool = False) -> Reference:
    """Reference statistics (+ features for precision/recall) from an ADM/fae reference `.npz`, or from images."""
    path = Path(spec) if isinstance(spec, (str, Path)) else None
    if path is None or path.suffix != ".npz" or not path.is_file():
        source = open_images(spec, limit=limit)
        return _from_images(source.name, source, network, batch_size, cache_dir, None, progress)
    with np.load(path, allow_pickle=False) as data:
        files = set(data.files)
        meta = read_npz_meta(data)
        has_stats = "mu" in files and "sigma" in files
        if has_stats and _stats_compatible(meta, network):
            stats = {kind: GaussianStats(data[m], data[s]) for kind, (m, s) in ADM_STATS_KEYS.items()
                     if m in files and s in files}
            ref = Reference(str(path), stats, "fae-stats" if meta else "adm-npz",
                            meta.get("num_samples") if meta else None,
                            meta.get("network") if meta else {"name": "inception-v3-fid (ADM TensorFlow graph)"})
            if "feat_pool" in files:
                ref.features["pool"] = data["feat_pool"].astype(np.float32)
            elif "arr_0" in files:  # ADM: precision/recall runs on the batch's reference images
                ref.loader = lambda: extract_features(path, network, batch_size, cache_dir, None, progress).features
                ref.notes.append("precision/recall reference: the file's images (arr_0)")
            return ref
    if "arr_0" not in files:
        reason = "its statistics were made by another feature network or weights" if has_stats else \
            "it holds neither statistics (mu, sigma) nor images (arr_0)"
        raise ConfigError(f"{path}: {reason}; make reference statistics for --network {network.name} with "
                          "`fae eval stats`")
    notes = [f"the statistics stored in {path.name} were made by another feature network or weights; recomputed "
             "from its images (arr_0)"] if has_stats else []
    return _from_images(str(path), path, network, batch_size, cache_dir, limit, progress, notes)


def save_reference(path: str | Path, images: str | Path | ImageSource, network: Any, *, keep_images: int = 10_000,
                   keep_features: int = 10_000, seed: int = 0, batch_size: int = 50,
                   cache_dir: str | Path | None = None, limit: int | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """Compute and save reference statistics of an image set in the ADM-compatible format above.

    `keep_images` / `keep_features`: size of the random (seeded) subset stored as `arr_0` / `feat_pool`
    (ADM keeps 10,000 images); 0 stores none. Returns the metadata written to `fae_meta`.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"{path}: reference statistics are written as .npz; give a path ending in .npz")
    source = open_images(images, limit=limit)
    fs = extract_features(source, network, batch_size, cache_dir, None, progress)
    n = fs.num_samples
    arrays: dict[str, np.ndarray] = {}
    for kind, (m, s) in ADM_STATS_KEYS.items():
        if kind in fs.features:
            st = compute_stats(fs.features[kind])
            arrays[m], arrays[s] = st.mu, st.sigma
    order = np.random.default_rng(seed).permutation(n)
    feat_idx = np.sort(order[:min(keep_features, n)])
    if len(feat_idx) and "pool" in fs.features:
        arrays["feat_pool"] = fs.features["pool"][feat_idx].astype(np.float32)
    img_idx = np.sort(order[:min(keep_images, n)])
    if len(img_idx):
        arrays["arr_0"] = _gather_images(source, img_idx, batch_size)
    meta = {"format": "fae-reference-v1 (ADM-compatible keys)", "network": network.info(), "num_samples": n,
            "source": source.describe(), "stats_keys": {k: list(v) for k, v in ADM_STATS_KEYS.items()},
            "subset_seed": seed, "num_images_kept": int(len(img_idx)), "num_features_kept": int(len(feat_idx)),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    arrays["fae_meta"] = meta_array(meta)
    if D.is_main():   # under torchrun every process has the statistics; one writes them
        atomic_save_npz(path, **arrays)
    return meta


def _gather_images(source: ImageSource, indices: np.ndarray, batch_size: int) -> np.ndarray:
    """The images at sorted `indices`, uint8 (K, H, W, 3), collected in one streaming pass."""
    wanted = set(int(i) for i in indices)
    out: list[np.ndarray] = []
    start = 0
    for batch in source.batches(batch_size):
        picks = [i - start for i in range(start, start + batch.shape[0]) if i in wanted]
        if picks:
            out.append(batch[torch.tensor(picks)].permute(0, 2, 3, 1).numpy())
        start += batch.shape[0]
    return np.concatenate(out)

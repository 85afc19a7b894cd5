"""Latent cache: a data set encoded once (frozen encoder + FAE encoder) for training generators. This module is the
cache format and its writer; `fae.encoding.encode_latents` runs the networks into it.

Layout of a cache folder:

    cache.json                 manifest: source, shapes, shards and counts, FAE/encoder references, data signature
    shard-00000.safetensors    "latents" (n,C,h,w), "latents_flip" (latents of the h-flipped images), "labels" (n,)
                               and, with `store_std`, "std" / "std_flip" (the posterior std, to sample at train time)
    stats.safetensors          per-channel "mean" / "std" (float64) and the recipe in its metadata

Caption data sets (fae.data.captions) encoded with a text encoder (`text_fn`) also store, per shard, the captions'
"text_tokens" (n,L,Dt), "text_mask" (n,L), "text_pooled" (n,Dt) and the captions themselves (metadata "captions"),
and `text_null.safetensors` holds the empty prompt's embedding, MMDiT's null condition. One cache, one manifest: the
text encoder's reference goes into cache.json under "text".

Latents are the FAE posterior mean by default. `source="raw_features"` stores the frozen encoder's features
reshaped to (D, h, w) instead (the "diffusion directly on encoder features" baseline of the paper's Table 5), and
`source="tokenizer"` another latent space's (fae.tokenizers: SD-VAE, VA-VAE, RAE, ...), whose kind, identity,
reference and image size the manifest records under "tokenizer".

Statistics are exact and deterministic: two passes in float64 (mean, then the mean squared deviation) over every
stored latent (plain and flipped) in shard order, with NumPy's pairwise summation over fixed 1024-row chunks, so
re-running on the same inputs gives byte-identical statistics. `LatentDataset` opens shards memory-mapped, picks
the flip from the trainer's (index, seed) key and normalises with the stored statistics.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from fae.config import ConfigError
from fae.data import check_index, flip_coin, split_key
from fae.data.features import dataset_signature
from fae.data.readable import item_name
from fae.io import atomic_save_safetensors, atomic_write_text, file_sha256
from fae.precision import DTYPES

CACHE_FORMAT = "fae-latent-cache-v1"
MANIFEST = "cache.json"
STATS = "stats.safetensors"
STATS_RECIPE = ("per-channel mean and population std over every stored latent (plain and flipped) and position, "
                "two passes in float64 (mean, then mean squared deviation), shards in order, NumPy pairwise sums "
                "over 1024-row chunks")
_CHUNK = 1024
TEXT_NULL = "text_null.safetensors"
TEXT_KEYS = ("text_tokens", "text_mask", "text_pooled")

Source = Literal["fae", "raw_features", "tokenizer"]   # "tokenizer": any latent space of fae.tokenizers


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


# ---------------------------------------------------------------------------------------------------- writing
# what the writer is given to encode a batch: (batch, with_flip) -> {"latents", "std"?, "latents_flip"?,
# "std_flip"?}, each (B,C,h,w); and prompts -> {"text_tokens", "text_mask", "text_pooled"}
LatentFn = Callable[[dict[str, torch.Tensor], bool], dict[str, torch.Tensor]]
TextFn = Callable[[list[str]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class CacheLayout:
    """How a cache stores its rows: what the latents are, whether flips and posterior stds are kept, and the dtypes."""

    source: Source = "fae"
    flip: bool = True
    store_std: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    text_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class CachedFeatureRows(Dataset):
    """Items {"features", "features_flip"?, "label"} from a feature cache (fae.data.features) of `base`."""

    def __init__(self, base: Dataset, cache: Any, flips: bool) -> None:
        self.base, self.cache, self.flips = base, cache, flips
        self.class_names = getattr(base, "class_names", None)
        self.num_classes = getattr(base, "num_classes", 0)

    def __len__(self) -> int:
        return len(self.cache)

    def _label(self, index: int) -> Any:
        labels, samples = getattr(self.base, "labels", None), getattr(self.base, "samples", None)
        if isinstance(labels, torch.Tensor):      # FashionMNIST
            return labels[index]
        if isinstance(samples, list):             # ImageFolderDataset: (path, label); no image decoding
            return samples[index][1]
        return self.base[index]["label"]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        if not self.cache.present(index):  # unreadable when the cache was built: dropped
            return None
        label = self._label(index)
        item = {"features": self.cache.get(index), "label": torch.as_tensor(label, dtype=torch.long)}
        if self.flips:
            item["features_flip"] = self.cache.get(index, flipped=True)
        return item

    def signature(self) -> dict[str, Any]:
        return dataset_signature(self.base)


class ShardWriter:
    """The rows of one shard as they are encoded, and its atomic write."""

    def __init__(self, out: Path, index: int, items: range, opts: CacheLayout) -> None:
        self.path, self.index, self.items, self.opts = out / shard_name(index), index, items, opts
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.kept: list[int] = []
        self.captions: list[str] = []

    def _append(self, key: str, value: torch.Tensor) -> None:
        self.parts.setdefault(key, []).append(value.cpu())

    def add(self, batch: dict[str, Any], latent_fn: LatentFn, device: torch.device | str, dataset: Dataset,
            text_fn: TextFn | None) -> None:
        self.kept += batch.pop("index").tolist()
        self._append("labels", batch.pop("label").long())
        captions = batch.pop("caption", None)
        if text_fn is not None:
            if captions is None:
                raise ConfigError(f"a text encoder was given but {type(dataset).__name__} has no captions; "
                                  "use a caption data set (fae.data.captions)")
            self.captions += list(captions)
            for k, v in text_fn(list(captions)).items():
                self._append(k, v if k == "text_mask" else v.to(DTYPES[self.opts.text_dtype]))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        for k, v in latent_fn(batch, self.opts.flip).items():
            self._append(k, v.to(DTYPES[self.opts.dtype]))

    def save(self, dataset: Dataset, signature: str) -> None:
        lo, hi = self.items.start, self.items.stop
        dropped = sorted(set(self.items) - set(self.kept))   # unreadable: left out, never replaced by a neighbour
        tensors = {k: torch.cat(v) for k, v in self.parts.items()}
        # one metadata key: safetensors writes metadata from a hash map, whose order differs between processes
        meta = {"format": CACHE_FORMAT, "signature": signature, "count": str(hi - lo), "start": str(lo),
                "dropped": json.dumps([item_name(dataset, i) for i in dropped])}
        if self.captions:
            meta["captions"] = json.dumps(self.captions)
        atomic_save_safetensors(tensors, self.path, metadata={"shard": json.dumps(meta, sort_keys=True)})


def shard_done(path: Path, signature: str, count: int) -> bool:
    """Whether `path` is a finished shard of the encoding run with `signature` (so a resumed run keeps it)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _shard_meta(f)
    except Exception:
        return False
    return meta.get("signature") == signature and meta.get("count") == str(count)


def _shard_meta(f: Any) -> dict[str, str]:
    meta = f.metadata() or {}
    return json.loads(meta["shard"]) if "shard" in meta else meta   # flat keys: caches written before 2026-11-29


def write_cache_manifest(out: Path, signature: str, num_shards: int, opts: CacheLayout, record: dict[str, Any],
                         data_signature: dict[str, Any], dataset: Dataset | None = None) -> None:
    """The cache's statistics (stats.safetensors) and manifest (cache.json), from its finished shards."""
    shards: list[dict[str, Any]] = []
    shape: list[int] | None = None
    labels: list[torch.Tensor] = []
    dropped: list[str] = []
    for s in range(num_shards):
        with safe_open(str(out / shard_name(s)), framework="pt") as f:
            meta = _shard_meta(f)
            if meta.get("signature") != signature:
                raise RuntimeError(f"{out / shard_name(s)} belongs to another encoding run")
            dropped += json.loads(meta.get("dropped", "[]"))
            digest = file_sha256(out / shard_name(s))   # lets a reader tell a damaged shard from a good one
            if "latents" not in set(f.keys()):   # every item of this shard was unreadable
                shards.append({"file": shard_name(s), "count": 0, "sha256": digest})
                continue
            shape = list(f.get_slice("latents").get_shape())
            labels.append(f.get_tensor("labels"))
            shards.append({"file": shard_name(s), "count": shape[0], "sha256": digest})
    if shape is None:
        raise ConfigError(f"none of the {len(dropped)} items could be read (e.g. {dropped[0] if dropped else '?'}); "
                          "check the data folder")
    all_labels = torch.cat(labels)
    mean, std = compute_stats(out, [s["file"] for s in shards if s["count"]], flip=opts.flip)
    # one metadata key: safetensors writes metadata from a hash map, whose order would differ between runs
    atomic_save_safetensors({"mean": mean, "std": std}, out / STATS, metadata={"recipe": json.dumps(
        {"recipe": STATS_RECIPE, "items": int(all_labels.numel()), "flip": opts.flip}, sort_keys=True)})
    class_names = getattr(dataset, "class_names", None) or getattr(dataset, "classes", None)
    manifest = {
        "format": CACHE_FORMAT,
        "source": opts.source,
        "num_items": int(all_labels.numel()),
        "skipped": {"count": len(dropped), "items": dropped[:1000]},   # unreadable inputs left out
        "channels": shape[1],
        "grid": shape[2:],
        "dtype": opts.dtype,
        "flip": opts.flip,
        "has_std": opts.store_std,
        "num_classes": int(getattr(dataset, "num_classes", 0) or int(all_labels.max()) + 1),
        "class_names": list(class_names) if class_names is not None else None,
        "shards": shards,
        "stats": {"file": STATS, "recipe": STATS_RECIPE},
        "data": data_signature,
        **record,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))


def compute_stats(cache_dir: str | Path, files: list[str], flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and population std (float64) over all stored latents; see STATS_RECIPE."""
    keys = ["latents", "latents_flip"] if flip else ["latents"]

    def chunks():
        for name in files:
            with safe_open(str(Path(cache_dir) / name), framework="pt") as f:
                for key in keys:
                    sl = f.get_slice(key)
                    rows = sl.get_shape()[0]
                    for lo in range(0, rows, _CHUNK):
                        x = sl[lo:min(rows, lo + _CHUNK)].float().numpy().astype(np.float64)
                        yield np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)  # (C, rows*h*w)

    total: np.ndarray | None = None
    count = 0
    for x in chunks():
        s = x.sum(axis=1)
        total = s if total is None else total + s
        count += x.shape[1]
    if total is None:
        raise ConfigError(f"{cache_dir}: no latents to take statistics of")
    mean = total / count
    ss = np.zeros_like(mean)   # 0 + d is d exactly: the same sums as starting from the first chunk
    for x in chunks():
        ss = ss + ((x - mean[:, None]) ** 2).sum(axis=1)
    std = np.sqrt(ss / count)
    return torch.from_numpy(mean), torch.from_numpy(std)


# ---------------------------------------------------------------------------------------------------- reading
class LatentCache:
    """A cache folder: manifest, statistics, and row access by global index."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.path} is not a latent cache ({MANIFEST} missing); create it with "
                                    f"`fae encode`")
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"{manifest}: unknown cache format {self.manifest.get('format')!r}")
        stats = self.path / STATS
        with safe_open(str(stats), framework="pt") as f:
            self.mean64, self.std64 = f.get_tensor("mean"), f.get_tensor("std")
        self.counts = [s["count"] for s in self.manifest["shards"]]
        self.offsets = np.cumsum([0] + self.counts)
        self._files: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def channels(self) -> int:
        return int(self.manifest["channels"])

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.manifest["grid"]
        return int(h), int(w)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def stats(self) -> dict[str, list[float]]:
        """Per-channel statistics as plain lists (stored in generator bundles)."""
        return {"mean": self.mean64.tolist(), "std": self.std64.tolist()}

    def _file(self, shard: int) -> Any:
        if shard not in self._files:
            path = self.path / self.manifest["shards"][shard]["file"]
            try:
                self._files[shard] = safe_open(str(path), framework="pt")
            except Exception as exc:  # missing or damaged: name it, and say how to repair
                raise ValueError(f"latent shard {path} is unreadable ({exc}); run the same `fae encode` again: it "
                                 "re-encodes damaged shards and keeps the good ones") from None
        return self._files[shard]

    def verify(self) -> list[str]:
        """The shards whose bytes differ from the SHA-256 `fae encode` recorded (caches before that: none)."""
        return [s["file"] for s in self.manifest["shards"]
                if "sha256" in s and file_sha256(self.path / s["file"]) != s["sha256"]]

    def locate(self, index: int) -> tuple[int, int]:
        index = check_index(index, len(self), str(self.path))
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return shard, index - int(self.offsets[shard])

    def row(self, index: int, key: str) -> torch.Tensor:
        """Item `index` of tensor `key`: a view into the shard's memory map (only its pages are read; do not edit
        it in place, later reads in this process would see the edit)."""
        shard, i = self.locate(index)
        return self._file(shard).get_slice(key)[i:i + 1][0]

    def labels(self) -> torch.Tensor:
        return torch.cat([self._file(s).get_tensor("labels") for s in range(len(self.counts)) if self.counts[s]])

    @property
    def has_text(self) -> bool:
        """Whether the cache holds text embeddings of captions (encoded with a text encoder)."""
        return self.manifest.get("text") is not None

    def captions(self) -> list[str]:
        out: list[str] = []
        for s in range(len(self.counts)):
            out += json.loads(_shard_meta(self._file(s)).get("captions", "[]"))
        return out

    def text_null(self) -> dict[str, torch.Tensor]:
        """The empty prompt's embedding (rows of one) the cache was encoded with."""
        if not self.has_text:
            raise ValueError(f"{self.path} holds no text embeddings; encode a caption data set with a text encoder")
        with safe_open(str(self.path / TEXT_NULL), framework="pt") as f:
            return {k: f.get_tensor(k) for k in TEXT_KEYS}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own handles
        return {**self.__dict__, "_files": {}}


def normalize(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(z - mean) / std per channel; mean/std are (C,), z is (..., C, h, w)."""
    return (z - mean.to(z).view(-1, 1, 1)) / (std.to(z).view(-1, 1, 1) + eps)


def denormalize(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return z * (std.to(z).view(-1, 1, 1) + eps) + mean.to(z).view(-1, 1, 1)


class LatentDataset(Dataset):
    """Items {"latent": (C,h,w) float32 normalised, "label": int64} (+ "text_tokens", "text_mask", "text_pooled"
    from a cache with text embeddings). With an (index, seed) key the seed's coin picks
    the flipped latent (`flip_coin`, as every fae data set); with `sample_posterior` the seed also draws
    z = mean + std * n from the stored posterior std."""

    def __init__(self, cache: LatentCache | str | Path, hflip: bool = True, normalize: bool = True,
                 sample_posterior: bool = False) -> None:
        self.cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
        if hflip and not self.cache.manifest["flip"]:
            raise ValueError(f"{self.cache.path} holds no flipped latents; re-encode with flip, or set hflip=False")
        if sample_posterior and not self.cache.manifest["has_std"]:
            raise ValueError(f"{self.cache.path} holds no posterior std; re-encode with --store-std, or set "
                             "sample_posterior=False")
        self.hflip, self.normalize, self.sample_posterior = hflip, normalize, sample_posterior
        self.mean, self.std = self.cache.mean64.float(), self.cache.std64.float()

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: Any) -> dict[str, torch.Tensor]:
        index, generator = split_key(key)
        flipped = self.hflip and flip_coin(generator)
        suffix = "_flip" if flipped else ""
        z = self.cache.row(index, "latents" + suffix).float()
        if self.sample_posterior:
            std = self.cache.row(index, "std" + suffix).float()
            z = z + std * torch.randn(z.shape, generator=generator)
        if self.normalize:
            z = normalize(z, self.mean, self.std)
        item = {"latent": z, "label": self.cache.row(index, "labels").long()}
        if self.cache.has_text:
            item.update({k: self.cache.row(index, k) for k in TEXT_KEYS})
            item["text_tokens"], item["text_pooled"] = item["text_tokens"].float(), item["text_pooled"].float()
        return item

"""Feature cache: a frozen encoder's features for every item of a (small) data set, computed once.

The cache is one safetensors file: `features` (L,N,D), and `features_flip` (features of the horizontally flipped
images) when built with `flips=True`. Its metadata records the encoder's `reference()`, the data set's signature
and length, so `build_feature_cache` reuses a matching file and rebuilds a stale one. Rows are read lazily
(memory-mapped), so a cache larger than memory still works, one item at a time.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from fae.data.keys import check_index, flip_coin, item_labels, split_key
from fae.data.loading import loader_options, num_items
from fae.data.readable import WithIndex, collate_present, item_name
from fae.io import atomic_save_safetensors, check_same_encoder
from fae.precision import DTYPES

log = logging.getLogger(__name__)
CACHE_FORMAT = "fae-feature-cache-v1"
CACHE_DTYPES = ("float32", "float16")


def dataset_signature(dataset: Dataset) -> dict[str, Any]:
    """What identifies a data set's content (its own `signature()`, else class and length), for cache keys."""
    signature = getattr(dataset, "signature", None)
    if callable(signature):
        return signature()
    return {"class": type(dataset).__name__, "length": num_items(dataset)}


def cache_metadata(encoder: Any, dataset: Dataset, flips: bool, dtype: str) -> dict[str, str]:
    """The metadata a cache of `encoder` over `dataset` carries (all values are strings, as safetensors wants).
    The encoder's resolved compute precision is part of it: bf16 and fp32 features of one image differ."""
    precision = getattr(encoder, "precision", None)
    reference = dict(encoder.reference())
    source = reference.get("name_or_path")
    if isinstance(source, str) and Path(source).expanduser().is_dir():
        # one name for one local folder, however it was written (relative or absolute): the demo and a hand-run of
        # its configs then find the same cache file
        reference["name_or_path"] = str(Path(source).expanduser().resolve())
    return {"format": CACHE_FORMAT, "encoder": json.dumps(reference, sort_keys=True),
            "dataset": json.dumps(dataset_signature(dataset), sort_keys=True),
            "length": str(len(dataset)), "flips": str(bool(flips)).lower(), "dtype": dtype,  # type: ignore[arg-type]  # has __len__
            "precision": precision.name if precision is not None else "fp32"}


class FeatureCache:
    """Read access to a cache file: `get(index, flipped)` -> (N,D) float32 features of one item."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"feature cache {self.path} does not exist; build it with build_feature_cache")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata: dict[str, str] = dict(f.metadata() or {})
                keys = set(f.keys())
                shape = list(f.get_slice("features").get_shape()) if "features" in keys else []
        except Exception as exc:
            raise ValueError(f"{self.path} is not a readable safetensors file ({exc})") from None
        if self.metadata.get("format") != CACHE_FORMAT or len(shape) != 3:
            raise ValueError(f"{self.path} is not a fae feature cache (format {self.metadata.get('format')!r})")
        self.length, self.num_tokens, self.dim = shape
        self.has_flips = "features_flip" in keys
        self.missing: list[str] = json.loads(self.metadata.get("missing", "[]"))  # unreadable items left out
        self.encoder: dict[str, Any] = json.loads(self.metadata["encoder"])
        self._file: Any = None  # opened lazily, once per process (DataLoader workers cannot share the handle)
        self._present: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.length

    def present(self, index: int) -> bool:
        """Whether item `index` was readable when the cache was built (caches before this field: always)."""
        if self._present is None:
            with safe_open(str(self.path), framework="pt") as f:
                keys = set(f.keys())
                self._present = f.get_tensor("present").bool() if "present" in keys else torch.ones(0, dtype=torch.bool)
        return bool(self._present[index]) if len(self._present) else True

    def mismatch(self, metadata: dict[str, str]) -> str | None:
        """The first metadata key whose value differs from `metadata`, or None when the cache matches."""
        for key, value in metadata.items():
            if self.metadata.get(key) != value:
                return key
        return None

    def get(self, index: int, flipped: bool = False) -> torch.Tensor:
        if flipped and not self.has_flips:
            raise ValueError(f"{self.path} holds no flipped features; rebuild it with flips=True")
        index = check_index(index, self.length, str(self.path))
        if self._file is None:
            self._file = safe_open(str(self.path), framework="pt")
        rows = self._file.get_slice("features_flip" if flipped else "features")[index:index + 1]
        return rows[0].float()

    def all(self, flipped: bool = False) -> torch.Tensor:
        """Every row at once (L,N,D) float32 — for small caches and statistics."""
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor("features_flip" if flipped else "features").float()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}


def batched_halves(fn: Callable[[torch.Tensor], Any], inputs: list[torch.Tensor],
                   together: bool | None = None) -> list[Any]:
    """`fn` of each input (the plain and the h-flipped half of a batch): one call on their concatenation on a GPU
    (fuller batches), one call each on a CPU, where one 2B call measured 0.8x the speed (docs/benchmarks.md);
    `together` overrides the choice. `fn` returns a tensor or a dict of tensors, batch first."""
    together = inputs[0].is_cuda if together is None else together
    if len(inputs) < 2 or not together:
        return [fn(x) for x in inputs]
    sizes = [len(x) for x in inputs]
    out = fn(torch.cat(inputs))
    if isinstance(out, dict):
        parts = {k: v.split(sizes) for k, v in out.items()}
        return [{k: p[i] for k, p in parts.items()} for i in range(len(inputs))]
    return list(out.split(sizes))


def _cache_file(path: Path, metadata: dict[str, str]) -> Path:
    """`path` itself when it names a `.safetensors` file, else the file in that folder named by the metadata."""
    if path.suffix != ".safetensors":
        digest = hashlib.sha1(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:16]
        path = path / f"features-{digest}.safetensors"
    return path


def _reusable_cache(path: Path, metadata: dict[str, str]) -> FeatureCache | None:
    """The existing cache at `path` when its metadata matches; None (with a warning saying why) otherwise."""
    try:
        stale = FeatureCache(path).mismatch(metadata)
    except ValueError as exc:
        stale = f"unreadable ({exc})"
    if stale is None:
        log.info("reusing feature cache %s", path)
        return FeatureCache(path)
    log.warning("rebuilding feature cache %s: its %s differs", path, stale)
    return None


@torch.no_grad()
def build_feature_cache(encoder: Any, dataset: Dataset, path: str | Path, batch_size: int = 64, flips: bool = False,
                        dtype: Literal["float32", "float16"] = "float32", progress: bool = True, num_workers: int = 0,
                        rebuild: bool = False) -> FeatureCache:
    """Compute `encoder` features of every item of `dataset` (plain images, and flipped ones if `flips`) and write
    them atomically to `path`; an existing cache with the same metadata is reused unless `rebuild`.

    `path` is the cache file (`*.safetensors`), or a folder: the file inside is then named by a hash of the
    metadata, so caches of different encoders or data sets share the folder without overwriting each other.
    Items are read with plain integer keys, so the data set's random flip is off and row i is item i's image.
    """
    from tqdm.auto import tqdm

    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be float32 or float16, not {dtype!r}")
    metadata = cache_metadata(encoder, dataset, flips, dtype)
    path = _cache_file(Path(path), metadata)
    if path.is_file() and not rebuild:
        cache = _reusable_cache(path, metadata)
        if cache is not None:
            return cache
    n = num_items(dataset)
    if n == 0:
        raise ValueError("cannot cache features of an empty data set")
    device = encoder.mean.device if hasattr(encoder, "mean") else torch.device("cpu")
    shape = (n, encoder.num_tokens, encoder.dim)
    tensors = {"features": torch.empty(shape, dtype=DTYPES[dtype])}
    if flips:
        tensors["features_flip"] = torch.empty(shape, dtype=DTYPES[dtype])
    for rows in tensors.values():
        rows.zero_()
    present = torch.zeros(n, dtype=torch.uint8)  # 0: the item could not be read (its row stays zero, never used)
    loader = DataLoader(WithIndex(dataset), batch_size=batch_size, shuffle=False, collate_fn=collate_present,
                        **loader_options(num_workers, device))
    for batch in tqdm(loader, desc=f"features -> {path.name}", disable=not progress):
        if batch is None:
            continue
        images, index = batch["image"].to(device, non_blocking=True), batch["index"]
        halves = batched_halves(encoder, [images, *([images.flip(-1)] if flips else [])])
        # one half without flips, two with: the keys outnumber the halves then, and only "features" is written
        for key, features in zip(("features", "features_flip"), halves, strict=False):
            tensors[key][index] = features.to(DTYPES[dtype]).cpu()
        present[index] = 1
    tensors["present"] = present
    missing = [item_name(dataset, int(i)) for i in torch.nonzero(present == 0).flatten()]
    if missing:
        log.warning("feature cache %s: %d unreadable item(s) left out: %s", path, len(missing), ", ".join(missing[:10]))
    atomic_save_safetensors(tensors, path, metadata={**metadata, "missing": json.dumps(missing)})
    return FeatureCache(path)


class CachedFeatureDataset(Dataset):
    """`base` items plus "features" (N,D) from a cache. When the key's seed flips the item, both the image and
    the features are the flipped ones, so they always agree. The flip follows `base.hflip` unless `hflip` is given.

    `images=False`: items are only the features and the label (from the base's label list), and no image is
    opened: a stage that trains on features alone (stage 1) then costs what its model costs, not what decoding
    the data set's files costs. Items the cache marks unreadable are dropped as the base would drop them.
    """

    def __init__(self, base: Dataset, cache: FeatureCache | str | Path, hflip: bool | None = None,
                 encoder_reference: dict[str, Any] | None = None, images: bool = True) -> None:
        self.base = base
        self.images = images
        self._labels = None if images else item_labels(base)
        if not images and self._labels is None:
            raise ValueError(f"{type(base).__name__} keeps no label list, so its items cannot be served without "
                             "opening them; use images=True")
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
        if len(self.cache) != num_items(base):
            raise ValueError(f"{self.cache.path} holds {len(self.cache)} items, "
                             f"the data set has {num_items(base)}")
        if self.cache.metadata.get("dataset") != json.dumps(dataset_signature(base), sort_keys=True):
            raise ValueError(f"{self.cache.path} was built for another data set; rebuild it with build_feature_cache")
        if encoder_reference is not None:
            check_same_encoder(self.cache.encoder, encoder_reference, f"feature cache {self.cache.path}",
                               "the encoder of this run (rebuild the cache)")
        self.hflip = bool(getattr(base, "hflip", False)) if hflip is None else hflip
        if self.hflip and not self.cache.has_flips:
            raise ValueError(f"{self.cache.path} has no flipped features but the data set flips; "
                             "rebuild it with flips=True (or set hflip=False)")

    def __len__(self) -> int:
        return num_items(self.base)

    def __getitem__(self, key: Any) -> dict[str, torch.Tensor] | None:
        index, generator = split_key(key)
        index = check_index(index, len(self), "CachedFeatureDataset")
        if self.images:
            base = self.base[index]  # a plain index: the base never flips, we decide below
            if base is None:         # unreadable: dropped (fae.data.readable)
                return None
            item = dict(base)
        else:
            if not self.cache.present(index):  # unreadable when the cache was built: dropped the same way
                return None
            item = {"label": torch.tensor(self._labels[index], dtype=torch.int64)}  # type: ignore[index]  # set when not images
        flipped = self.hflip and flip_coin(generator)
        if flipped and "image" in item:
            item["image"] = item["image"].flip(-1)
        item["features"] = self.cache.get(index, flipped)
        return item

"""Image inputs for evaluation and their features, computed once and cached.

Inputs (`open_images`): a folder of images of one size (searched recursively, sorted by path), an `.npz` whose
`arr_0` is uint8 (N, H, W, 3) (the ADM sample/reference format; read in a streaming way, so a 50k x 256 px file never
sits in memory), an in-memory tensor/array, or a generator run (`CallableSource`: a function returning images
[start, start+count)). A data set (`DatasetSource`: what `fae.data.build_dataset` makes of a DataConfig, e.g. a
folder of mixed sizes read at `image_size`) gives its images exactly as training sees them (crop, size, fit),
unreadable files left out. Every source has a `fingerprint` (path + size + mtime of the files, or None for in-memory
data) so `extract_features` can cache the features per (input, feature network, weights hash) as an `.npz` in a
cache folder: the second metric on the same input, or the same reference next week, reuses them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fae import distributed as D
from fae.config import ConfigError
from fae.grid import float_to_uint8
from fae.io import atomic_save_npz, cache_root

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
FEATURE_FORMAT = 1  # bump when the extraction protocol changes: old cache entries are then ignored


def default_cache_dir() -> Path:
    """<fae.io.cache_root()>/eval-features ($FAE_CACHE, else $XDG_CACHE_HOME/fae, else ~/.cache/fae)."""
    return cache_root() / "eval-features"


class ImageSource:
    """A sequence of images delivered in uint8 batches (B, 3, H, W)."""

    name: str = "images"
    fingerprint: str | None = None  # None: never cached
    num_images: int = 0

    def batches(self, batch_size: int, share: range | None = None) -> Iterator[torch.Tensor]:
        """uint8 (B, 3, H, W) batches; with `share`, only the batches whose numbers lie in it (a process's share)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "num_images": self.num_images, "kind": type(self).__name__}


def _to_uint8_nchw(images: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    """Images -> uint8 (N, 3, H, W). NumPy arrays are (N, H, W, C) as saved files hold them; tensors are
    (N, C, H, W) as fae's APIs pass them. C is 1 (grey, repeated) or 3; values uint8, or float in [0, 1]."""
    channels_last = isinstance(images, np.ndarray)
    t = torch.as_tensor(images)
    if t.ndim == 3:  # grey without a channel axis
        t = t.unsqueeze(-1 if channels_last else 1)
    if t.ndim != 4:
        raise ValueError(f"{what}: expected a batch of images, got shape {tuple(t.shape)}")
    if channels_last:
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    if t.shape[1] != 3:
        layout = "(N, H, W, 3) for arrays" if channels_last else "(N, 3, H, W) for tensors"
        raise ValueError(f"{what}: expected 1 or 3 colour channels {layout}, got shape {tuple(images.shape)}")
    if t.dtype == torch.uint8:
        return t.contiguous()
    if t.is_floating_point():
        if t.numel() and (t.min() < -1e-3 or t.max() > 1 + 1e-3):
            raise ValueError(f"{what}: float images must be in [0, 1], got "
                             f"[{float(t.min()):.3g}, {float(t.max()):.3g}]")
        return float_to_uint8(t).contiguous()
    raise ValueError(f"{what}: images must be uint8 or float in [0, 1], got {t.dtype}")


class TensorSource(ImageSource):
    """Images in memory: a tensor (N,3,H,W) or a NumPy array (N,H,W,3), uint8 or float in [0,1]."""

    def __init__(self, images: np.ndarray | torch.Tensor, name: str = "tensor", fingerprint: str | None = None) -> None:
        self.images = _to_uint8_nchw(images, name)
        self.name, self.fingerprint, self.num_images = name, fingerprint, int(self.images.shape[0])

    def batches(self, batch_size: int, share: range | None = None) -> Iterator[torch.Tensor]:
        for i in _starts(self.num_images, batch_size, share):
            yield self.images[i:i + batch_size]


class CallableSource(ImageSource):
    """A generator run: `fn(start, count)` returns images [start, start+count) (uint8 or float in [0,1]).

    Give a `fingerprint` (e.g. checkpoint hash + sampler settings + seed) to let its features be cached.
    """

    def __init__(self, fn: Callable[[int, int], torch.Tensor], num_images: int, name: str = "generator",
                 fingerprint: str | None = None) -> None:
        self.fn, self.num_images, self.name, self.fingerprint = fn, int(num_images), name, fingerprint

    def batches(self, batch_size: int, share: range | None = None) -> Iterator[torch.Tensor]:
        for start in _starts(self.num_images, batch_size, share):
            count = min(batch_size, self.num_images - start)
            images = _to_uint8_nchw(self.fn(start, count), self.name)
            if images.shape[0] != count:
                raise ValueError(f"{self.name}: asked for {count} images, got {images.shape[0]}")
            yield images


def _starts(num_images: int, batch_size: int, share: range | None) -> list[int]:
    """First image of each batch, of all batches or of the batch numbers in `share`."""
    starts = list(range(0, num_images, batch_size))
    return starts if share is None else [starts[k] for k in share if k < len(starts)]


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


class FolderSource(ImageSource):
    """Every image file under a folder (recursive, sorted by relative path); all must share one size."""

    def __init__(self, root: str | Path, limit: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise FileNotFoundError(f"{self.root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        self.files = files[:limit] if limit is not None else files
        self.num_images = len(self.files)
        self.name = str(self.root)
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(_file_fingerprint(f).encode())
        self.fingerprint = f"folder:{digest.hexdigest()}"

    def load(self, index: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.files[index]) as im:
            return np.asarray(im.convert("RGB"))

    def batches(self, batch_size: int, share: range | None = None) -> Iterator[torch.Tensor]:
        first: tuple[Path, tuple[int, ...]] | None = None
        for i in _starts(self.num_images, batch_size, share):
            arrays = [self.load(j) for j in range(i, min(i + batch_size, self.num_images))]
            for j, a in enumerate(arrays):
                first = first or (self.files[i + j], a.shape)
                if a.shape != first[1]:
                    raise mixed_sizes_error(self.root, first[0], first[1], self.files[i + j], a.shape)
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def mixed_sizes_error(root: Path, a: Path, shape_a: tuple[int, ...], b: Path, shape_b: tuple[int, ...]) -> ConfigError:
    """The one-line refusal of a folder whose images differ in size, naming two of them and the two ways on."""
    return ConfigError(f"{root}: images differ in size ({a} is {shape_a[1]}x{shape_a[0]}, {b} is "
                       f"{shape_b[1]}x{shape_b[0]}); read it with the training preprocessing (centre crop to N px) by "
                       f"passing --image-size N, or build reference statistics with `fae eval stats --data {root} "
                       "--image-size N`")


class DatasetSource(ImageSource):
    """A data set's images (fae.data items {"image": (3,H,W) float in [0,1], ...}) as uint8 batches, in order; items
    the data set cannot read (None) are left out. `limit`: only the first N items."""

    def __init__(self, dataset: Any, name: str, description: dict[str, Any] | None = None,
                 limit: int | None = None) -> None:
        from torch.utils.data import Subset

        from fae.data.loading import num_items

        n = num_items(dataset)
        self.dataset = Subset(dataset, range(min(n, limit))) if limit is not None and limit < n else dataset
        self.num_images, self.name, self.description = num_items(self.dataset), name, description or {}
        self.fingerprint = _dataset_fingerprint(dataset, self.description, self.num_images)

    def batches(self, batch_size: int, share: range | None = None) -> Iterator[torch.Tensor]:
        from torch.utils.data import Subset

        from fae.data.readable import readable_batches

        dataset = self.dataset
        if share is not None:   # a process's batches: contiguous, so its readable batches stay in order
            starts = _starts(self.num_images, batch_size, share)
            dataset = Subset(dataset, [j for i in starts for j in range(i, min(i + batch_size, self.num_images))])
        for batch in readable_batches(dataset, batch_size):
            yield float_to_uint8(batch["image"]).contiguous()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.description}


def _dataset_fingerprint(dataset: Any, description: dict[str, Any], num_images: int) -> str | None:
    """How the data set is read + what it holds: each file's path, size and mtime for an image folder, else the data
    set's own `signature()`; None (never cached) for a data set with neither."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list):
        for path, label in samples[:num_images]:
            digest.update(f"{_file_fingerprint(Path(path))}|{label}".encode())
    elif callable(getattr(dataset, "signature", None)):
        digest.update(json.dumps(dataset.signature(), sort_keys=True, default=str).encode())
    else:
        return None
    return f"dataset:{digest.hexdigest()}"


def folder_dataset_source(root: str | Path, image_size: int, limit: int | None = None) -> DatasetSource:
    """An image folder of any sizes read as training reads it (`DataConfig(kind="image_folder", image_size=...)`
    through `fae.data.build_dataset`): class sub-folders or a flat folder, centre-cropped to `image_size`."""
    from fae.data import DataConfig

    return dataset_source(DataConfig(kind="image_folder", root=str(root), image_size=image_size), limit=limit)


def dataset_source(data: Any, split: str | None = None, limit: int | None = None) -> DatasetSource:
    """The images of `split` of the data set a DataConfig describes, unaugmented, as training preprocesses them."""
    from dataclasses import replace

    from fae.config import to_dict
    from fae.data import build_dataset

    data = replace(data, hflip=False)
    try:
        dataset = build_dataset(data, split)
    except ValueError as exc:   # DataConfig.validate: a user's setting
        raise ConfigError(str(exc)) from None
    where = data.root or data.kind
    return DatasetSource(dataset, f"{where}:{split or data.split}",
                         {"data": to_dict(data), "split": split or data.split}, limit=limit)


class NpzSource(ImageSource):
    """`arr_0` (or `key`) of an .npz, uint8 (N, H, W, 3), streamed from the zip member batch by batch."""

    def __init__(self, path: str | Path, key: str = "arr_0", limit: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        self.key = key
        with self._open() as f:
            shape, fortran, dtype = _read_npy_header(f)
        if fortran or dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
            raise ValueError(f"{self.path}: {key} must be a C-ordered uint8 array (N, H, W, 3) as in the ADM "
                             f"format, got dtype {dtype}, shape {shape}")
        self.shape = tuple(shape)
        self.num_images = min(shape[0], limit) if limit is not None else shape[0]
        self.name = str(self.path)
        self.fingerprint = f"npz:{_file_fingerprint(self.path)}|{key}"

    @contextlib.contextmanager
    def _open(self) -> Iterator[Any]:
        try:
            zf = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise ValueError(f"{self.path}: not an .npz file") from None
        with zf:
            if f"{self.key}.npy" not in zf.namelist():
                names = [n[:-4] for n in zf.namelist()]
                raise ConfigError(f"{self.path}: has no array {self.key!r} (it has {names}); ADM sample files "
                                  "store images in arr_0")
            with zf.open(f"{self.key}.npy") as member:
                yield member

    def batches(self, batch_size: int, share: range | None = None) -> Iterator[torch.Tensor]:
        per_image = int(np.prod(self.shape[1:]))
        mine = set(_starts(self.num_images, batch_size, share))
        with self._open() as f:
            _read_npy_header(f)
            for i in range(0, self.num_images, batch_size):
                n = min(batch_size, self.num_images - i)
                data = _read_exactly(f, n * per_image)   # a zip member streams: earlier batches are read past
                if i not in mine:
                    continue
                yield _to_uint8_nchw(np.frombuffer(bytearray(data), dtype=np.uint8).reshape(n, *self.shape[1:]),
                                     self.name)


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def _read_exactly(f: Any, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = f.read(size - got)
        if not chunk:
            raise ValueError(f"truncated array: expected {size} more bytes, got {got}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def open_images(spec: str | Path | np.ndarray | torch.Tensor | ImageSource, limit: int | None = None,
                image_size: int | None = None) -> ImageSource:
    """An ImageSource for an image folder, an .npz (arr_0), an array/tensor, or an existing source.

    A folder holding exactly one .npz (a `fae sample` run folder, whose grid PNGs have other sizes) means that .npz.
    With `image_size`, any other folder is read with the training preprocessing at that size (its images may differ
    in size); without it, all its images must share one size.
    """
    if isinstance(spec, ImageSource):
        return spec
    if isinstance(spec, (np.ndarray, torch.Tensor)):
        return TensorSource(spec[:limit] if limit is not None else spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        # a `fae sample` run folder: its ADM-format .npz holds exactly the samples (PNGs there include grids)
        npzs = sorted(path.glob("*.npz"))
        if len(npzs) == 1:
            return NpzSource(npzs[0], limit=limit)
        if image_size is not None:
            return folder_dataset_source(path, image_size, limit=limit)
        return FolderSource(path, limit=limit)
    if path.suffix == ".npz":
        return NpzSource(path, limit=limit)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    raise ConfigError(f"{path}: expected an image folder or an .npz file with arr_0")


@dataclass
class FeatureSet:
    """Features of one input through one network: {"pool": (N, D), ...} float32, plus what made them."""

    features: dict[str, np.ndarray]
    network: dict[str, Any]
    source: dict[str, Any]
    cached: bool = False
    cache_file: str | None = None

    @property
    def num_samples(self) -> int:
        return int(next(iter(self.features.values())).shape[0])

    def __getitem__(self, kind: str) -> np.ndarray:
        if kind not in self.features:
            raise ConfigError(f"feature network {self.network.get('name')} gives no {kind!r} features "
                              f"(it gives {sorted(self.features)})")
        return self.features[kind]


def cache_key(source: ImageSource, network: Any) -> str | None:
    if source.fingerprint is None:
        return None
    text = json.dumps({"source": source.fingerprint, "n": source.num_images, "network": network.name,
                       "weights": network.weights_hash, "format": FEATURE_FORMAT}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def meta_array(meta: dict[str, Any]) -> np.ndarray:
    """JSON metadata as a 0-d unicode array: readable with np.load(allow_pickle=False)."""
    return np.array(json.dumps(meta, sort_keys=True))


def extract_features(source: ImageSource | str | Path | np.ndarray | torch.Tensor, network: Any,
                     batch_size: int = 50, cache_dir: str | Path | None = None, limit: int | None = None,
                     progress: bool = False) -> FeatureSet:
    """Run every image of `source` through `network`; reuse / write the cache in `cache_dir` if given."""
    source = open_images(source, limit=limit)
    if source.num_images == 0:
        raise ConfigError(f"{source.name}: no images")
    key = cache_key(source, network)
    cache_file = Path(cache_dir) / f"{key}.npz" if (cache_dir is not None and key is not None) else None
    if cache_file is not None and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as data:
                feats = {k: data[k] for k in data.files if k != "meta"}
            if feats and all(v.shape[0] == source.num_images for v in feats.values()):
                return FeatureSet(feats, network.info(), source.describe(), cached=True, cache_file=str(cache_file))
        except (OSError, ValueError, zipfile.BadZipFile):
            pass  # a damaged cache entry is recomputed and overwritten
    chunks: dict[str, list[np.ndarray]] = {}
    # under torchrun each process runs the network on its share of the batches; the features are gathered in order
    share = D.shard_of(math.ceil(source.num_images / batch_size))
    bar = None
    if progress and D.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=source.num_images, desc=f"features {Path(source.name).name}", unit="img")
    for images in source.batches(batch_size, share if D.is_distributed() else None):
        out = network.features(images)
        for kind, value in out.items():
            chunks.setdefault(kind, []).append(value.detach().float().cpu().numpy())
        if bar is not None:
            bar.update(images.shape[0] * D.world_size())
    if bar is not None:
        bar.close()
    parts = D.all_gather_objects(chunks)   # rank order = batch order: the shares are contiguous
    feats = {k: np.concatenate([c for part in parts for c in part.get(k, [])])
             for k in dict.fromkeys(k for part in parts for k in part)}
    if cache_file is not None and D.is_main():
        meta = {"source": source.describe(), "network": network.info(), "format": FEATURE_FORMAT}
        atomic_save_npz(cache_file, **{**feats, "meta": meta_array(meta)})
    return FeatureSet(feats, network.info(), source.describe(), cached=False,
                      cache_file=str(cache_file) if cache_file else None)


def read_npz_meta(data: Any, key: str = "fae_meta") -> dict[str, Any] | None:
    if key not in data.files:
        return None
    return json.loads(str(data[key][()]))


__all__ = ["ImageSource", "TensorSource", "CallableSource", "FolderSource", "NpzSource", "DatasetSource",
           "dataset_source", "folder_dataset_source", "mixed_sizes_error", "open_images",
           "FeatureSet", "extract_features", "default_cache_dir", "meta_array", "read_npz_meta",
           "IMAGE_EXTENSIONS"]

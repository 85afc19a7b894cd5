"""Data sets for every stage. Items are dicts of tensors: {"image": (3,H,W) float in [0,1], "label": int64 scalar}.

`dataset[key]` takes an int index or an `(index, seed)` pair from the trainer's resumable sampler. The seed drives
the item's augmentation (the first draw of its generator decides the horizontal flip), so a resumed run sees
exactly the same data, and a feature cache can pick the features of the same flip.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fae.data.captions import CaptionDataConfig, CaptionDataset, CaptionFormat, build_caption_dataset
from fae.data.features import CachedFeatureDataset, FeatureCache, build_feature_cache
from fae.data.idx import FashionMNIST, read_idx
from fae.data.images import ImageFolderDataset, center_crop_arr
from fae.data.keys import DataKey, check_index, class_strided_indices, flip_coin, item_labels, split_key

CAPTION_KINDS: dict[str, CaptionFormat] = {"caption_folder": "folder", "caption_manifest": "manifest", "webdataset": "webdataset"}


@dataclass
class DataConfig:
    # caption_folder / caption_manifest / webdataset: image-caption pairs (fae.data.captions), for `fae train mmdit`
    kind: Literal["fashion_mnist", "image_folder", "caption_folder", "caption_manifest", "webdataset"] = "fashion_mnist"
    root: str | None = None  # image_folder: the folder, or its parent with split sub-folders; fashion_mnist: IDX dir
    split: str = "train"
    image_size: int = 32
    hflip: bool = False
    limit: int | None = None  # use only this many items (a deterministic, class-balanced subset for folders)
    fit: Literal["resize", "pad"] = "resize"  # fashion_mnist only: 28 px -> image_size by bilinear resize or zero pad
    missing_captions: Literal["skip", "error"] = "skip"  # caption data: skip-and-count or refuse (fae.data.captions)

    def validate(self) -> None:
        if self.kind not in ("fashion_mnist", "image_folder", *CAPTION_KINDS):
            raise ValueError(f"data kind must be fashion_mnist, image_folder or one of {list(CAPTION_KINDS)}, "
                             f"not {self.kind!r}")
        if self.kind != "fashion_mnist" and not self.root:
            raise ValueError(f"data.root is required for a {self.kind} data set")
        if self.image_size < 1:
            raise ValueError(f"data.image_size must be positive, not {self.image_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit must be positive or null, not {self.limit}")
        if self.fit not in ("resize", "pad"):
            raise ValueError(f"data.fit must be resize or pad, not {self.fit!r}")
        if self.kind == "fashion_mnist" and self.fit == "pad" and self.image_size < 28:
            raise ValueError(f"data.fit=pad needs image_size >= 28, not {self.image_size}")


def build_dataset(cfg: DataConfig, split: str | None = None) -> torch.utils.data.Dataset:
    """The data set `cfg` describes, for `split` (default `cfg.split`).

    Image folders: `root/<split>` when that folder exists, else `root` itself for the configured split.
    """
    cfg.validate()
    split = split or cfg.split
    if cfg.kind in CAPTION_KINDS:
        return build_caption_dataset(CaptionDataConfig(CAPTION_KINDS[cfg.kind], cfg.root, cfg.image_size,  # type: ignore[arg-type]  # root: validate()
                                                       cfg.missing_captions, cfg.limit))
    if cfg.kind == "fashion_mnist":
        return FashionMNIST(cfg.root, split=split, image_size=cfg.image_size, hflip=cfg.hflip, limit=cfg.limit,
                            fit=cfg.fit)
    root = Path(cfg.root)  # type: ignore[arg-type]  # validate() requires root here
    if (root / split).is_dir():
        root = root / split
    elif split != cfg.split:
        raise FileNotFoundError(f"no folder {root / split} for split {split!r}")
    return ImageFolderDataset(root, cfg.image_size, hflip=cfg.hflip, limit=cfg.limit)


__all__ = [
    "CAPTION_KINDS", "CachedFeatureDataset", "CaptionDataConfig", "CaptionDataset", "DataConfig", "DataKey",
    "FashionMNIST", "FeatureCache", "ImageFolderDataset", "build_caption_dataset", "build_dataset",
    "build_feature_cache", "center_crop_arr", "check_index", "class_strided_indices", "flip_coin", "item_labels",
    "read_idx", "split_key",
]

"""Data sets for every stage. Items are dicts of tensors: {"image": (3,H,W) float in [0,1], "label": int64 scalar}.

`dataset[key]` takes an int index or an `(index, seed)` pair from the trainer's resumable sampler. The seed drives
the item's augmentation (the first draw of its generator decides the horizontal flip), so a resumed run sees
exactly the same data, and a feature cache can pick the features of the same flip.

How files become pixels (`data.background`, `data.resize`, `data.crop_scale`, `data.huge_pixels`) is
fae.data.pixels; what loading met is counted in fae.data.tally; `fae data preview` / `fae data prepare` are
fae.data.preview / fae.data.prepare (docs/data.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fae.config import ConfigError, apply_overrides, from_dict, section_overrides, yaml_section
from fae.data.captions import CaptionDataConfig, CaptionDataset, CaptionFormat, build_caption_dataset
from fae.data.features import CachedFeatureDataset, FeatureCache, build_feature_cache
from fae.data.idx import FashionMNIST, read_idx
from fae.data.images import ImageFolderDataset, center_crop_arr
from fae.data.keys import DataKey, check_index, class_strided_indices, flip_coin, item_labels, split_key
from fae.data.pixels import HUGE_PIXELS, RESIZE_MODES, LoadOptions, Resize, parse_background
from fae.data.tally import TALLY, LoadTally

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
    # image folders and caption data (fae.data.pixels, docs/data.md); fashion_mnist uses `fit`
    resize: Resize = "center_crop"             # center_crop (ADM, the paper's) | pad | squash | random_resized_crop
    background: str | list[int] = "white"      # under transparent pixels: white | black | [r, g, b] | "r,g,b" | "#rrggbb"
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random_resized_crop: the crop's share of the image area
    huge_pixels: int = HUGE_PIXELS             # an image above this many pixels is counted (and warned about once) as huge

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
        if self.kind == "fashion_mnist" and self.resize != "center_crop":
            raise ValueError(f"data.resize={self.resize} applies to image folders and caption data; Fashion-MNIST "
                             "is brought to image_size by data.fit (resize or pad)")
        self.options()  # resize, background, crop_scale and huge_pixels (LoadOptions checks them)

    def options(self) -> LoadOptions:
        """How this config turns an image file into pixels (fae.data.pixels)."""
        return LoadOptions(self.resize, parse_background(self.background), tuple(self.crop_scale),  # type: ignore[arg-type]  # two items: the config type says so
                           self.huge_pixels)

    @property
    def deterministic(self) -> bool:
        """Whether an item's pixels are a function of its file and flip alone: false for random_resized_crop,
        whose crop changes at every draw, so a feature cache (one entry per item and flip) cannot serve it."""
        return self.resize != "random_resized_crop"

    def require_deterministic(self, what: str) -> None:
        """A ConfigError when `what` (e.g. "features: cache") needs deterministic items and this config is not."""
        if not self.deterministic:
            raise ConfigError(f"{what} stores one result per image (and flip), but data.resize={self.resize} draws "
                              "a new crop at every use; use data.resize=center_crop (or pad / squash), or compute "
                              "features on the fly")


def build_dataset(cfg: DataConfig, split: str | None = None) -> torch.utils.data.Dataset:
    """The data set `cfg` describes, for `split` (default `cfg.split`).

    Image folders: `root/<split>` when that folder exists, else `root` itself for the configured split.
    """
    cfg.validate()
    split = split or cfg.split
    if cfg.kind in CAPTION_KINDS:
        return build_caption_dataset(CaptionDataConfig(CAPTION_KINDS[cfg.kind], cfg.root, cfg.image_size,  # type: ignore[arg-type]  # root: validate()
                                                       cfg.missing_captions, cfg.limit, cfg.options()))
    if cfg.kind == "fashion_mnist":
        return FashionMNIST(cfg.root, split=split, image_size=cfg.image_size, hflip=cfg.hflip, limit=cfg.limit,
                            fit=cfg.fit)
    return ImageFolderDataset(image_folder_split(cfg, split), cfg.image_size, hflip=cfg.hflip, limit=cfg.limit,
                              options=cfg.options())


def image_folder_split(cfg: DataConfig, split: str) -> Path:
    """The folder `build_dataset` reads for an image_folder config's `split`."""
    root = Path(cfg.root)  # type: ignore[arg-type]  # validate() requires root
    if (root / split).is_dir():
        return root / split
    if split != cfg.split:
        raise FileNotFoundError(f"no folder {root / split} for split {split!r}")
    return root


def load_data_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DataConfig:
    """The `data:` block of a stage config (or a file that is only that block), with `key=value` overrides as
    `fae train` takes them (`data.resize=pad`; a bare DataConfig key such as `resize=pad` means the same)."""
    block = yaml_section(path, "data", missing="top_level")
    return from_dict(DataConfig, apply_overrides(block, section_overrides(overrides, "data")), "data")


__all__ = [
    "CAPTION_KINDS", "CachedFeatureDataset", "CaptionDataConfig", "CaptionDataset", "DataConfig", "DataKey",
    "FashionMNIST", "FeatureCache", "HUGE_PIXELS", "ImageFolderDataset", "LoadOptions", "LoadTally", "RESIZE_MODES",
    "TALLY", "build_caption_dataset", "build_dataset", "build_feature_cache", "center_crop_arr", "check_index",
    "class_strided_indices", "flip_coin", "image_folder_split", "item_labels", "load_data_config",
    "parse_background", "read_idx", "split_key",
]

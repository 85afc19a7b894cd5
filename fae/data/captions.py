"""Image-caption data sets in the formats users already have. Items: {"image": (3,H,W) in [0,1], "label": int64,
"caption": str}; `fae encode` stores their latents together with the captions' text embeddings.

    folder       <root>/**/<name>.<image ext> beside <name>.txt (the caption, stripped)
    manifest     a .jsonl file of {"image": path, "caption": text} objects, or a .csv with image,caption columns;
                 relative image paths are relative to the manifest's folder ("file_name"/"text" also accepted)
    webdataset   tar shards (a file, a folder of *.tar, or a brace pattern such as shards-{000..009}.tar) read with
                 the PyPI `webdataset` package; a sample is <key>.<image ext> + <key>.txt (or .caption / .json
                 with a "caption" field)

A missing or empty caption (no .txt, an empty or blank text, a manifest row without one) is handled by
`missing_captions`: "skip" (default) leaves the pair out, counts it in `dataset.skipped_captions` (the places in
`skipped_caption_files`) and warns once with the count and the first few; "error" refuses the data set with a
ValueError naming the file. Images are composited over the background and resized to `image_size` by `options`
(fae.data.pixels: ADM centre crop by default) as the image folders are (fae.data.images); an unreadable image
is None (dropped by fae.data.readable's loaders, never replaced), warned about and counted in `dataset.skipped`,
as there.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from fae.data.images import IMAGE_EXTENSIONS, DecodedImages
from fae.data.keys import check_index, flip_coin, split_key
from fae.data.pixels import LoadOptions
from fae.data.tally import LoadTally

CaptionFormat = Literal["folder", "manifest", "webdataset"]
_CAPTION_KEYS = ("caption", "text", "txt")
_IMAGE_KEYS = ("image", "file_name", "path", "jpg", "png")


@dataclass
class CaptionDataConfig:
    format: CaptionFormat = "folder"
    root: str = ""                       # folder, manifest file, or tar shard(s)
    image_size: int = 32
    missing_captions: Literal["skip", "error"] = "skip"
    limit: int | None = None             # the first `limit` pairs (in sorted / file order)
    options: LoadOptions = field(default_factory=LoadOptions)   # background and resize (fae.data.pixels)

    def validate(self) -> None:
        if self.format not in ("folder", "manifest", "webdataset"):
            raise ValueError(f"caption data format must be folder, manifest or webdataset, not {self.format!r}")
        if not self.root:
            raise ValueError("caption data root is empty: give a folder, a .jsonl/.csv manifest or tar shards")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, not {self.image_size}")
        if self.missing_captions not in ("skip", "error"):
            raise ValueError(f"missing_captions must be skip or error, not {self.missing_captions!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be positive or null, not {self.limit}")


class CaptionDataset(DecodedImages, Dataset):
    """Pairs (image source, caption); an image source is a path or (tar shard, member key) for webdataset."""

    def __init__(self, pairs: list[tuple[Any, str]], image_size: int, name: str, skipped: list[str],
                 hflip: bool = False, labels: list[int] | None = None, options: LoadOptions | None = None,
                 tally: LoadTally | None = None) -> None:
        if not pairs:
            raise ValueError(f"{name}: no image-caption pairs found" + (f" ({len(skipped)} skipped for missing or "
                                                                         "empty captions)" if skipped else ""))
        self.pairs, self.image_size, self.name, self.hflip = pairs, image_size, name, hflip
        self.labels = labels or [0] * len(pairs)
        self._init_decoding(options, tally)
        self.skipped_captions, self.skipped_caption_files = len(skipped), skipped
        self.class_names: list[str] | None = None
        self._shard: tuple[str, dict[str, bytes]] | None = None
        if skipped:
            shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            warnings.warn(f"{name}: skipped {len(skipped)} images with a missing or empty caption ({shown})",
                          RuntimeWarning, stacklevel=3)

    @property
    def num_classes(self) -> int:
        return 0

    @property
    def captions(self) -> list[str]:
        return [c for _, c in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def signature(self) -> dict[str, Any]:
        listing = "\n".join(f"{src}\t{cap}" for src, cap in self.pairs)
        signature = {"class": type(self).__name__, "name": self.name, "image_size": self.image_size,
                     "length": len(self), "pairs_sha1": hashlib.sha1(listing.encode()).hexdigest()}
        return {**signature, **self.options.signature()}

    def _open(self, index: int) -> Image.Image:
        return self._image(self.pairs[index][0])

    def _name(self, index: int) -> str:
        source = self.pairs[index][0]
        return f"{source[0]}:{source[1]}" if isinstance(source, tuple) else str(source)

    def _image(self, source: Any) -> Image.Image:
        if isinstance(source, tuple):  # (shard, key): one shard's images are held while its items are read in order
            shard, key = source
            if self._shard is None or self._shard[0] != shard:
                self._shard = (shard, _read_shard_images(shard))
            return Image.open(io.BytesIO(self._shard[1][key]))
        return Image.open(source)

    def __getitem__(self, key: Any) -> dict[str, Any] | None:
        index, generator = split_key(key)
        index = check_index(index, len(self), self.name)
        caption = self.pairs[index][1]
        flip = flip_coin(generator)  # always the generator's first draw; a random crop's draws follow it
        image = self.read(index, generator)
        if image is None:
            return None
        if self.hflip and flip:
            image = image.flip(-1)
        return {"image": image, "label": torch.tensor(self.labels[index], dtype=torch.int64), "caption": caption}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers read their own shards
        return {**self.__dict__, "_shard": None}


def build_caption_dataset(cfg: CaptionDataConfig) -> CaptionDataset:
    cfg.validate()
    readers = {"folder": _folder_pairs, "manifest": _manifest_pairs, "webdataset": _webdataset_pairs}
    pairs, skipped = readers[cfg.format](cfg.root, cfg.missing_captions)
    if cfg.limit is not None:
        pairs = pairs[:cfg.limit]
    return CaptionDataset(pairs, cfg.image_size, f"{cfg.format} {cfg.root}", skipped, options=cfg.options)


def _clean(caption: Any) -> str:
    return " ".join(str(caption).split()) if caption is not None else ""


def _keep(pairs: list, skipped: list[str], source: Any, caption: str, where: str, policy: str) -> None:
    if caption:
        pairs.append((source, caption))
    elif policy == "error":
        raise ValueError(f"{where}: missing or empty caption; add one, or set missing_captions: skip")
    else:
        skipped.append(where)


def _folder_pairs(root: str, policy: str) -> tuple[list, list[str]]:
    folder = Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"caption folder {folder} does not exist")
    pairs: list = []
    skipped: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        txt = path.with_suffix(".txt")
        caption = _clean(txt.read_text(encoding="utf-8")) if txt.is_file() else ""
        _keep(pairs, skipped, str(path), caption, str(txt), policy)
    return pairs, skipped


def _manifest_pairs(root: str, policy: str) -> tuple[list, list[str]]:
    manifest = Path(root)
    if not manifest.is_file():
        raise FileNotFoundError(f"caption manifest {manifest} does not exist")
    if manifest.suffix.lower() == ".csv":
        with open(manifest, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif manifest.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{manifest}:{n}: not a JSON object ({exc.msg})") from None
    else:
        raise ValueError(f"caption manifest {manifest}: use a .jsonl or .csv file")
    pairs: list = []
    skipped: list[str] = []
    for n, row in enumerate(rows, 1):
        image = next((row[k] for k in _IMAGE_KEYS if row.get(k)), None)
        if image is None:
            raise ValueError(f"{manifest}: row {n} names no image (a column or key image / file_name)")
        path = Path(image) if Path(image).is_absolute() else manifest.parent / image
        caption = _clean(next((row[k] for k in _CAPTION_KEYS if row.get(k) is not None), None))
        _keep(pairs, skipped, str(path), caption, f"{manifest} row {n} ({image})", policy)
    return pairs, skipped


def _shard_urls(root: str) -> list[str]:
    import braceexpand

    path = Path(root)
    urls = [str(p) for p in sorted(path.glob("*.tar"))] if path.is_dir() else list(braceexpand.braceexpand(root))
    missing = [u for u in urls if not Path(u).is_file()]
    if not urls or missing:
        raise FileNotFoundError(f"webdataset shards {root}: " + (f"{missing[0]} does not exist" if missing
                                                                  else "no .tar files"))
    return urls


def _samples(shard: str):
    import webdataset as wds

    # a plain pass over one shard in file order: no shuffling, no decoding (images stay bytes until read)
    return wds.WebDataset(shard, shardshuffle=False, empty_check=False)


def _caption_of(sample: dict[str, Any]) -> str:
    for ext in ("txt", "caption", "text"):
        if ext in sample:
            return _clean(sample[ext].decode("utf-8"))
    if "json" in sample:
        meta = json.loads(sample["json"])
        return _clean(next((meta[k] for k in _CAPTION_KEYS if meta.get(k) is not None), None))
    return ""


def _image_key(sample: dict[str, Any]) -> str | None:
    return next((k for k in sample if f".{k.lower()}" in IMAGE_EXTENSIONS), None)


def _webdataset_pairs(root: str, policy: str) -> tuple[list, list[str]]:
    pairs: list = []
    skipped: list[str] = []
    for shard in _shard_urls(root):
        for sample in _samples(shard):
            ext = _image_key(sample)
            if ext is None:
                continue  # a sample without an image (metadata only) is not a pair
            _keep(pairs, skipped, (shard, sample["__key__"]), _caption_of(sample),
                  f"{shard}:{sample['__key__']}", policy)
    return pairs, skipped


def _read_shard_images(shard: str) -> dict[str, bytes]:
    images = {}
    for sample in _samples(shard):
        ext = _image_key(sample)
        if ext is not None:
            images[sample["__key__"]] = sample[ext]
    return images

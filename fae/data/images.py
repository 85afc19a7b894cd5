"""Image folders: background compositing and resize to the training size (fae.data.pixels: ADM centre crop by
default), optional horizontal flip, labels from sub-folders.

A corrupt or unreadable file never kills a run: the item is None (fae.data.readable), with a warning that names
the file, counted in `dataset.skipped` and the process tally (fae.data.tally); loaders drop it, so it is never
replaced by a copy of a neighbour. A folder made by `fae data prepare` (a `fae_prepared.json` at its root or its
parent) is checked against the settings it is read with.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fae.config import ConfigError
from fae.data.keys import check_index, flip_coin, split_key
from fae.data.pixels import LoadInfo, LoadOptions, center_crop_arr, decode_image, fit_image
from fae.data.tally import TALLY, LoadTally

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
PREPARED_FILE = "fae_prepared.json"   # written by `fae data prepare` (fae.data.prepare)
__all__ = ["IMAGE_EXTENSIONS", "PREPARED_FILE", "DecodedImages", "ImageFolderDataset", "center_crop_arr",
           "check_prepared", "prepared_settings", "to_tensor"]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float (C,H,W) in [0,1]."""
    # np.array copies: arrays viewing a PIL image are read-only
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def _is_image(path: Path, extensions: Sequence[str]) -> bool:
    return path.is_file() and path.suffix.lower() in extensions and not path.name.startswith(".")


def prepared_settings(image_size: int, options: LoadOptions) -> dict[str, Any]:
    """The settings a prepared copy bakes into its pixels (recorded in its fae_prepared.json)."""
    return {"image_size": image_size, "resize": options.resize, "background": list(options.background)}


def check_prepared(root: Path, image_size: int, options: LoadOptions) -> list[str] | None:
    """A ConfigError when `root` (or its parent) is a `fae data prepare` copy made with other settings, or one
    whose preparation did not finish. Returns the class names the copy's split recorded (the original folder's, so
    a class none of whose files could be read keeps its label), or None (an ordinary folder, or an older copy)."""
    record_file = next((d / PREPARED_FILE for d in (root, root.parent) if (d / PREPARED_FILE).is_file()), None)
    if record_file is None:
        return None
    try:
        record = json.loads(record_file.read_text())
        made = record["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{record_file}: not a readable fae_prepared.json ({exc}); prepare the folder again with "
                          "`fae data prepare`") from None
    wanted = prepared_settings(image_size, options)
    diffs = [f"{k}={made.get(k)} (this config: data.{k}={v})" for k, v in wanted.items() if made.get(k) != v]
    if diffs:
        raise ConfigError(f"{root} is a copy made by `fae data prepare` with {', '.join(diffs)}: its pixels already "
                          f"carry those settings. Prepare again with the new ones (`fae data prepare CONFIG --out "
                          f"NEW_DIR` with data.root={record.get('source', 'the original folder')}), or set the "
                          "data keys to the prepared values")
    if not record.get("complete", False):
        raise ConfigError(f"{record_file}: this prepared copy is unfinished; run the same `fae data prepare` again "
                          "to finish it (it resumes)")
    names = record.get("splits", {}).get(root.name, {}).get("class_names")
    return list(names) if isinstance(names, list) else None


class DecodedImages:
    """Shared by the image data sets: decode an item's file (`_open`, `_name`) into the model's pixels by
    `self.options` at `self.image_size`, recording what it met in `self.tally` (each item once per process: a later
    epoch neither counts it again nor repeats the hidden-content test), and dropping unreadable files."""

    image_size: int
    options: LoadOptions
    tally: LoadTally

    def _init_decoding(self, options: LoadOptions | None, tally: LoadTally | None) -> None:
        self.options = options or LoadOptions()
        self.tally = TALLY if tally is None else tally
        self.skipped = 0  # unreadable files met by this process (DataLoader workers count their own)
        self._bad: set[int] = set()
        self._recorded: set[int] = set()

    def _open(self, index: int) -> Image.Image:
        raise NotImplementedError

    def _name(self, index: int) -> str:
        raise NotImplementedError

    def decode_file(self, index: int, assess: bool = True) -> tuple[Image.Image, LoadInfo]:
        """Item `index`'s file as an RGB image over the background, before any resize, with what decoding met (not
        recorded; raises on a corrupt file); `assess=False` skips the hidden-content and transparency tests."""
        return decode_image(lambda: self._open(index), self._name(index), self.options, assess)

    def decode(self, index: int, generator: torch.Generator | None = None,
               assess: bool = True) -> tuple[np.ndarray, LoadInfo]:
        """Item `index` as uint8 HWC pixels at image_size (`decode_file`, then the resize mode)."""
        rgb, info = self.decode_file(index, assess)
        return fit_image(rgb, self.image_size, self.options, generator), info

    def load(self, index: int, generator: torch.Generator | None = None) -> np.ndarray:
        """Item `index` as uint8 HWC pixels, recorded in the tally the first time (raises on a corrupt file)."""
        first = index not in self._recorded
        arr, info = self.decode(index, generator, assess=first)
        if first:
            self._recorded.add(index)
            self.tally.record(info)
        return arr

    def read(self, index: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Item `index` as a float (3,H,W) tensor, or None for an unreadable file: warned about once by name,
        counted (`skipped`, the tally), dropped by the loaders (fae.data.readable), never replaced by a neighbour."""
        try:
            return to_tensor(self.load(index, generator))
        except Exception as exc:  # PIL raises many types for bad files; none may stop a run
            if index not in self._bad:
                self._bad.add(index)
                self.skipped += 1
                self.tally.record_dropped(self._name(index))
                warnings.warn(f"skipping unreadable image {self._name(index)} ({type(exc).__name__}: {exc}); it is "
                              "dropped from the data set", RuntimeWarning, stacklevel=3)
            return None


class ImageFolderDataset(DecodedImages, Dataset):
    """Images under `root`, labelled by sorted sub-folder name (`root/<class>/**/<file>`); a flat folder is one
    class. Files are sorted, so indices are stable across runs and machines."""

    def __init__(self, root: str | Path, image_size: int, hflip: bool = False,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, limit: int | None = None,
                 options: LoadOptions | None = None, tally: LoadTally | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, not {image_size}")
        self.image_size = image_size
        self.hflip = hflip
        self._init_decoding(options, tally)
        pinned = check_prepared(self.root, image_size, self.options)
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        samples: list[tuple[Path, int]] = []
        names: list[str] = list(pinned or [])
        for d in class_dirs:
            files = sorted(p for p in d.rglob("*") if _is_image(p, exts))
            if files and pinned is not None:
                if d.name not in pinned:
                    raise ConfigError(f"{d}: a class the prepared copy does not record ({PREPARED_FILE}); prepare "
                                      "the folder again")
                samples += [(p, pinned.index(d.name)) for p in files]
            elif files:
                samples += [(p, len(names)) for p in files]
                names.append(d.name)
        if not samples:  # flat folder: a single unnamed class
            samples = [(p, 0) for p in sorted(self.root.iterdir()) if _is_image(p, exts)]
            names = [self.root.name]
        elif any(_is_image(p, exts) for p in self.root.iterdir()):
            warnings.warn(f"{self.root}: images directly in the root are ignored because class sub-folders exist",
                          RuntimeWarning, stacklevel=2)
        if not samples:
            raise FileNotFoundError(f"no images ({', '.join(exts)}) found in {self.root} or its sub-folders")
        if limit is not None and limit < len(samples):
            # evenly spaced over the sorted list, so every class keeps its share
            samples = [samples[i * len(samples) // limit] for i in range(limit)]
        self.samples = samples
        self.class_names = names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def signature(self) -> dict[str, Any]:
        """What identifies this data set's content, for cache invalidation (with the settings that change pixels)."""
        files = "\n".join(f"{p.relative_to(self.root)}\t{label}" for p, label in self.samples)
        return {"class": type(self).__name__, "root": str(self.root.resolve()), "image_size": self.image_size,
                "length": len(self), "files_sha1": hashlib.sha1(files.encode()).hexdigest(), **self.options.signature()}

    def _open(self, index: int) -> Image.Image:
        return Image.open(self.samples[index][0])

    def _name(self, index: int) -> str:
        return str(self.samples[index][0])

    def __getitem__(self, key: Any) -> dict[str, torch.Tensor] | None:
        index, generator = split_key(key)
        index = check_index(index, len(self), "ImageFolderDataset")
        flip = flip_coin(generator)  # always the generator's first draw; a random crop's draws follow it
        image = self.read(index, generator)
        if image is None:
            return None  # dropped by fae.data.readable.collate_present, never replaced by a neighbour
        if self.hflip and flip:
            image = image.flip(-1)
        return {"image": image, "label": torch.tensor(self.samples[index][1], dtype=torch.int64)}
